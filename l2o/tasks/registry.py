"""``l2o.tasks.get(name, **options)``: the task registry."""
from __future__ import annotations

import inspect
from typing import Callable

from .base import Task
from .conv import ConvTask
from .mlp import MLPTask
from .quadratic import QuadraticTask

TASKS: dict[str, Callable[..., Task]] = {
    "quadratic": QuadraticTask,
    "mnist_mlp": lambda **kw: MLPTask(dataset="mnist", **kw),
    "fashion_mnist_mlp": lambda **kw: MLPTask(dataset="fashion_mnist", **kw),
    "cifar10_conv": ConvTask,
}
_SIGNATURES = {"quadratic": QuadraticTask, "mnist_mlp": MLPTask, "fashion_mnist_mlp": MLPTask, "cifar10_conv": ConvTask}


def options(name: str) -> list[str]:
    """The option names accepted by task ``name``."""
    params = inspect.signature(_SIGNATURES[name].__init__).parameters
    return [p for p in params if p not in ("self", "dataset", "W", "y")]


def get(name: str, **opts) -> Task:
    """Build a task by name.

    Args:
        name: one of ``quadratic``, ``mnist_mlp``, ``fashion_mnist_mlp``, ``cifar10_conv``.
        **opts: task options (e.g. ``hidden=[40]``, ``activation="relu"``, ``data_dir=...``).

    Raises:
        ValueError: unknown task or option, with the valid choices in the message.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    bad = [k for k in opts if k not in options(name)]
    if bad:
        raise ValueError(f"task {name!r} has no option {bad[0]!r}; options: {', '.join(options(name))}")
    task = TASKS[name](**opts)
    task.name = name
    return task
