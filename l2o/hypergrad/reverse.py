"""Reverse-mode hypergradients: full backprop through the unroll, and truncated variants.

* :func:`reverse` — ``d objective / d hparams`` through all ``T`` steps, or with
  ``truncate=K`` through the last ``K`` only (the state at step ``T-K`` held constant;
  Shaban et al. 2019).
* :func:`segments` — the unroll cut into segments of ``K`` steps; params and optimizer
  state are carried across a boundary and detached there, and each segment yields its
  own gradient. Summing them is the accumulated truncated estimator; applying each one
  before the next segment runs is the online one (TRHO, and the L2L paper's training).
  With ``K = T`` there is one segment, equal to :func:`reverse`.

The objective is ``outer_loss(params_T, hparams)`` (if given) plus
``sum_t w_t * inner_loss(params_t, hparams, t)`` (if ``meta_weights`` are given).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .unroll import InnerLoss, OuterLoss, Params, check_problem, check_steps, detach, unroll, weight_at


@dataclass
class Segment:
    """One truncated segment: its gradient and where the unroll stands after it."""

    grads: dict[str, torch.Tensor]
    meta_loss: float
    params: Params
    state: Any
    step: int
    losses: list[float]
    finite: bool = True


def check_hparams(hparams: dict[str, torch.Tensor]) -> None:
    if not isinstance(hparams, dict) or not hparams:
        raise ValueError("hparams must be a non-empty dict of tensors")
    for k, v in hparams.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"hparams[{k!r}] must be a tensor, got {type(v).__name__}")
        if not v.requires_grad:
            raise ValueError(f"hparams[{k!r}] does not require grad; create it with requires_grad=True")


def _grads(objective: torch.Tensor, hparams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(hparams)
    if not isinstance(objective, torch.Tensor) or not objective.requires_grad:
        return {k: torch.zeros_like(hparams[k]) for k in keys}
    gs = torch.autograd.grad(objective, [hparams[k] for k in keys], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(hparams[k])) for k, g in zip(keys, gs)}


def segments(inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt, steps: int,
             truncate: int, *, second_order: bool = True, meta_weights: Sequence[float] | None = None,
             state: Any = None, start: int = 0) -> Iterator[Segment]:
    """Yield one :class:`Segment` per ``truncate`` steps of a ``steps``-step unroll.

    ``hparams`` are read afresh by every segment, so a caller that updates them in
    place between segments gets the online estimator.
    """
    check_steps(steps)
    check_steps(truncate, "truncate")
    check_hparams(hparams)
    check_problem(params, opt)
    if outer_loss is None and meta_weights is None:
        raise ValueError("give an outer_loss, meta_weights, or both: the objective is empty")
    if meta_weights is not None and len(meta_weights) < start + steps:
        raise ValueError(f"meta_weights has {len(meta_weights)} entries; need {start + steps}")
    t, end = start, start + steps
    if state is None:
        state = opt.init(params)
    while t < end:
        k = min(truncate, end - t)
        # a segment with nothing to differentiate (only a final outer loss, and this is not
        # the last segment) has a zero gradient: run it without a graph
        has_objective = ((outer_loss is not None and t + k == end) or
                         any(weight_at(meta_weights, s) is not None for s in range(t, t + k)))
        res = unroll(inner_loss, params, hparams, opt, k, state=state, start=t, graph=has_objective,
                     second_order=second_order, meta_weights=meta_weights)
        objective = res.meta_loss
        if res.finite and outer_loss is not None and t + k == end:
            objective = objective + outer_loss(res.params, hparams)
        if res.finite:
            grads = _grads(objective, hparams)
            finite = all(torch.isfinite(g).all() for g in grads.values())
        else:
            grads, finite = {k_: torch.zeros_like(v) for k_, v in hparams.items()}, False
        t += k
        params, state = detach(res.params), detach(res.state)
        meta_loss = float(objective.detach()) if isinstance(objective, torch.Tensor) else float(objective)
        losses = res.losses
        # drop this segment's graph now, not when the next segment has been built on top of it
        del res, objective
        yield Segment(grads, meta_loss, params, state, t, losses, finite)
        if not finite:
            return


def reverse(inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt, steps: int, *,
            truncate: int | None = None, second_order: bool = True, meta_weights: Sequence[float] | None = None,
            state: Any = None) -> dict[str, torch.Tensor]:
    """Reverse-mode hypergradient of the objective after ``steps`` inner steps.

    Args:
        inner_loss: ``inner_loss(params, hparams, t) -> scalar``.
        outer_loss: ``outer_loss(params_T, hparams) -> scalar`` or None.
        params: initial parameters; may be (some of) the very tensors in ``hparams``.
        hparams: meta-parameters, tensors with ``requires_grad=True``.
        opt: differentiable optimizer (its hyperparameters may be in ``hparams``).
        steps: ``T``.
        truncate: ``K``: differentiate through the last ``K`` steps only; the first
            ``T - K`` run without a graph and their result is held constant.
        second_order: differentiate through the inner gradients (exact); off treats them as constants.
        meta_weights: ``T`` weights of the inner losses added to the objective.

    Returns:
        dict with the same keys and shapes as ``hparams``.
    """
    check_steps(steps)
    check_hparams(hparams)
    start = 0
    if truncate is not None:
        check_steps(truncate, "truncate")
        if truncate < steps:
            head = unroll(inner_loss, params, hparams, opt, steps - truncate, state=state, graph=False)
            if not head.finite:
                raise FloatingPointError("non-finite loss or gradient during the untruncated head of the unroll")
            params, state, start = head.params, head.state, steps - truncate
    seg = next(segments(inner_loss, outer_loss, params, hparams, opt, steps - start, steps - start,
                        second_order=second_order, meta_weights=meta_weights, state=state, start=start))
    if not seg.finite:
        raise FloatingPointError("non-finite loss or hypergradient; lower the learning rate or the horizon")
    return seg.grads


def truncated(inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt, steps: int,
              truncate: int, **kwargs) -> dict[str, torch.Tensor]:
    """Accumulated truncated reverse: the sum of the :func:`segments` gradients (hparams fixed)."""
    total = {k: torch.zeros_like(v) for k, v in hparams.items()}
    for seg in segments(inner_loss, outer_loss, params, hparams, opt, steps, truncate, **kwargs):
        if not seg.finite:
            raise FloatingPointError(f"non-finite loss or hypergradient at step {seg.step}")
        for k, g in seg.grads.items():
            total[k] += g
    return total


# ============================================================================= the estimator objects
from dataclasses import dataclass as _dataclass  # noqa: E402  (kept beside the estimators they configure)

from .estimator import Estimator, Options, register, zeros_like  # noqa: E402


@_dataclass
class TruncatedOptions(Options):
    """``truncate``: backpropagate through ``K`` steps at a time (None: the whole chunk)."""

    truncate: int | None = None


@register
class Truncated(Estimator):
    """Truncated backpropagation: each chunk is cut into :func:`segments` of ``truncate`` steps.

    The chunk's estimate is the sum of its segments' gradients, the state at each
    segment boundary held constant (Shaban et al. 2019). With ``truncate >= every`` it
    is exact reverse mode over the chunk; with ``every < steps`` it is TRHO (the L2L
    paper's training). Memory: one segment's graph.
    """

    name = "truncated"
    exact = False  # biased when truncate < horizon
    options_class = TruncatedOptions

    def segment_length(self, problem) -> int:
        return self.options.truncate or self.every(problem)

    def _chunk(self, meta_params, state, n):
        p = state.problem
        grads, ml, finite = zeros_like(meta_params), 0.0, True
        for seg in segments(p.inner_loss, p.outer_loss, state.params, meta_params, p.opt, n,
                            min(self.segment_length(p), n), second_order=p.second_order,
                            meta_weights=p.meta_weights, state=state.opt_state, start=state.t):
            finite = finite and seg.finite
            for k in grads:
                grads[k] += seg.grads[k]
            ml += seg.meta_loss
        state.params, state.opt_state, state.t = seg.params, seg.state, state.t + n
        return grads, ml, finite


@register
class Reverse(Truncated):
    """Full reverse mode: backpropagation through every step of each chunk (exact)."""

    name = "reverse"
    exact = True
    options_class = Options

    def segment_length(self, problem) -> int:
        return self.every(problem)
