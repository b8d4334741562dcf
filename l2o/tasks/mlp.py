"""MLP classifiers on MNIST-like images (the L2L paper's MNIST optimizee)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import DatasetTask, cross_entropy

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def build_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_dim
    for h in hidden:
        layers += [nn.Linear(prev, h), ACTIVATIONS[activation]()]
        prev = h
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


class MLPTask(DatasetTask):
    """Cross-entropy MLP on 28x28 grey images.

    Args:
        dataset: ``mnist`` or ``fashion_mnist``.
        hidden: hidden layer sizes (default one layer of 20, as in the L2L paper).
        activation: ``sigmoid`` (default), ``relu``, ``tanh`` or ``elu``.
        batch_size: minibatch size (default 128).
        data_dir: data root (see :func:`l2o.tasks.data.data_root`).
    """

    def __init__(self, dataset: str = "mnist", hidden: Sequence[int] | int = (20,), activation: str = "sigmoid",
                 batch_size: int = 128, data_dir: str | None = None, device: str = "cpu") -> None:
        hidden = [hidden] if isinstance(hidden, (int, str)) else list(hidden)
        for v in (batch_size, *hidden):  # 2.5 units were silently 2
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError(f"batch_size and hidden sizes must be positive integers, got {v!r}")
        hidden = [int(h) for h in hidden]
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if batch_size < 1 or any(h < 1 for h in hidden):
            raise ValueError("batch_size and hidden sizes must be positive")
        self.dataset, self.hidden, self.activation = dataset, hidden, activation
        self.batch_size, self.data_dir = int(batch_size), data_dir
        self.name = f"{dataset}_mlp"
        super().__init__(lambda: build_mlp(28 * 28, hidden, 10, activation), cross_entropy)
        self.to(device)
        self.load_splits(dataset, data_dir)

    def config(self) -> dict:
        return {"hidden": list(self.hidden), "activation": self.activation, "batch_size": self.batch_size}
