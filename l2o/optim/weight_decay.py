"""Learnable L2 weight decay as a wrapper around any differentiable optimizer.

``WeightDecay(base, wd)`` feeds ``base`` the gradient of ``loss + 0.5 * sum_k wd_k * p_k**2``:

    g_k  <-  g_k + wd_k * p_k
    params, state = base.step(params, g, state)

(coupled L2, as ``torch.optim``'s ``weight_decay`` argument). The decay is one positive
scalar, one positive value per weight (Lorraine et al. 2019: ~600k hyperparameters for
an MLP), or tensors given by the caller. :meth:`WeightDecay.penalty` is the same term on
the loss side, the form implicit differentiation needs (``inner_loss = loss + penalty``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import DifferentiableOptimizer, Params, State
from .penalty import penalty as _penalty


def softplus_inverse(value: float) -> float:
    """``x`` with ``softplus(x) == value`` (stable for small and large ``value``)."""
    return value + math.log(-math.expm1(-value))


def module_key(name: str) -> str:
    """A parameter name usable as a module attribute (``"1.weight"`` -> ``"1_weight"``)."""
    return name.replace(".", "_")


class WeightDecay(DifferentiableOptimizer):
    """Wraps an optimizer: ``step(params, grads + wd * params, state)``.

    Args:
        base: the wrapped optimizer, or its :meth:`config` dict (rebuilt with
            :func:`l2o.optim.from_config`, so a wrapper's config rebuilds the pair).
        weight_decay: a number (initial value of a learnable decay), or a tensor /
            ``{param name: tensor}`` used as given (gradients reach the caller's tensors).
        shapes: with a number, ``{param name: shape}`` asks for one learnable decay per
            weight (softplus-positive); without it the decay is one learnable scalar
            (stored as ``log_weight_decay``).
    """

    def __init__(self, base: DifferentiableOptimizer | dict, weight_decay: float | torch.Tensor | dict = 1e-4,
                 shapes: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        if isinstance(base, dict):
            from . import from_config  # late import: the package registers this class

            base = from_config(base)
        if not isinstance(base, DifferentiableOptimizer):
            raise TypeError(f"WeightDecay wraps a DifferentiableOptimizer or its config dict, "
                            f"got {type(base).__name__}")
        self.base = base
        self._shapes: dict[str, list[int]] | None = None
        self._keys: dict[str, str] = {}
        if isinstance(weight_decay, (torch.Tensor, dict)):
            if shapes is not None:
                raise ValueError("WeightDecay: shapes apply only to a numeric weight_decay "
                                 "(its learnable per-weight form)")
            self._hparam("weight_decay", weight_decay, "positive")
            self._init_value = float(torch.stack([torch.as_tensor(v).detach().float().mean() for v in
                                                  (weight_decay.values() if isinstance(weight_decay, dict)
                                                   else [weight_decay])]).mean())
        elif shapes is None:
            self._hparam("weight_decay", weight_decay, "positive")
            self._init_value = float(weight_decay)
        else:
            value = float(weight_decay)
            if value <= 0:
                raise ValueError(f"WeightDecay: weight_decay must be > 0, got {value}")
            self._kinds["weight_decay"] = "softplus"
            self._shapes = {str(k): [int(s) for s in v] for k, v in shapes.items()}
            self._keys = {k: module_key(k) for k in self._shapes}
            if len(set(self._keys.values())) != len(self._keys):
                raise ValueError(f"WeightDecay: parameter names {sorted(self._shapes)} collide once '.' becomes '_'")
            raw = softplus_inverse(value)
            self.raw_weight_decay = nn.ParameterDict({
                self._keys[k]: nn.Parameter(torch.full(s, raw, dtype=torch.get_default_dtype()))
                for k, s in self._shapes.items()})
            self._init_value = value

    # ------------------------------------------------------------------ the decay
    @property
    def per_weight(self) -> bool:
        """True when the decay is learned per weight (``shapes`` given)."""
        return self._shapes is not None

    def decay(self, key: str) -> torch.Tensor:
        """The positive decay for parameter ``key`` (a scalar or a tensor shaped like it)."""
        if not self.per_weight:
            return super().hparam("weight_decay", key)
        if key not in self._keys:
            raise KeyError(f"WeightDecay has per-weight decays for {sorted(self._keys)}, not for {key!r}")
        return F.softplus(self.raw_weight_decay[self._keys[key]])

    def hparam(self, name: str, key: str | None = None) -> torch.Tensor:
        """``weight_decay`` (for parameter ``key``) or, for any other name, the base optimizer's hyperparameter."""
        if name != "weight_decay":
            return self.base.hparam(name, key)
        if self.per_weight:
            if key is None:
                raise ValueError("the decay is learned per weight: ask for hparam('weight_decay', key)")
            return self.decay(key)
        return super().hparam(name, key)

    def penalty(self, params: Params) -> torch.Tensor:
        """``0.5 * sum_k sum(decay(k) * params[k]**2)``: the decay as a term of the training loss.

        Its derivatives are written out (:mod:`l2o.optim.penalty`): implicit
        differentiation takes its gradient with a graph and differentiates that again.
        A per-weight decay enters through a view of its raw tensor (so the backward can
        tell whether the decay's gradient is asked for) with the cached softplus value
        and slope; gradients reach the raw tensor as through ``softplus``.
        """
        if not self.per_weight:
            return sum(_penalty(p, self.decay(k)) for k, p in params.items())
        unknown = [k for k in params if k not in self._keys]
        if unknown:
            self.decay(unknown[0])  # raises the error that names the known keys
        raw = {k: self.raw_weight_decay[self._keys[k]] for k in params}
        return sum(_penalty(p, raw[k].view_as(raw[k]), self._decay_constant(k), self._decay_constant(k, slope=True),
                            soft=True) for k, p in params.items())

    def hparams(self) -> dict[str, float]:
        """The base optimizer's scalar hyperparameters plus ``weight_decay`` (its mean if per weight)."""
        out = dict(self.base.hparams())
        if self.per_weight:
            with torch.no_grad():
                total = sum(float(F.softplus(r).sum()) for r in self.raw_weight_decay.values())
                out["weight_decay"] = total / max(1, sum(r.numel() for r in self.raw_weight_decay.values()))
        else:
            v = self.hparam("weight_decay")
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                out["weight_decay"] = float(v.detach())
        return out

    def learn(self, names: list[str] | None) -> "WeightDecay":
        """Train only ``names``: ``weight_decay`` toggles the decay, the rest go to ``base.learn``; None = all."""
        known = ["weight_decay", *self.base._kinds]
        unknown = [n for n in (names or []) if n not in known]
        if unknown:
            raise ValueError(f"WeightDecay({type(self.base).__name__}) has no hyperparameter {unknown[0]!r}; "
                             f"it has {', '.join(known)}")
        on = names is None or "weight_decay" in names
        if self.per_weight:
            for p in self.raw_weight_decay.values():
                p.requires_grad_(on)
        elif isinstance(getattr(self, "log_weight_decay", None), nn.Parameter):
            self.log_weight_decay.requires_grad_(on)
        self.base.learn(None if names is None else [n for n in names if n != "weight_decay"])
        return self

    def config(self) -> dict[str, Any]:
        return {"type": "WeightDecay", "base": self.base.config(), "weight_decay": self._init_value,
                "shapes": None if self._shapes is None else {k: list(v) for k, v in self._shapes.items()}}

    def project_(self) -> None:
        self.base.project_()

    # ------------------------------------------------------------------ protocol
    def init(self, params: Params) -> State:
        return self.base.init(params)

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        return self.base.step(params, self._decayed(params, grads), state)

    def step_(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        return self.base.step_(params, self._decayed(params, grads), state)

    def _decayed(self, params: Params, grads: Params) -> Params:
        """``g + decay * p`` for every parameter (new tensors: the caller's gradients stay as they were)."""
        if not torch.is_grad_enabled():  # no graph: one fused call over all tensors
            keys = list(params)
            g = [grads[k] for k in keys]
            if self.per_weight:
                return dict(zip(keys, torch._foreach_addcmul(g, [self._decay_constant(k) for k in keys],
                                                             list(params.values()))))
            wd = self.scalars(("weight_decay",), keys)
            if wd is not None:
                return dict(zip(keys, torch._foreach_add(g, list(params.values()), alpha=wd["weight_decay"])))
        return {k: grads[k] + self.decay(k) * p for k, p in params.items()}

    def _decay_constant(self, key: str, slope: bool = False) -> torch.Tensor:
        """``decay(key)`` (or with ``slope`` its derivative ``sigmoid(raw)``) without a graph, cached.

        softplus over every weight costs as much as the rest of a step; without a graph
        the value is a constant until the outer optimizer updates the raw tensor in
        place (which bumps its version counter) or another tensor is substituted. The
        slope is computed on first use (the penalty's mixed derivative).
        """
        raw = self.raw_weight_decay[self._keys[key]]
        cache = self.__dict__.setdefault("_decay_cache", {})
        hit = cache.get(key)
        if hit is None or hit[0] is not raw or hit[1] != raw._version:
            hit = cache[key] = [raw, raw._version, F.softplus(raw.detach()), None]
        if not slope:
            return hit[2]
        if hit[3] is None:
            hit[3] = torch.sigmoid(raw.detach())
        return hit[3]
