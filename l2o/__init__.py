"""l2o: learning to learn in PyTorch.

A coordinatewise LSTM optimizer and hand-designed optimizers with learnable
hyperparameters, meta-trained through one shared unroll with reverse, truncated,
forward-mode and implicit hypergradients.
"""
from __future__ import annotations

import os

from . import hypergrad, optim, tasks
from .torch_optimizer import LearnedOptimizer

__version__ = "0.1.0"


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def load_optimizer(path: str, map_location: str = "cpu", which: str = "best"):
    """Rebuild a saved optimizer (learned LSTM or learned hyperparameters) from a checkpoint file.

    Args:
        path: a file written by ``meta_train.py``, or the name of a shipped checkpoint
            (``"lstm_mnist"``, ``"lstm_cifar10"``: ``checkpoints/<name>.pt`` of this
            repository), which works from any working directory.
        map_location: device for the tensors.
        which: ``"best"`` by validation (default; the current weights if the run kept
            none) or ``"current"`` (the latest weights).

    Raises:
        ValueError: ``which`` is neither, or ``map_location`` is not a usable device;
            :class:`l2o.checkpoint.CheckpointError` (a ValueError) for a missing,
            unreadable or foreign file. TypeError: ``path`` is not a str or os.PathLike.
    """
    from .checkpoint import load_optimizer as _load

    return _load(path, map_location, which)  # a shipped name is resolved there


__all__ = ["LearnedOptimizer", "hypergrad", "load_optimizer", "optim", "tasks", "__version__"]
