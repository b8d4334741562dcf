"""Optimizees: every loss is a pure function ``loss(params, batch)``."""
from .base import Batch, BatchStream, DatasetTask, ModuleTask, Params, Task, cross_entropy, seeded
from .conv import ConvTask
from .data import DataNotFoundError
from .families import FAMILIES, Family, Member, Mixture, TaskFamily, register_family
from .families import parse as family
from .mlp import MLPTask
from .quadratic import QuadraticTask
from .registry import TASKS, check, get, options, register, resolve
from .user import UserTask, from_module

__all__ = ["Batch", "BatchStream", "DatasetTask", "seeded", "ConvTask", "DataNotFoundError", "FAMILIES", "Family", "Member",
           "Mixture", "TaskFamily", "family", "register_family", "MLPTask", "ModuleTask", "Params", "QuadraticTask", "Task",
           "TASKS", "UserTask", "check", "cross_entropy", "from_module", "get", "options", "register", "resolve"]
