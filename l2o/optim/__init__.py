"""Differentiable optimizers: hand-designed baselines and the learned LSTM, one protocol."""
from __future__ import annotations

from typing import Any

from .base import DifferentiableOptimizer, Params, State
from .handcrafted import SGD, Adam, Momentum, MomentumInvDecay, RMSprop, safe_sqrt
from .lstm import LSTMOptimizer
from .adaptive_scale import AdaptiveScale
from .weight_decay import WeightDecay
from .sum import Sum

CLASSES = {c.__name__: c for c in (SGD, Momentum, MomentumInvDecay, Adam, RMSprop, LSTMOptimizer, WeightDecay, AdaptiveScale, Sum)}

# short names used on the command line
NAMES = {
    "sgd": (SGD, {}),
    "momentum": (Momentum, {}),
    "nesterov": (Momentum, {"nesterov": True}),
    "momentum_inv_decay": (MomentumInvDecay, {}),
    "adam": (Adam, {}),
    "rmsprop": (RMSprop, {}),
    "lstm": (LSTMOptimizer, {}),
}


def make(name: str, **kwargs: Any) -> DifferentiableOptimizer:
    """Build an optimizer from its short name (``sgd``, ``nesterov``, ``adam``, ``lstm`` ...)."""
    if name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}")
    cls, fixed = NAMES[name]
    try:
        return cls(**{**fixed, **kwargs})
    except TypeError as exc:
        raise ValueError(f"bad options for optimizer {name!r}: {exc}") from None


def from_config(config: dict[str, Any]) -> DifferentiableOptimizer:
    """Rebuild an optimizer from :meth:`DifferentiableOptimizer.config` (weights are loaded separately)."""
    config = dict(config)
    cls = CLASSES.get(config.pop("type", None))
    if cls is None:
        raise ValueError(f"optimizer config names no known type: {config}")
    return cls(**config)


__all__ = ["AdaptiveScale", "Adam", "CLASSES", "DifferentiableOptimizer", "LSTMOptimizer", "Momentum", "MomentumInvDecay", "NAMES",
           "Params", "RMSprop", "SGD", "State", "Sum", "WeightDecay", "from_config", "make",
           "safe_sqrt"]
