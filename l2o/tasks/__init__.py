"""Optimizees: every loss is a pure function ``loss(params, batch)``."""
from .base import Batch, BatchStream, DatasetTask, ModuleTask, Params, Task, cross_entropy, seeded
from .conv import ConvTask
from .data import DataNotFoundError
from .mlp import MLPTask
from .quadratic import QuadraticTask
from .registry import TASKS, get, options

__all__ = ["Batch", "BatchStream", "DatasetTask", "seeded", "ConvTask", "DataNotFoundError", "MLPTask", "ModuleTask", "Params", "QuadraticTask", "Task",
           "TASKS", "cross_entropy", "get", "options"]
