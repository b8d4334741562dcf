"""The L2L paper's quadratic family: ``f(x) = ||W x - y||^2`` with a fresh ``W, y`` per sample."""
from __future__ import annotations

import math
import numbers

import torch

from .base import Batch, Params, Task, _check_split


class QuadraticTask(Task):
    """Family of ``dim``-dimensional quadratics (Andrychowicz et al. 2016, section 3.1).

    ``sample`` draws ``W ~ N(0, 1)^{dim x dim}`` and ``y ~ N(0, 1)^dim``; the loss is
    deterministic (the "batch" is the problem's ``(W, y)``). Initial ``x ~ N(0, init_std^2)``.
    """

    name = "quadratic"

    def __init__(self, dim: int = 10, init_std: float = 0.01, device: str = "cpu",
                 W: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"quadratic dim must be an integer >= 1, got {dim!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real) or not 0 <= init_std < math.inf:
            raise ValueError(f"quadratic init_std must be a finite number >= 0, got {init_std!r}")  # nan: a nan task
        self.dim, self.init_std, self.device = int(dim), float(init_std), torch.device(device)
        self.W, self.y = W, y

    def sample(self, generator: torch.Generator) -> "QuadraticTask":
        dt = torch.get_default_dtype()
        W = torch.randn(self.dim, self.dim, generator=generator, dtype=dt).to(self.device)
        y = torch.randn(self.dim, generator=generator, dtype=dt).to(self.device)
        return QuadraticTask(self.dim, self.init_std, str(self.device), W, y)

    def init(self, generator: torch.Generator) -> Params:
        x = torch.randn(self.dim, generator=generator, dtype=torch.get_default_dtype()) * self.init_std
        return {"x": x.to(self.device)}

    def batch(self, split: str, generator: torch.Generator) -> Batch:
        _check_split(split)
        if self.W is None:
            raise RuntimeError("call task.sample(generator) first: the quadratic family has no fixed problem")
        return (self.W, self.y)

    def full_batch(self, split: str) -> Batch:
        return self.batch(split, None)  # type: ignore[arg-type]

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        W, y = batch
        x = params["x"]
        if x.shape != (self.dim,):
            raise ValueError(f"quadratic expects params['x'] of shape ({self.dim},), got {tuple(x.shape)}")
        r = W @ x - y
        return (r * r).sum()

    def config(self) -> dict:
        return {"dim": self.dim, "init_std": self.init_std}

    def to(self, device):
        self.device = torch.device(device)
        if self.W is not None:
            self.W, self.y = self.W.to(device), self.y.to(device)
        return self
