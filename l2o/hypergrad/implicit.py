"""Implicit-function-theorem hypergradients (Lorraine et al. 2019; Pedregosa 2016).

At a stationary point ``params*`` of ``L_in(params, hparams)``,

    d L_out / d hparams = dL_out/dhparams - (d^2 L_in / dhparams dparams) v,
    where  H v = dL_out/dparams,  H = d^2 L_in / dparams^2,

with ``v`` from conjugate gradients or a Neumann series on Hessian-vector products
(never forming ``H``). Meta-parameters that enter neither the inner gradient nor the
outer loss (a learning rate, a learned optimizer's weights, initial weights) have no
implicit hypergradient and are refused.
"""
from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch

from .reverse import check_hparams
from .solvers import Vec, _neumann_sum, _writable, conjugate_gradient, largest_eigenvalue, neumann  # noqa: F401
from .unroll import InnerLoss, OuterLoss, Params


# inner_loss -> (parameter shapes, alpha): the default Neumann step of each inner problem
_ALPHAS: "weakref.WeakKeyDictionary[Callable, tuple[tuple, float]]" = weakref.WeakKeyDictionary()


def default_alpha(inner_loss: InnerLoss, hvp: Callable[[Vec], Vec], like: Vec) -> float:
    """The default Neumann step ``1 / lambda_max``, estimated once per inner problem.

    ``lambda_max`` comes from 20 power-iteration Hessian-vector products. They cost
    several times the hypergradient itself, so the estimate is kept for the
    ``inner_loss`` callable it was made for (weakly: it goes with the callable) and
    reused while that callable and the parameter shapes are the same: a trainer that
    builds one ``inner_loss`` per inner problem and asks for a hypergradient every few
    inner steps pays for it once per problem. The step keeps a factor-2 margin (the
    series converges for ``alpha < 2 / lambda_max``), so the curvature may grow up to
    twofold along the run before the cached step fails; pass ``alpha`` to choose it.
    """
    shapes = tuple((tuple(t.shape), t.dtype) for t in like)
    try:
        hit = _ALPHAS.get(inner_loss)
    except TypeError:  # not weak-referenceable: estimate every time
        hit = None
    if hit is not None and hit[0] == shapes:
        return hit[1]
    alpha = 1.0 / max(largest_eigenvalue(hvp, like), 1e-12)
    try:
        _ALPHAS[inner_loss] = (shapes, alpha)
    except TypeError:
        pass
    return alpha


def _graph_only(grads: tuple[torch.Tensor, ...]) -> list:
    """The gradient's graph without its value: only the graph is differentiated again.

    Each weight-sized gradient would otherwise stay allocated through every
    Hessian-vector product. Where this torch differentiates from graph edges, the
    tensors are replaced by their edges (and freed); otherwise they are kept.
    """
    if not _edges_differentiable():
        return list(grads)
    from torch.autograd.graph import get_gradient_edge

    return [get_gradient_edge(g) if g.requires_grad else g for g in grads]


@functools.lru_cache(maxsize=None)
def _edges_differentiable() -> bool:
    """Whether ``torch.autograd.grad`` takes graph edges as outputs (recent torch; probed once)."""
    try:
        from torch.autograd.graph import get_gradient_edge

        x = torch.ones(1, requires_grad=True)
        return torch.autograd.grad([get_gradient_edge(x * 2.0)], [x], grad_outputs=[torch.ones(1)])[0].item() == 2.0
    except (ImportError, TypeError, RuntimeError):
        return False


