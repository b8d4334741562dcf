"""l2o: learning to learn in PyTorch.

A coordinatewise LSTM optimizer and hand-designed optimizers with learnable
hyperparameters, meta-trained through one shared unroll with reverse, truncated,
forward-mode and implicit hypergradients.
"""
from __future__ import annotations

from . import hypergrad, optim, tasks
from .torch_optimizer import LearnedOptimizer

__version__ = "0.1.0"


def load_optimizer(path: str, map_location: str = "cpu"):
    """Rebuild a saved optimizer (learned LSTM or learned hyperparameters) from a checkpoint file."""
    from .checkpoint import load_optimizer as _load

    return _load(path, map_location)


__all__ = ["LearnedOptimizer", "hypergrad", "load_optimizer", "optim", "tasks", "__version__"]
