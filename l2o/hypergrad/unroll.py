"""The single inner loop shared by meta-training (with graph) and evaluation (without).

``inner_loss(params, hparams, step) -> scalar`` is the training objective at inner step
``step`` (``step=None`` means the full objective, used by implicit differentiation); it
may return ``(loss, meta_term)``: the optimizer descends ``loss``, the meta-loss sums
``w_t * meta_term`` (e.g. a normalised ``log(loss_t / loss_0)``);
``opt`` is any :class:`l2o.optim.DifferentiableOptimizer`. One inner step is

    loss_t = inner_loss(params_t, hparams, t)
    g_t    = d loss_t / d params_t          (detached unless second_order)
    params_{t+1}, state_{t+1} = opt.step(params_t, g_t, state_t)

and the unroll accumulates ``meta_loss = sum_t w_t * loss_t`` when weights are given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_map

Params = dict[str, torch.Tensor]
InnerLoss = Callable[[Params, dict, "int | None"], torch.Tensor]
OuterLoss = Callable[[Params, dict], torch.Tensor]


@dataclass
class UnrollResult:
    """What an unroll leaves behind.

    Attributes:
        params: parameters after the last step (carrying the graph if one was built).
        state: optimizer state after the last step.
        meta_loss: ``sum_t w_t loss_t`` over the steps run (0.0 without weights).
        losses: the inner losses, one float per step.
        finite: False if a non-finite loss or gradient was met (the unroll stops there).
    """

    params: Params
    state: Any
    meta_loss: torch.Tensor | float = 0.0
    losses: list[float] = field(default_factory=list)
    finite: bool = True


def detach(tree: Any) -> Any:
    """Detach every tensor of a params / state tree (the truncation boundary)."""
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def check_steps(steps: int, name: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}")
    return steps


def weight_at(meta_weights: Sequence[float] | torch.Tensor | None, t: int) -> float | torch.Tensor | None:
    if meta_weights is None:
        return None
    w = meta_weights[t]
    return None if (not isinstance(w, torch.Tensor) and w == 0) else w


def unroll(inner_loss: InnerLoss, params: Params, hparams: dict, opt, steps: int, *, state: Any = None,
           start: int = 0, graph: bool = True, second_order: bool = True,
           meta_weights: Sequence[float] | torch.Tensor | None = None,
           callback: Callable[[int, Params, float], None] | None = None) -> UnrollResult:
    """Run ``steps`` inner steps from ``params``.

    Args:
        inner_loss: ``inner_loss(params, hparams, t) -> scalar``.
        params: starting parameters (dict of tensors).
        hparams: passed through to ``inner_loss``.
        opt: differentiable optimizer.
        steps: number of steps; they are numbered ``start .. start + steps - 1``.
        state: optimizer state to continue from (default ``opt.init(params)``).
        graph: build the graph through the steps (training) or not (evaluation: no
            graph, detached tensors, low memory).
        second_order: with ``graph``, differentiate through the gradients themselves;
            off feeds the optimizer detached gradients, as the L2L paper does.
        meta_weights: indexed by absolute step ``t``; adds ``w_t * loss_t`` to the meta-loss.
        callback: ``callback(t, params_t, loss_t)`` after each loss evaluation.
    """
    check_steps(steps)
    if state is None:
        state = opt.init(params)
    meta_loss: torch.Tensor | float = 0.0
    losses: list[float] = []
    if not graph:
        params, state = detach(params), detach(state)
    keys = list(params)
    for t in range(start, start + steps):
        with torch.enable_grad():
            p_in = {k: (v if v.requires_grad else v.detach().requires_grad_()) for k, v in params.items()}
            out = inner_loss(p_in, hparams, t)
            loss, term = (out[0], out[1]) if isinstance(out, tuple) else (out, out)
            grads = torch.autograd.grad(loss, list(p_in.values()), create_graph=graph and second_order,
                                        retain_graph=graph, allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(p_in[k])) for k, g in zip(keys, grads)}
        lv = float(loss.detach())
        losses.append(lv)
        if callback is not None:
            callback(t, p_in, lv)
        if not (math.isfinite(lv) and all_finite(list(grads.values()))):
            return UnrollResult(params, state, meta_loss, losses, finite=False)
        w = weight_at(meta_weights, t)
        if graph:
            if w is not None:
                meta_loss = meta_loss + w * term
            params, state = opt.step(p_in, grads, state)
        else:
            if w is not None:
                meta_loss = meta_loss + float(w) * (lv if term is loss else float(term.detach()))
            with torch.no_grad():  # no graph is recorded, so p_in needs no detaching
                params, state = opt.step(p_in, grads, state)
    return UnrollResult(params, state, meta_loss, losses)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True iff no entry of ``tensors`` is inf or NaN, with one reduction and one host synchronisation.

    The largest magnitude over all entries is finite exactly when every entry is:
    unlike a sum or a 2-norm it cannot overflow, and a NaN propagates through the
    maximum (then ``nan < inf`` is False). Flattening into one vector makes it one
    ``abs`` and one ``max`` however many tensors there are.
    """
    tensors = [t.detach().reshape(-1) for t in tensors if t.numel()]
    if not tensors:
        return True
    flat = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return float(flat.abs().max()) < math.inf
