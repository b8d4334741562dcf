"""The differentiable-optimizer protocol (optax's init/update, as an ``nn.Module``).

``init(params) -> state`` and ``step(params, grads, state) -> (params, state)`` are
always out-of-place, so a whole training run is one differentiable function of the
optimizer's meta-parameters. Meta-parameters are ``self.parameters()``: a learned
LSTM's weights or a hand-designed optimizer's hyperparameters in unconstrained form
(``log_lr``, ``logit_momentum``), so any ``torch.optim`` optimizer can meta-train them
and ``state_dict()`` checkpoints them.

A hyperparameter given as a number becomes the optimizer's own parameter; given as a
tensor (or a ``dict`` of per-parameter tensors) it is used as is, so gradients flow to
the caller's tensor.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

Params = dict[str, torch.Tensor]
State = dict[str, Any]

# name of the raw parameter and the map raw -> value, per constraint
_TRANSFORMS = {
    "positive": ("log_", torch.exp, math.log),
    "unit": ("logit_", torch.sigmoid, lambda v: math.log(v / (1.0 - v))),
    "real": ("", lambda r: r, lambda v: v),
}


class DifferentiableOptimizer(nn.Module):
    """Base class: hyperparameter bookkeeping shared by every optimizer.

    Subclasses call :meth:`_hparam` in ``__init__`` for each hyperparameter and
    implement :meth:`init` and :meth:`step`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._given: dict[str, Any] = {}
        self._kinds: dict[str, str] = {}
        self._config: dict[str, Any] = {}

    # ------------------------------------------------------------------ hyperparameters
    def _hparam(self, name: str, value: float | torch.Tensor | dict, kind: str) -> None:
        """Register hyperparameter ``name``; numbers become ``nn.Parameter``s in unconstrained form."""
        self._kinds[name] = kind
        prefix, _, inverse = _TRANSFORMS[kind]
        if isinstance(value, (torch.Tensor, dict)):
            self._given[name] = value
            return
        value = float(value)
        if not math.isfinite(value):  # nan passed every check below; inf became a nan step
            raise ValueError(f"{type(self).__name__}: {name} must be a finite number, got {value}")
        if kind == "positive" and value <= 0:
            raise ValueError(f"{type(self).__name__}: {name} must be > 0, got {value}")
        if kind == "unit" and not 0.0 < value < 1.0:
            raise ValueError(f"{type(self).__name__}: {name} must be in (0, 1), got {value}")
        self._config[name] = value
        self.register_parameter(prefix + name, nn.Parameter(torch.tensor(inverse(value), dtype=torch.get_default_dtype())))

    def hparam(self, name: str, key: str | None = None) -> torch.Tensor:
        """The constrained value of hyperparameter ``name`` (for parameter ``key`` if per-parameter)."""
        if name in self._given:
            v = self._given[name]
            return v[key] if isinstance(v, dict) else v
        prefix, forward, _ = _TRANSFORMS[self._kinds[name]]
        return forward(getattr(self, prefix + name))

    def hparam_getter(self, name: str):
        """``key -> hparam(name, key)``, with a value shared by all keys computed once (one op per step, not per tensor)."""
        if name in self._given and isinstance(self._given[name], dict):
            return self._given[name].__getitem__
        value = self.hparam(name)
        return lambda key: value

    def hparams(self) -> dict[str, float]:
        """Current scalar hyperparameter values, for logging."""
        out = {}
        for name in self._kinds:
            v = self._given.get(name) if name in self._given else self.hparam(name)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                out[name] = float(v.detach())
        return out

    def learn(self, names: list[str] | None) -> "DifferentiableOptimizer":
        """Make only ``names`` (hyperparameter names, e.g. ``["lr"]``) trainable; None = all."""
        unknown = [n for n in (names or []) if n not in self._kinds]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no hyperparameter {unknown[0]!r}; "
                             f"it has {', '.join(self._kinds) or 'none (leave --learn out to learn its weights)'}")
        for name, kind in self._kinds.items():
            raw = getattr(self, _TRANSFORMS[kind][0] + name, None)
            if isinstance(raw, nn.Parameter):
                raw.requires_grad_(names is None or name in names)
        return self

    def project_(self) -> None:
        """Keep hyperparameters valid after an outer step (constraints are in the parametrisation)."""

    def default_update_every(self, truncation: int, horizon: int) -> int:
        """Inner steps between meta-updates when the user asks for none: once per run (a few hyperparameters)."""
        return horizon

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this optimizer (weights come from ``state_dict``)."""
        return {"type": type(self).__name__, **self._config}

    def scalars(self, names: tuple[str, ...], keys: list[str]) -> dict[str, float] | None:
        """Hyperparameters as Python numbers for the fused no-graph step, or None.

        None (use the differentiable step) while autograd records, or when a
        hyperparameter is per-weight or differs between parameters. Without a graph a
        hyperparameter is a constant, so each one is read once per step and the update
        runs as a few ``torch._foreach_*`` calls over all tensors, the way
        ``torch.optim``'s foreach implementations do.
        """
        if torch.is_grad_enabled() or not keys:
            return None
        out = {}
        for name in names:
            if name in self._given:
                given = self._given[name]
                values = [given[k] for k in keys] if isinstance(given, dict) else [given]
                if any(not isinstance(v, torch.Tensor) or v.numel() != 1 for v in values):
                    return None
                first = float(values[0])
                if any(v is not values[0] and float(v) != first for v in values[1:]):
                    return None
                out[name] = first
            else:
                out[name] = float(self.hparam(name))
        return out

    # ------------------------------------------------------------------ protocol
    def init(self, params: Params) -> State:
        raise NotImplementedError

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        raise NotImplementedError

    def fused_names(self) -> tuple[str, ...]:
        """Hyperparameters read by the fused no-graph path (``_fused``); () when there is none."""
        return ()

    def _try_fused(self, params: Params, grads: Params, state: State, inplace: bool) -> tuple[Params, State] | None:
        """The fused no-graph step when :meth:`scalars` allows it, else None."""
        names = self.fused_names()
        if not names:
            return None
        keys = list(params)
        h = self.scalars(names, keys)
        return None if h is None else self._fused(keys, params, grads, state, h, inplace)

    def _fused(self, keys: list[str], params: Params, grads: Params, state: State, h: dict[str, float],
               inplace: bool) -> tuple[Params, State]:
        raise NotImplementedError

    def step_(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """``step`` without a graph that may write the result into ``params``' and ``state``'s tensors.

        For callers that own those tensors and drop them after the step (``unroll``
        without a graph, the ``torch.optim`` adapter): the update is the same arithmetic
        as :meth:`step`, in place, as ``torch.optim`` updates, so a large model's step
        allocates nothing. The given tensors must not be used afterwards except through
        the returned ``(params, state)``. Call it under ``torch.no_grad()``. By default
        it is :meth:`step` where no fused path applies.
        """
        out = self._try_fused(params, grads, state, True)
        return out if out is not None else self.step(params, grads, state)


def foreach(op: str, inplace: bool, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """``torch._foreach_<op>(tensors, ...)``: into ``tensors`` themselves (returned) or out of place.

    One expression serves both kinds of step, so the in-place and the out-of-place
    update run the very same kernels (bitwise equal results).
    """
    if inplace:
        getattr(torch, f"_foreach_{op}_")(tensors, *args, **kwargs)
        return tensors
    return getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs)


class substitute:
    """Context manager: inside it, ``opt`` uses ``mapping[id(t)]`` wherever it used tensor ``t``.

    Covers both kinds of hyperparameter: tensors given to the constructor and the
    optimizer's own ``nn.Parameter``s. Forward-mode differentiation uses it to swap a
    meta-parameter for its dual number without touching the caller's tensors.
    """

    def __init__(self, opt: nn.Module, mapping: dict[int, torch.Tensor]) -> None:
        self.opt, self.mapping, self._undo = opt, mapping, []

    def __enter__(self) -> nn.Module:
        for mod in self.opt.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and id(p) in self.mapping:
                    self._undo.append((mod._parameters, name, p))
                    mod._parameters[name] = self.mapping[id(p)]
            given = getattr(mod, "_given", None)
            if given:
                for name, v in list(given.items()):
                    if isinstance(v, dict):
                        if any(id(t) in self.mapping for t in v.values()):
                            self._undo.append((given, name, v))
                            given[name] = {k: self.mapping.get(id(t), t) for k, t in v.items()}
                    elif id(v) in self.mapping:
                        self._undo.append((given, name, v))
                        given[name] = self.mapping[id(v)]
        return self.opt

    def __exit__(self, *exc) -> None:
        for container, name, value in reversed(self._undo):
            container[name] = value
        self._undo.clear()
