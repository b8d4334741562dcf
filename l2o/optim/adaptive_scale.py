"""A global step size adapted online by hypergradient descent, around any optimizer.

``AdaptiveScale(base, beta)`` multiplies ``base``'s update by ``exp(s_t)``, one scalar
per run, and moves ``s`` by the cosine between the new gradient and the last update
(the multiplicative hypergradient-descent rule of Baydin et al. 2018, "Online Learning
Rate Adaptation with Hypergradient Descent"):

    c_t     = -<g_t, u_{t-1}> / (|g_t| |u_{t-1}|)       (in [-1, 1]; 0 at the first step)
    s_t     = clamp(s_{t-1} + beta * k_t * c_t, min_log_scale, max_log_scale)
              k_t = 1 where c_t >= 0, ``shrink`` where c_t < 0 (1 by default: Baydin et al.'s rule)
    u_t     = exp(s_t) * (base update from g_t)
    theta  <- theta + u_t

While the gradient keeps pointing along the last step (``c > 0``) the steps were too
short and grow; when it turns against it (``c < 0``) they were too long and shrink. A
learned optimizer meta-trained on one task has that task's step size built into its
weights; this wrapper lets it (or Adam) reach the right scale on a task whose losses
and curvature differ by orders of magnitude, which is what a tuned baseline gets from
its learning-rate grid. ``beta`` is a learnable meta-parameter (``log_beta``), so
meta-training can set how fast the scale adapts; the rule is differentiable end to end.

``shrink < 1`` lets the scale fall more slowly than it grows. The one-step cosine is the
greedy hypergradient: where minibatch noise dominates, its mean is slightly negative (the
noise a step injects outweighs its progress over one step) although larger steps still pay
over the rest of the run, so the plain rule anneals the steps too early (the short-horizon
bias of Wu et al. 2018, inside the rule). A steady oscillation (c near -1) still shrinks
them quickly.

``min_log_scale`` (default ``-max_log_scale``) bounds how far the rule may anneal: with
e.g. -0.5 the steps never fall below ``e^-0.5 = 0.61`` of the base optimizer's. Where the
one-step cosine keeps reading slightly negative while larger steps still pay over the
run (convnets over a few hundred steps, regression losses far from order 1), a floor
under a hand-designed part keeps it near its own learning rate instead of annealing it
to a few percent of it.

The cosine couples all coordinates of a run, so the state holds the last update of
every coordinate (``u``) and the scalar ``s``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import DifferentiableOptimizer, Params, State

MAX_LOG_SCALE = 6.0  # the scale stays within e^-6 .. e^6 of the base optimizer's steps


class AdaptiveScale(DifferentiableOptimizer):
    """Wraps an optimizer: its updates times ``exp(s)``, ``s`` adapted by hypergradient descent.

    Args:
        base: the wrapped optimizer, or its :meth:`config` dict.
        beta: initial adaptation rate of the log-scale per step (learnable, > 0).
        max_log_scale: bound on ``|s|``.
        min_log_scale: lowest ``s`` (default ``-max_log_scale``; within ``-max_log_scale ..
            init_log_scale``): how far below the base optimizer's steps the rule may go.
        init_log_scale: ``s`` at the start of every run (0: the base optimizer's own step
            size; below 0 starts cautiously and lets the rule grow the steps).
        shrink: factor on the rate where the cosine is negative (> 0; 1: the same rate both
            ways; below 1 the steps shrink more slowly than they grow).
    """

    def __init__(self, base: DifferentiableOptimizer | dict, beta: float = 0.1,
                 max_log_scale: float = MAX_LOG_SCALE, init_log_scale: float = 0.0, shrink: float = 1.0,
                 min_log_scale: float | None = None) -> None:
        super().__init__()
        if isinstance(base, dict):
            from . import from_config  # late import: the package registers this class

            base = from_config(base)
        if not isinstance(base, DifferentiableOptimizer):
            raise TypeError(f"AdaptiveScale wraps a DifferentiableOptimizer or its config dict, got {type(base).__name__}")
        if not max_log_scale > 0:
            raise ValueError(f"AdaptiveScale: max_log_scale must be > 0, got {max_log_scale}")
        if not abs(init_log_scale) <= max_log_scale:
            raise ValueError(f"AdaptiveScale: init_log_scale must lie within +-max_log_scale ({max_log_scale}), "
                             f"got {init_log_scale}")
        floor = -float(max_log_scale) if min_log_scale is None else float(min_log_scale)
        if not (math.isfinite(floor) and -max_log_scale <= floor <= init_log_scale):
            raise ValueError(f"AdaptiveScale: min_log_scale must lie within -max_log_scale ({-max_log_scale}) and "
                             f"init_log_scale ({init_log_scale}), got {min_log_scale}")
        if not (math.isfinite(shrink) and shrink > 0):
            raise ValueError(f"AdaptiveScale: shrink must be a positive number (e.g. 0.7), got {shrink}")
        self.base = base
        self.max_log_scale = float(max_log_scale)
        self.init_log_scale = float(init_log_scale)
        self.shrink = float(shrink)
        self.min_log_scale = floor
        self._hparam("beta", beta, "positive")
        self._config["max_log_scale"] = self.max_log_scale
        if self.init_log_scale != 0.0:  # configs of wrappers that start at the base's scale stay as they were
            self._config["init_log_scale"] = self.init_log_scale
        if self.shrink != 1.0:  # likewise for the symmetric rule
            self._config["shrink"] = self.shrink
        if self.min_log_scale != -self.max_log_scale:  # likewise for the unbounded-below rule
            self._config["min_log_scale"] = self.min_log_scale

    def config(self) -> dict[str, Any]:
        return {"type": "AdaptiveScale", "base": self.base.config(), **self._config}

    def hparams(self) -> dict[str, float]:
        return {**self.base.hparams(), **super().hparams()}

    def learn(self, names: list[str] | None) -> "AdaptiveScale":
        """Train only ``names``: ``beta`` toggles the adaptation rate, the rest go to ``base.learn``; None = all."""
        known = ["beta", *self.base._kinds]
        unknown = [n for n in (names or []) if n not in known]
        if unknown:
            raise ValueError(f"AdaptiveScale({type(self.base).__name__}) has no hyperparameter {unknown[0]!r}; "
                             f"it has {', '.join(known)}")
        self.log_beta.requires_grad_(names is None or "beta" in names)
        self.base.learn(None if names is None else [n for n in names if n != "beta"])
        return self

    def project_(self) -> None:
        self.base.project_()

    def default_update_every(self, truncation: int, horizon: int) -> int:
        return self.base.default_update_every(truncation, horizon)

    # ------------------------------------------------------------------ protocol
    def init(self, params: Params) -> State:
        like = next(iter(params.values())).detach()
        n = sum(p.numel() for p in params.values())
        # u = 0 makes the first cosine 0: no adaptation before there is a last step
        return {"base": self.base.init(params), "s": like.new_full((), self.init_log_scale), "u": like.new_zeros(n)}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        keys = list(params)
        g = torch.cat([grads[k].reshape(-1) for k in keys])
        u_prev = state["u"]
        denom = torch.linalg.vector_norm(g) * torch.linalg.vector_norm(u_prev)
        cos = -(g @ u_prev) / denom.clamp_min(torch.finfo(g.dtype).tiny)
        if self.shrink != 1.0:
            cos = torch.where(cos < 0, self.shrink * cos, cos)
        s = (state["s"] + self.hparam("beta") * cos).clamp(self.min_log_scale, self.max_log_scale)
        stepped, base_state = self.base.step(params, grads, state["base"])
        scale = torch.exp(s)
        out, parts = {}, []
        for k in keys:
            u = (stepped[k] - params[k]) * scale
            out[k] = params[k] + u
            parts.append(u.reshape(-1))
        return out, {"base": base_state, "s": s, "u": torch.cat(parts)}
