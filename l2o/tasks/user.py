"""Tasks from one's own code: ``from_module(build_model, train_data, ...)``.

    import torch.nn.functional as F
    import l2o

    def make_task():
        return l2o.tasks.from_module(lambda: MyNet(), train_set, test_set, loss=F.cross_entropy, batch_size=64)

    l2o.tasks.register("my_net", make_task)      # or, from the CLIs: --task my_package.tasks:make_task

The model is any ``nn.Module`` factory; the data any map-style
``torch.utils.data.Dataset`` of ``(x, y)`` pairs, a ``TensorDataset`` or an ``(x, y)``
pair of tensors. The data are read once into memory as two tensors (as the built-in
tasks do), so drawing a minibatch is one ``index_select`` and the loss stays a pure
function of the parameters.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Batch, DatasetTask, cross_entropy
from .data import ArrayDataset

Data = Any  # Dataset | TensorDataset | tuple[Tensor, Tensor]


def _as_tensors(data: Data, what: str, dtype: torch.dtype) -> ArrayDataset:
    """``(x, y)`` tensors from a pair of tensors or a map-style dataset of ``(x, y)`` pairs."""
    tensors = getattr(data, "tensors", None)  # TensorDataset: no per-item loop
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(tensors, tuple) and len(tensors) == 2:
        x, y = tensors
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError(f"{what} is empty")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items[:1]):
            raise ValueError(f"{what} must yield (x, y) pairs, got {type(items[0]).__name__}")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
    else:
        raise TypeError(f"{what} must be a map-style Dataset of (x, y) pairs or an (x, y) pair of tensors, "
                        f"got {type(data).__name__}")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: x and y need the same, positive number of examples, got {x.shape[0]} and {y.shape[0]}")
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    return ArrayDataset(x.detach().clone(), y.detach().clone())


class UserTask(DatasetTask):
    """A task made by :func:`from_module` (see there for the arguments)."""

    def __init__(self, build: Callable[[], nn.Module], train_data: Data, test_data: Data | None = None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy, batch_size: int = 128,
                 name: str = "user", device: str | torch.device = "cpu") -> None:
        if isinstance(build, nn.Module) or not callable(build):
            raise TypeError("from_module needs a function that builds the model (e.g. `lambda: MyNet()` or the class "
                            "MyNet), so that every seed starts from freshly initialised weights")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        with torch.random.fork_rng(devices=[]):  # the template's initialisation must not move the global RNG
            super().__init__(build, loss)
        self.name, self.batch_size = name, int(batch_size)
        train = _as_tensors(train_data, "train_data", self.dtype)
        test = train if test_data is None else _as_tensors(test_data, "test_data", self.dtype)
        self._splits = {"train": train, "test": test}
        self.classification = not train.y.is_floating_point()
        self.options: dict[str, Any] = {}  # the options it was built with (set by l2o.tasks.get)
        self.to(device)

    def accuracy(self, params, batch: Batch) -> torch.Tensor | None:
        return super().accuracy(params, batch) if self.classification else None

    def config(self) -> dict:
        return dict(self.options)

    def to(self, device: torch.device | str) -> "UserTask":
        super().to(device)
        if hasattr(self, "_splits"):
            self._splits = {s: ArrayDataset(d.x.to(self.device), d.y.to(self.device)) for s, d in self._splits.items()}
        return self


def from_module(build: Callable[[], nn.Module], train_data: Data, test_data: Data | None = None,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy, batch_size: int = 128,
                name: str = "user", device: str | torch.device = "cpu") -> UserTask:
    """A Task from one's own model and data.

    Args:
        build: zero-argument callable returning the ``nn.Module`` (a class works); it is
            called once as a template and once per ``init`` under a seeded RNG, so every
            seed starts from fresh weights. Buffers (e.g. BatchNorm statistics) are the
            template's; the loss is pure in the parameters only.
        train_data: map-style ``Dataset`` of ``(x, y)`` pairs, a ``TensorDataset`` or
            an ``(x, y)`` pair of tensors; read once into memory. Floating ``x`` and ``y``
            are cast to the default dtype.
        test_data: the same for the ``test`` split (default: the training data).
        loss: ``loss(model(x), y) -> scalar`` (default: cross-entropy that also works in
            forward mode). Integer targets make it a classification task (accuracy).
        batch_size: minibatch size (examples drawn with replacement, as the built-ins).
        name: the task's name in logs and reports.
        device: where parameters and data live.

    Returns:
        A :class:`l2o.tasks.Task` usable everywhere a built-in one is (meta-training,
        evaluation, task families).
    """
    return UserTask(build, train_data, test_data, loss, batch_size, name, device)