def implicit(inner_loss: InnerLoss, outer_loss: OuterLoss, params_star: Params, hparams: dict, *,
             method: str = "cg", iters: int = 100, alpha: float | None = None, tol: float = 1e-12
             ) -> dict[str, torch.Tensor]:
    """Implicit hypergradient at (approximately) converged parameters.

    Args:
        inner_loss: ``inner_loss(params, hparams, None)`` is the full training objective.
        outer_loss: ``outer_loss(params, hparams)``, e.g. the validation loss.
        params_star: parameters at (approximate) stationarity of the inner objective.
        hparams: meta-parameters (tensors with ``requires_grad=True``).
        method: ``cg`` (conjugate gradients; needs a positive-definite Hessian) or
            ``neumann`` (Lorraine et al.'s series; robust, approximate).
        iters: CG iterations or Neumann terms.
        alpha: Neumann step; default ``1 / lambda_max`` from 20 power iterations, estimated
            once per ``inner_loss`` callable and reused (see :func:`default_alpha`).
        tol: relative residual at which CG stops.

    Returns:
        dict like ``hparams``.
    """
    check_hparams(hparams)
    if method not in ("cg", "neumann"):
        raise ValueError(f"unknown implicit method {method!r}; choose 'cg' or 'neumann'")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    hp_ids = {id(v) for v in hparams.values()}
    shared = [k for k, v in params_star.items() if id(v) in hp_ids]
    if shared:
        raise ValueError(f"params {shared} are also meta-parameters: initial weights have no implicit "
                         f"hypergradient (the fixed point forgets them); use reverse or forward mode")
    keys = list(params_star)
    p = [params_star[k].detach().requires_grad_() for k in keys]
    hv = list(hparams.values())
    # the objectives see views of the leaves: a written-out backward (a penalty's) can
    # then ask the engine whether a product w.r.t. the params is needed, which it
    # cannot answer for a leaf under autograd.grad (the mixed product needs none)
    pd = {k: t.view_as(t) for k, t in zip(keys, p)}
    with torch.enable_grad():
        out = outer_loss(pd, hparams)
        g_out = torch.autograd.grad(out, p + hv, allow_unused=True)
        gp = [g if g is not None else torch.zeros_like(x) for g, x in zip(g_out[:len(p)], p)]
        direct = g_out[len(p):]
        del out, g_out
        dLdp = _graph_only(torch.autograd.grad(inner_loss(pd, hparams, None), p, create_graph=True))

        def hvp(v: Vec) -> Vec:
            return list(torch.autograd.grad(dLdp, p, grad_outputs=v, retain_graph=True))

        if method == "cg":
            v = conjugate_gradient(hvp, gp, iters, tol)
            torch._foreach_neg_(v)  # v is the solver's own: the mixed product comes out with its sign
        else:
            a = alpha if alpha is not None else default_alpha(inner_loss, hvp, gp)
            v = _neumann_sum(hvp, gp, iters, a, own_b=True)  # hands gp over: overwritten, then dropped
            torch._foreach_mul_(v, -a)  # the series' step and the mixed product's sign in one pass
        del gp
        mixed = torch.autograd.grad(dLdp, hv, grad_outputs=v, allow_unused=True)
    result = {}
    for (k, h), d, m in zip(hparams.items(), direct, mixed):
        if d is None and m is None:
            raise ValueError(f"meta-parameter {k!r} enters neither the inner gradient nor the outer loss: "
                             f"implicit differentiation cannot see it (a learning rate or an optimizer's weights "
                             f"act only through the optimizer); use reverse or forward mode")
        r = d if m is None else m if d is None else d + m
        if not _writable([r], list(result.values())):  # a view or a tensor shared with another entry: a copy
            r = r.clone()
        result[k] = r
    return result


# ============================================================================= the estimator object
from dataclasses import dataclass as _dataclass  # noqa: E402

from .estimator import Estimator, Options, loss_only, register  # noqa: E402
from .unroll import unroll as _unroll  # noqa: E402


@_dataclass
class ImplicitOptions(Options):
    """``iters``: Neumann-series terms; ``solver``: ``neumann`` or ``cg``."""

    iters: int = 10
    solver: str = "neumann"

    def validate(self) -> "ImplicitOptions":
        super().validate()
        if self.solver not in ("neumann", "cg"):
            raise ValueError(f"unknown implicit solver {self.solver!r}; choose neumann or cg")
        return self


class _Stationary:
    """``inner(p, h, t) + penalty(p)`` at a fixed step ``t`` (an object: the step-size cache keys on it)."""

    def __init__(self, inner: Callable, penalty: Callable | None, t: int) -> None:
        self.inner, self.penalty, self.t = inner, penalty, t

    def __call__(self, p, h, _):
        return self.inner(p, h, self.t) + (self.penalty(p) if self.penalty is not None else 0.0)


@register
class Implicit(Estimator):
    """Implicit differentiation at the end of each chunk (Lorraine et al. 2019).

    Each chunk runs ``every`` steps without a graph and takes :func:`implicit` at the
    parameters reached, treating them as stationary for the step's training loss plus
    the optimizer's ``penalty(params)`` (if it has one: an L2 decay applied in the
    update is the loss term ``penalty``). It needs an outer loss and meta-parameters that
    enter that objective; a learning rate, momentum or an optimizer's weights act only
    through the update and are refused.
    """

    name = "implicit"
    exact = False  # exact only at a true stationary point
    options_class = ImplicitOptions

    def _stationary(self, problem, t: int):
        return _Stationary(loss_only(problem.inner_loss), getattr(problem.opt, "penalty", None), t)

    def check(self, problem, meta_params) -> None:
        if problem.outer_loss is None:
            raise ValueError("implicit differentiation needs an outer loss (a final objective), not only per-step losses")
        implicit(self._stationary(problem, 0), problem.outer_loss, problem.params, meta_params, iters=1,
                 method=self.options.solver)

    def _chunk(self, meta_params, state, n):
        p = state.problem
        res = _unroll(loss_only(p.inner_loss), state.params, meta_params, p.opt, n, state=state.opt_state,
                      start=state.t, graph=False)
        state.params, state.opt_state, state.t = res.params, res.state, state.t + n
        if not res.finite:
            return {k: torch.zeros_like(v) for k, v in meta_params.items()}, float("nan"), False
        # the default Neumann step is estimated at a run's first chunk and kept in the state (so
        # a resumed run continues with it): 20 power iterations once per run, not per chunk
        stationary, alpha = self._stationary(p, state.t - 1), state.extra.get("neumann_alpha")
        grads = implicit(stationary, p.outer_loss, res.params, meta_params, method=self.options.solver,
                         iters=self.options.iters, alpha=alpha)
        if alpha is None and stationary in _ALPHAS:
            state.extra["neumann_alpha"] = _ALPHAS[stationary][1]
        return grads, float(p.outer_loss(res.params, meta_params)), True
