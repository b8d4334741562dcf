"""Persistent evolution strategies (PES) and truncated ES on the shared unroll.

Vicol, Metz & Sohl-Dickstein (ICML 2021). A run of ``T`` inner steps is cut into
truncations of ``K`` steps. ``N`` antithetic particle pairs each carry their own inner
parameters and optimizer state across truncations. At truncation ``j`` pair ``i`` draws
``eps_ij ~ N(0, sigma^2 I)`` and runs the truncation with meta-parameters
``theta + eps_ij`` (particle ``+``) and ``theta - eps_ij`` (particle ``-``); with
``L_j^{+-}`` the truncation's objective (its weighted per-step terms, plus the outer
loss where the chunk ends),

    PES:  xi_ij = sum_{s <= j} eps_is        (the accumulator, persistent across truncations)
    ES:   xi_ij = eps_ij                     (no memory: biased like truncated backprop)

    g_j = 1 / (2 N sigma^2) * sum_i xi_ij * (L_j^+ - L_j^-)

and the estimate of a chunk is ``sum_j g_j``. Because the particles' states depend on
all their past perturbations, ``xi`` credits every truncation's loss to every earlier
perturbation: PES is an unbiased estimate of the gradient of the Gaussian-smoothed
objective of the *whole* run, ``d/dtheta E_eps[objective(theta + eps)]``, for any ``K``,
whereas ES (like truncated backprop) is biased unless ``K = T``. Both need no graph
(memory of one inference step), any objective (even non-differentiable), and treat an
LSTM's weights and a learning rate alike. Cost per truncation: ``2N`` unrolls of ``K``
steps, without backward passes through the steps.

A truncation's ``2N`` particles run as one batch (:mod:`l2o.hypergrad.particles`: the
loss gradient and the optimizer step vmapped over the stacked particles) or one after
another through the shared :func:`l2o.hypergrad.unroll` (perturbed meta-parameters
swapped into the optimizer with :class:`l2o.optim.base.substitute`); both give the same
estimate to rounding. The default batches where the particles' state is small
(:data:`BATCH_FLOATS`) and the loss vmaps; a particle going non-finite is always handled
by the sequential path, exactly as if there were no batching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..optim.base import substitute
from . import particles
from .estimator import Estimator, Options, Problem, State, register, zeros_like
from .reverse import check_hparams
from .unroll import InnerLoss, OuterLoss, Params, check_problem, check_steps, unroll


# Default for ``batched=None``: batch the particles when all of them together hold at most this many
# floats of inner parameters and optimizer state. Batching saves the per-particle Python and dispatch
# cost of every step, and wins where that dominates (small optimizees, hand-designed optimizers); once the
# stacked state outgrows the CPU's caches the batched step is slower than the particles one after
# another (an LSTM on the MNIST MLP: 2.4x slower with 4 pairs). Crossover measured on one core: between
# 2**17.6 and 2**19.3 floats for the LSTM, 2**17.3 and 2**20.6 for Momentum (RESULTS.md, "PES / ES
# meta-gradient cost"; ``benchmarks/pes_cost.py`` compares both paths on a real meta-step).
BATCH_FLOATS = 2 ** 19
# ... and only from this many antithetic pairs: one pair (two particles) gains less than vmap costs
# (Momentum's learning rate on the MNIST MLP: 1.6x slower batched with one pair, 1.6x faster with four).
BATCH_MIN_PAIRS = 2


@dataclass
class PESOptions(Options):
    """``truncate``: steps per truncation (None: the chunk); ``sigma``: perturbation scale;
    ``particles``: antithetic pairs (``2 * particles`` unrolls); ``batched``: run a truncation's
    particles as one batch (True), one after another (False), or None: batched wherever the loss
    and the optimizer vmap (measured the faster path, see ``benchmarks/pes_cost.py``)."""

    truncate: int | None = None
    sigma: float = 0.01
    particles: int = 8
    batched: bool | None = None


@register
class PES(Estimator):
    """Persistent evolution strategies (see the module docstring)."""

    name = "pes"
    exact = False
    stochastic = True
    truncation_bias = False
    options_class = PESOptions
    persistent = True  # ES sets this False

    def init(self, problem: Problem, meta_params: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> State:
        state = super().init(problem, meta_params, generator)
        n = self.options.particles
        state.extra["_generator"] = generator if generator is not None else torch.Generator().manual_seed(0)
        state.extra["particles"] = [None] * (2 * n)  # (params, opt_state) per particle; None = not started
        state.extra["accum"] = {k: torch.zeros((n, *v.shape), dtype=v.dtype, device=v.device)
                                for k, v in meta_params.items()}
        return state

    def _start(self, problem: Problem, meta_params: dict, h: dict) -> tuple[Params, Any]:
        """A particle's first parameters: learned initial weights (meta-parameters) take their perturbed value."""
        by_id = {id(v): k for k, v in meta_params.items()}
        params = {k: (h[by_id[id(v)]] if id(v) in by_id else v) for k, v in problem.params.items()}
        return params, problem.opt.init(params)

    def _start_perturbed(self, problem: Problem, meta_params: dict, h: dict) -> tuple[Params, Any]:
        """:meth:`_start` with the perturbed meta-parameters in the optimizer, as the sequential path calls it."""
        with substitute(problem.opt, {id(meta_params[k]): h[k] for k in h}):
            return self._start(problem, meta_params, h)

    def _chunk(self, meta_params, state, n):
        p, o, extra = state.problem, self.options, state.extra
        K, N, sigma = min(o.truncate or n, n), o.particles, o.sigma
        gen, parts, accum = extra["_generator"], extra["particles"], extra["accum"]
        grads, total_loss, end = zeros_like(meta_params), 0.0, state.t + n
        theta = {k: v.detach() for k, v in meta_params.items()}
        while state.t < end:
            k_steps = min(K, end - state.t)
            eps = {k: (torch.randn(v.shape, generator=gen, dtype=v.dtype) * sigma).to(v.device)
                   for k, v in accum.items()}
            for k in accum:
                accum[k] = accum[k] + eps[k] if self.persistent else eps[k]
            losses = self._batched(p, meta_params, theta, eps, state, k_steps, end) if self._batch(state) else None
            if losses is None:
                losses = self._sequential(p, meta_params, theta, eps, state, k_steps, end)
            if losses is None:
                state.t = end
                return zeros_like(meta_params), math.nan, False
            diffs = torch.zeros(N, dtype=torch.float64)
            for i, loss in enumerate(losses):
                diffs[i // 2] += (1.0 if i % 2 == 0 else -1.0) * loss
                total_loss += loss / (2 * N)
            for k in grads:  # g_j = sum_i xi_i (L_i^+ - L_i^-) / (2 N sigma^2)
                w = diffs.to(accum[k].dtype).to(accum[k].device).reshape(N, *([1] * (accum[k].dim() - 1)))
                grads[k] += (w * accum[k]).sum(0) / (2 * N * sigma ** 2)
            state.t += k_steps
        # the state the caller may read: the first particle's (for logging; each particle has its own)
        state.params, state.opt_state = parts[0]
        return grads, total_loss, True

    def _sequential(self, p: Problem, meta_params, theta, eps, state, k_steps: int, end: int) -> list[float] | None:
        """One truncation, one particle after another; None (chunk given up) at the first non-finite particle."""
        parts, losses = state.extra["particles"], []
        for i in range(len(parts)):
            sign = 1.0 if i % 2 == 0 else -1.0
            h = {k: theta[k] + sign * eps[k][i // 2] for k in theta}
            with substitute(p.opt, {id(meta_params[k]): h[k] for k in theta}):
                params, opt_state = parts[i] if parts[i] is not None else self._start(p, meta_params, h)
                res = unroll(p.inner_loss, params, h, p.opt, k_steps, state=opt_state, start=state.t,
                             graph=False, meta_weights=p.meta_weights)
                loss = float(res.meta_loss)
                if res.finite and p.outer_loss is not None and state.t + k_steps == end:
                    with torch.no_grad():
                        loss += float(p.outer_loss(res.params, h))
            if not (res.finite and math.isfinite(loss)):
                return None
            parts[i] = (res.params, res.state)
            losses.append(loss)
        return losses

    def _batch(self, state: State) -> bool:
        """Batch the particles? ``options.batched``, else by size: see :data:`BATCH_FLOATS`, :data:`BATCH_MIN_PAIRS`."""
        if getattr(self, "_unbatchable", None) is not None:
            return False
        if self.options.batched is not None:
            return self.options.batched
        if "_batch" not in state.extra:  # decided by sizes only, so a resumed run takes the same path
            p = state.problem
            floats = particles.floats((p.params, p.opt.init(p.params)))
            n = self.options.particles
            state.extra["_batch"] = n >= BATCH_MIN_PAIRS and 2 * n * floats <= BATCH_FLOATS
        return state.extra["_batch"]

    def _batched(self, p: Problem, meta_params, theta, eps, state, k_steps: int, end: int) -> list[float] | None:
        """One truncation of every particle as one batch (:mod:`.particles`); None: replay it sequentially."""
        extra = state.extra
        parts = extra["particles"]
        h = particles.perturbed(theta, eps)
        cached = extra.get("_stacked")
        try:
            if cached is not None and all(a is b for a, b in zip(cached[0], parts)):
                stacked = cached[1]
            else:
                starts = [pt if pt is not None else self._start_perturbed(p, meta_params, _row(h, i))
                          for i, pt in enumerate(parts)]
                stacked = particles.stack_parts(starts)
            out = particles.run(p.inner_loss, p.outer_loss, p.opt, meta_params, h, *stacked, state.t, k_steps,
                                p.meta_weights, state.t + k_steps == end)
        except particles.Unbatchable as exc:
            # this loss or optimizer does not vmap: every later truncation runs one particle at a time
            self._unbatchable = str(exc)
            return None
        if out is None:
            return None
        objective, params, leaves, spec = out
        parts[:] = particles.unstack_parts(params, leaves, spec, len(parts))
        extra["_stacked"] = (list(parts), (params, leaves, spec))
        return objective.tolist()

    def state_dict(self, state):
        out = super().state_dict(state)
        if state is not None:
            out["extra"]["generator"] = state.extra["_generator"].get_state()
        return out

    def load_state_dict(self, state, saved):
        state = super().load_state_dict(state, saved)
        if saved:
            state.extra["_generator"].set_state(state.extra.pop("generator"))
        return state


def _row(h: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in h.items()}


@register
class ES(PES):
    """Antithetic evolution strategies: PES without the persistent accumulator (fresh ``xi`` per truncation)."""

    name = "es"
    persistent = False
    truncation_bias = True


def _run(cls: type[PES], inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt,
         steps: int, truncate: int | None, sigma: float, particles: int, generator: torch.Generator | None,
         meta_weights: Sequence[float] | None) -> dict[str, torch.Tensor]:
    check_steps(steps)
    check_hparams(hparams)
    check_problem(params, opt)
    est = cls(truncate=truncate, sigma=sigma, particles=particles)
    state = est.init(Problem(inner_loss, outer_loss, params, opt, steps, meta_weights), hparams, generator)
    grads, metrics, state = est.estimate(hparams, state)
    if not metrics["finite"]:
        raise FloatingPointError("non-finite loss in a perturbed unroll; lower sigma, the learning rate or the horizon")
    return grads


def pes(inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt, steps: int, *,
        truncate: int | None = None, sigma: float = 0.01, particles: int = 8, generator: torch.Generator | None = None,
        meta_weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """PES estimate of the hypergradient of the sigma-smoothed objective of a ``steps``-step unroll.

    The unroll runs as ``steps / truncate`` truncations and the estimate is summed over
    them, like :func:`l2o.hypergrad.truncated` (hparams fixed); unlike it, it is unbiased
    for the whole run's (smoothed) objective.

    Args:
        inner_loss, outer_loss, params, hparams, opt, meta_weights: as for :func:`l2o.hypergrad.reverse`.
        steps: ``T``.
        truncate: ``K``, steps per truncation (default ``T``: one truncation).
        sigma: standard deviation of the Gaussian perturbations.
        particles: ``N`` antithetic pairs (``2N`` unrolls per truncation).
        generator: source of the perturbations (default: seed 0).

    Returns:
        dict with the keys and shapes of ``hparams``.
    """
    return _run(PES, inner_loss, outer_loss, params, hparams, opt, steps, truncate, sigma, particles, generator,
                meta_weights)


def es(inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt, steps: int, *,
       truncate: int | None = None, sigma: float = 0.01, particles: int = 8, generator: torch.Generator | None = None,
       meta_weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Antithetic ES estimate; with ``truncate < steps`` each truncation forgets earlier perturbations (biased).

    Arguments as for :func:`pes`.
    """
    return _run(ES, inner_loss, outer_loss, params, hparams, opt, steps, truncate, sigma, particles, generator,
                meta_weights)
