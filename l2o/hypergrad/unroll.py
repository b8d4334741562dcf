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
:func:`inner_step` is that step, the only one: :func:`unroll` (reverse mode, evaluation,
PES particles) and forward mode (``linearize=True``, which also returns ``dL/dlambda``
and the optimizer step linearised for Jacobian-vector products) both run it, so a
non-finite loss or gradient stops every estimator the same way, before the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..optim.base import substitute

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


def own(tree: Any) -> Any:
    """Detached copies of every tensor of a tree: storage the loop may update in place."""
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def check_steps(steps: int, name: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}")
    return steps


_NO_OPT = object()


def check_problem(params: Any, opt: Any = _NO_OPT) -> None:
    """``params`` a non-empty dict of tensors and ``opt`` an l2o optimizer, else one clear TypeError
    (not an AttributeError from deep inside the unroll)."""
    if not isinstance(params, dict) or not params or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise TypeError(f"params must be a non-empty dict of tensors, got {type(params).__name__}"
                        + (f" {params!r}" if isinstance(params, dict) else ""))
    if opt is not _NO_OPT and not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "step", None))):
        raise TypeError(f"opt must be an l2o optimizer (l2o.optim.SGD(lr=...), l2o.load_optimizer(...)), got "
                        f"{type(opt).__name__}; a torch.optim optimizer cannot be unrolled")


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

    Without a graph and without a callback the loop copies ``params`` and ``state`` once
    and then updates its copies in place (``opt.step_``, as ``torch.optim`` does): the
    caller's tensors are never written, and a large model's steps allocate nothing. A
    callback may keep the tensors it is shown, so with one every step is out of place.
    """
    check_steps(steps)
    check_problem(params, opt)
    if state is None:
        state = opt.init(params)
    meta_loss: torch.Tensor | float = 0.0
    losses: list[float] = []
    inplace = not graph and callback is None
    if not graph:
        params, state = (own(params), own(state)) if inplace else (detach(params), detach(state))
    for t in range(start, start + steps):
        s = inner_step(inner_loss, params, hparams, opt, state, t, graph=graph, second_order=second_order,
                       callback=callback, inplace=inplace)
        losses.append(s.value)
        if not s.finite:
            return UnrollResult(params, state, meta_loss, losses, finite=False)
        w = weight_at(meta_weights, t)
        if w is not None:
            if graph:
                meta_loss = meta_loss + w * s.term
            else:
                meta_loss = meta_loss + float(w) * (s.value if s.term is s.loss else float(s.term.detach()))
        params, state = s.next_params, s.next_state
    return UnrollResult(params, state, meta_loss, losses)


def split_term(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, meta_term)`` from what an inner loss returned (a tensor is both)."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, out)


@dataclass
class InnerStep:
    """What one :func:`inner_step` computed.

    Attributes:
        params: the step's input parameters as differentiated (leaves requiring grad, or
            tensors carrying the unroll's graph).
        loss, term: the loss the optimizer descends and the meta-term (the same tensor unless
            the inner loss returned a pair).
        value: ``float(loss)``.
        grads: ``d loss / d params`` as fed to the optimizer (zeros for unused parameters).
        finite: False if ``value`` or a gradient is inf or NaN; then no optimizer step was taken.
        next_params, next_state: the optimizer's step (None when not finite).
        raw_grads, hparam_grads: (``linearize``) ``d loss / d params`` and ``d loss / d hparams``
            as autograd returned them, with their graph when ``second_order`` (None: unused).
        term_params, term_hparams: (``linearize``) ``d term / d params`` (detached, zeros where
            unused) and ``d term / d hparams`` (None where unused).
        linear: (``linearize``) the optimizer step as a :class:`LinearizedStep`.
    """

    params: Params
    loss: torch.Tensor
    term: torch.Tensor
    value: float
    grads: Params
    finite: bool
    next_params: Params | None = None
    next_state: Any = None
    raw_grads: dict | None = None
    hparam_grads: dict | None = None
    term_params: Params | None = None
    term_hparams: dict | None = None
    linear: "LinearizedStep | None" = None


def inner_step(inner_loss: InnerLoss, params: Params, hparams: dict, opt, state: Any, t: int, *,
               graph: bool = True, second_order: bool = True, linearize: bool = False,
               callback: Callable[[int, Params, float], None] | None = None, inplace: bool = False) -> InnerStep:
    """One inner step: loss, gradient, the non-finite stop, the optimizer step.

    Args:
        graph, second_order: as for :func:`unroll` (ignored with ``linearize``).
        inplace: without a graph, step with ``opt.step_``, writing the new parameters and
            state into the given tensors (the caller owns them and drops the old values).
        linearize: forward mode. The primal step is taken without a graph, and the step
            also returns what tangents need: ``d loss / d (params, hparams)`` (with the graph
            of the gradient when ``second_order``, for its Jacobian-vector products), the
            meta-term's gradient, and the optimizer step linearised at this point.
        callback: ``callback(t, params_t, loss_t)`` after the loss is evaluated.
    """
    keys = list(params)
    with torch.enable_grad():
        if linearize:
            p_in = {k: v.detach().requires_grad_() for k, v in params.items()}
        else:
            p_in = {k: (v if v.requires_grad else v.detach().requires_grad_()) for k, v in params.items()}
        loss, term = split_term(inner_loss(p_in, hparams, t))
        if linearize:
            hkeys = list(hparams)
            wrt = list(p_in.values()) + [hparams[k] for k in hkeys]
            # the gradient's graph only when its tangent is needed (second order)
            g_all = torch.autograd.grad(loss, wrt, create_graph=second_order, allow_unused=True,
                                        retain_graph=term is not loss or second_order)
        else:
            g_all = torch.autograd.grad(loss, list(p_in.values()), create_graph=graph and second_order,
                                        retain_graph=graph, allow_unused=True)
    grads = {k: (g if g is not None else torch.zeros_like(p_in[k])) for k, g in zip(keys, g_all)}
    if linearize:
        grads = {k: g.detach() for k, g in grads.items()}
    value = float(loss.detach())
    if callback is not None:
        callback(t, p_in, value)
    if not (math.isfinite(value) and all_finite(list(grads.values()))):
        return InnerStep(p_in, loss, term, value, grads, False)
    if not linearize:
        if graph:
            new_params, new_state = opt.step(p_in, grads, state)
        elif inplace:
            with torch.no_grad():  # into the caller's storage (detached views: no grad flag leaks out)
                new_params, new_state = opt.step_({k: v.detach() for k, v in p_in.items()}, grads, state)
        else:
            with torch.no_grad():  # no graph is recorded, so p_in needs no detaching
                new_params, new_state = opt.step(p_in, grads, state)
        return InnerStep(p_in, loss, term, value, grads, True, new_params, new_state)
    # the meta-term's own gradient when it is not the loss (a normalised objective)
    with torch.enable_grad():
        t_all = g_all if term is loss else torch.autograd.grad(term, wrt, allow_unused=True, retain_graph=second_order)
    n = len(keys)
    term_params = {k: (g.detach() if g is not None else torch.zeros_like(p_in[k])) for k, g in zip(keys, t_all[:n])}
    linear = LinearizedStep(opt, params, grads, state, hparams)
    return InnerStep(p_in, loss, term, value, grads, True, *linear.primal, raw_grads=dict(zip(keys, g_all[:n])),
                     hparam_grads=dict(zip(hkeys, g_all[n:])), term_params=term_params,
                     term_hparams=dict(zip(hkeys, t_all[n:])), linear=linear)


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class LinearizedStep:
    """``opt.step`` at one point, ready for Jacobian-vector products (the double-vjp trick).

    Inputs are ``(params, grads, float leaves of state, hparams)``; outputs the float
    leaves of ``(new_params, new_state)``. Building the object runs the step once (its
    result is :attr:`primal`) and one backward pass with ``create_graph``; each
    :meth:`jvp` is then one more backward pass: ``J v = d/du [(J^T u) . v]``.
    """

    def __init__(self, opt, params: Params, grads: Params, state: Any, hparams: dict[str, torch.Tensor]) -> None:
        self.keys, self.hkeys = list(params), list(hparams)
        x_p = [params[k].detach().requires_grad_() for k in self.keys]
        x_g = [grads[k].detach().requires_grad_() for k in self.keys]
        leaves, spec = tree_flatten(state)
        x_s = [x.detach().requires_grad_() if _is_float(x) else x for x in leaves]
        x_h = [hparams[k].detach().requires_grad_() for k in self.hkeys]
        mapping = {id(hparams[k]): x for k, x in zip(self.hkeys, x_h)}
        with torch.enable_grad(), substitute(opt, mapping):
            new_p, new_s = opt.step(dict(zip(self.keys, x_p)), dict(zip(self.keys, x_g)), tree_unflatten(x_s, spec))
        out, self.out_spec = tree_flatten((new_p, new_s))
        self.primal = tree_unflatten([x.detach() if isinstance(x, torch.Tensor) else x for x in out], self.out_spec)
        self.out = out
        self.n_p, self.n_s = len(x_p), sum(_is_float(x) for x in x_s)
        self.ins = x_p + x_g + [x for x in x_s if _is_float(x)] + x_h
        self.ys = [i for i, y in enumerate(out) if _is_float(y) and y.requires_grad]
        self.u = [torch.zeros_like(out[i], requires_grad=True) for i in self.ys]
        with torch.enable_grad():
            self.vjp = (torch.autograd.grad([out[i] for i in self.ys], self.ins, grad_outputs=self.u,
                                            create_graph=True, allow_unused=True)
                        if self.ys else [None] * len(self.ins))

    def jvp(self, t_params: Params, t_grads: Params, t_state: Any, name: str, i: int) -> tuple[Params, Any]:
        """Tangent of ``(new_params, new_state)`` for input tangents and ``lambda`` direction ``(name, i)``."""
        t_h = []
        for k in self.hkeys:
            if k == name:
                e = torch.zeros_like(self.ins[-len(self.hkeys) + self.hkeys.index(k)])
                e.view(-1)[i] = 1.0
                t_h.append(e)
            else:
                t_h.append(None)
        t_s = [x for x in tree_flatten(t_state)[0] if _is_float(x)]
        tans = [t_params[k] for k in self.keys] + [t_grads.get(k) for k in self.keys] + t_s + t_h
        pairs = [(v, t) for v, t in zip(self.vjp, tans) if v is not None and t is not None and v.requires_grad]
        ju: list = [None] * len(self.u)
        if pairs:
            ju = list(torch.autograd.grad([v for v, _ in pairs], self.u, grad_outputs=[t for _, t in pairs],
                                          retain_graph=True, allow_unused=True))
        by_out = dict(zip(self.ys, ju))
        leaves = []
        for j, y in enumerate(self.out):
            if _is_float(y):
                tj = by_out.get(j)
                leaves.append(torch.zeros_like(y).detach() if tj is None else tj.detach())
            else:
                leaves.append(y)
        return tree_unflatten(leaves, self.out_spec)


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
