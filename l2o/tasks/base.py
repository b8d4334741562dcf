"""The Task protocol and the nn.Module -> pure-function adapter.

A task is an optimizee family. ``sample(generator)`` draws one problem of the family
(for the quadratic family a fresh ``W, y``; dataset tasks return themselves),
``init(generator)`` draws initial parameters, ``batch(split, generator)`` draws a
minibatch and ``loss(params, batch)`` is a *pure* function of the parameters: it
mutates nothing, so it may be called on parameters that carry an autograd graph or
forward-mode tangents. Only this layer touches ``higher``.
"""
from __future__ import annotations

from typing import Any, Callable

import higher
import torch
from torch import nn

Params = dict[str, torch.Tensor]
Batch = Any


class Task:
    """Base class of every optimizee.

    Subclasses implement :meth:`init`, :meth:`batch` and :meth:`loss`; tasks whose
    problems differ per sample (the quadratic family) override :meth:`sample`.
    """

    name: str = "task"

    def sample(self, generator: torch.Generator) -> "Task":
        """Return one problem of the family; dataset tasks are one problem."""
        return self

    def init(self, generator: torch.Generator) -> Params:
        raise NotImplementedError

    def batch(self, split: str, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def accuracy(self, params: Params, batch: Batch) -> torch.Tensor | None:
        """Classification accuracy on ``batch``, or None for regression tasks."""
        return None

    def full_batch(self, split: str) -> Batch | None:
        """The whole split as one batch (for evaluation), or None if not applicable."""
        return None

    def config(self) -> dict:
        """The options that rebuild this task with :func:`l2o.tasks.get`."""
        return {}

    def to(self, device: torch.device | str) -> "Task":
        return self


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class ModuleTask(Task):
    """A task whose model is an ``nn.Module`` made functional by ``higher.monkeypatch``.

    The module is built once, as a template; ``init`` re-runs its parameter
    initialisation under ``generator`` and returns copies, so the template is never
    trained. ``loss`` runs the template on the given tensors: for a module without
    buffers (every built-in task) the tensors are swapped into the template's
    parameter slots for the duration of one call and the originals put back, as
    ``torch.func.functional_call`` does but without its per-call bookkeeping (about
    half the Python overhead of ``higher``'s patched module); modules with buffers go
    through ``higher.monkeypatch``. Either way the call is pure and works on tensors
    that carry a graph or forward-mode tangents.

    Args:
        build: zero-argument callable returning the ``nn.Module``.
        criterion: ``criterion(logits, y) -> scalar``.
    """

    def __init__(self, build: Callable[[], nn.Module], criterion: Callable) -> None:
        self._build = build
        self.module = build()
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"the model builder returned a {type(self.module).__name__}, not an nn.Module; "
                            f"give a function or class that returns the model, e.g. `lambda: MyNet()`")
        self.names = [n for n, _ in self.module.named_parameters()]
        if not self.names:
            raise ValueError(f"the model ({type(self.module).__name__}) has no parameters to optimize")
        self.fmodel = higher.monkeypatch(self.module, copy_initial_weights=True, track_higher_grads=False)
        self.criterion = criterion
        self.device = torch.device("cpu")
        self.dtype = torch.get_default_dtype()
        self._slots = self._parameter_slots()

    def _parameter_slots(self) -> list[tuple[dict, str, str]] | None:
        """``(owner's _parameters dict, local name, full name)`` per parameter; None if the module has buffers."""
        if any(True for _ in self.module.buffers()):
            return None
        slots = []
        for mod_name, mod in self.module.named_modules():
            for local in mod._parameters:
                if mod._parameters[local] is not None:
                    slots.append((mod._parameters, local, f"{mod_name}.{local}" if mod_name else local))
        return slots if [s[2] for s in slots] == self.names else None

    def init(self, generator: torch.Generator) -> Params:
        # Reproducible init that does not touch the global RNG: seed a fresh module.
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._build()
        return {n: p.detach().to(self.device, self.dtype).clone() for n, p in fresh.named_parameters()}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"params lack {missing}; expected keys {self.names}")
        if self._slots is None:
            return self.fmodel(x, params=[params[n] for n in self.names])
        saved = [slot[local] for slot, local, _ in self._slots]
        try:
            for slot, local, name in self._slots:
                slot[local] = params[name]
            return self.module(x)
        finally:  # the template keeps its own tensors whatever happens: the call stays pure
            for (slot, local, _), t in zip(self._slots, saved):
                slot[local] = t

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        x, y = batch
        return self.criterion(self.forward(params, x), y)

    def accuracy(self, params: Params, batch: Batch) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            return (self.forward(params, x).argmax(-1) == y).to(x.dtype).mean()

    def to(self, device: torch.device | str) -> "ModuleTask":
        self.device = torch.device(device)
        self.module.to(self.device)
        self.fmodel = higher.monkeypatch(self.module, copy_initial_weights=True, track_higher_grads=False)
        self._slots = self._parameter_slots()
        return self


class DatasetTask(ModuleTask):
    """A :class:`ModuleTask` trained on minibatches of an in-memory dataset (``self.batch_size``)."""

    batch_size: int

    def load_splits(self, dataset: str, data_dir: str | None) -> None:
        from . import data

        self._splits = {s: data.load(dataset, s, data_dir, self.device) for s in ("train", "test")}

    def batch(self, split: str, generator: torch.Generator) -> Batch:
        _check_split(split)
        return self._splits[split].sample(self.batch_size, generator)

    def full_batch(self, split: str) -> Batch:
        _check_split(split)
        ds = self._splits[split]
        return ds.x, ds.y


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written with log_softmax (forward-mode AD safe)."""
    return -logits.log_softmax(-1).gather(-1, y[:, None]).mean()


class BatchStream:
    """The minibatch sequence of one optimizee run: batch ``t`` is the same however often it is asked for.

    Batches are drawn in order from ``generator`` on first request and cached for a
    few steps (forward mode evaluates the same step once per tangent direction).
    Two runs built from equally seeded generators see identical batches, whatever
    optimizer consumes them.
    """

    def __init__(self, task: Task, split: str, generator: torch.Generator, keep: int = 4) -> None:
        self.task, self.split, self.generator, self.keep = task, split, generator, keep
        self._cache: dict[int, Batch] = {}
        self._next = 0

    def __getitem__(self, t: int) -> Batch:
        if t in self._cache:
            return self._cache[t]
        if t < self._next:
            raise IndexError(f"batch {t} was already dropped from the stream (kept: {sorted(self._cache)})")
        while self._next <= t:
            self._cache[self._next] = self.task.batch(self.split, self.generator)
            self._next += 1
        for old in [k for k in self._cache if k < t - self.keep]:
            del self._cache[old]
        return self._cache[t]


def seeded(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for ``(seed, stream)``: stream 0 problem + init, 1 training batches, 2 evaluation batches."""
    return torch.Generator().manual_seed(int(seed) * 1000003 + int(stream))
