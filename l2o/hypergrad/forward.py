"""Forward-mode hypergradients (real-time hyperparameter optimization, RTHO).

For every scalar meta-parameter direction ``e_i`` the tangent ``Z_t = d(params_t,
state_t) / d lambda_i`` is carried through the same inner step as reverse mode uses:
:func:`l2o.hypergrad.unroll.inner_step` with ``linearize=True`` (so forward mode has the
same loss evaluation and the same non-finite stop as every other estimator; the step also
hands back ``dL/dlambda`` and the optimizer step linearised at that point).
Tangents are stored as plain tensors between steps, so all directions advance in
lock-step and the online variant can update ``lambda`` every ``K`` steps while the
tangents keep flowing (Franceschi et al. 2017). Cost grows with the number of
scalar meta-parameters, so more than ``max_directions`` is refused: use reverse mode.

One step computes the primal once and then, per direction, two Jacobian-vector
products with reverse-mode passes only:

* the gradient ``g = dL/dparams``: ``dg . (Z, e_i) = d/dparams [g . Z + dL/dlambda . e_i]``
  (the Hessian of ``L`` in ``(params, lambda)`` is symmetric), one backward pass
  through the gradient's graph;
* the optimizer step ``y = step(x)``: linearised once as ``u -> J^T u`` (a backward
  pass with ``create_graph``), after which ``J v = d/du [(J^T u) . v]`` is one backward
  pass per direction (the "double-vjp" trick).

Why not ``torch.autograd.forward_ad``: in torch 2.14 every op that mixes a dual tensor
with a plain one (a constant target, a Python float such as Adam's ``1 - beta1``, an
optimizer hyperparameter that is not being differentiated) runs a Python meta kernel,
~1 ms per op on CPU. On the MNIST MLP that made forward mode cost 3.8x plain training
with Momentum and one meta-parameter, and 8-10x with Adam; with these reverse-mode
products it costs 2.6-2.7x (see ``benchmarks/hypergrad_cost.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .estimator import Estimator, Options, register
from .reverse import check_hparams
from .unroll import InnerLoss, OuterLoss, Params, check_problem, check_steps, detach, inner_step, weight_at


def _directions(hparams: dict[str, torch.Tensor], max_directions: int) -> list[tuple[str, int]]:
    n = sum(v.numel() for v in hparams.values())
    if n > max_directions:
        raise ValueError(f"forward mode needs one tangent per scalar meta-parameter and got {n} "
                         f"(> max_directions={max_directions}); use reverse mode, or pass max_directions={n} to insist")
    return [(k, i) for k, v in hparams.items() for i in range(v.numel())]


def _zeros_tree(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([torch.zeros_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                           for x in leaves], spec)


class ForwardUnroll:
    """Inner loop carrying one tangent per scalar meta-parameter direction.

    Args mirror :func:`l2o.hypergrad.reverse`. Call :meth:`run` to advance and
    :meth:`hypergrad` to read ``d objective / d hparams`` where the unroll stands.
    """

    def __init__(self, inner_loss: InnerLoss, params: Params, hparams: dict[str, torch.Tensor], opt, *,
                 second_order: bool = True, meta_weights: Sequence[float] | None = None, state: Any = None,
                 max_directions: int = 1000) -> None:
        check_hparams(hparams)
        check_problem(params, opt)
        self.inner_loss, self.hparams, self.opt = inner_loss, hparams, opt
        self.second_order, self.meta_weights = second_order, meta_weights
        self.dirs = _directions(hparams, max_directions)
        state = opt.init(params) if state is None else state
        # an initial weight that *is* a meta-parameter starts with the unit tangent
        by_id = {id(v): k for k, v in hparams.items()}
        self.params, self.state = detach(params), detach(state)
        self.tangents = []
        for name, i in self.dirs:
            tp = {}
            for k, p in params.items():
                t = torch.zeros_like(p)
                if by_id.get(id(p)) == name:
                    t.view(-1)[i] = 1.0
                tp[k] = t
            self.tangents.append((tp, _zeros_tree(self.state)))
        self.meta_tangent = torch.zeros(len(self.dirs), dtype=torch.float64)
        self.meta_loss = 0.0
        self.t = 0
        self.losses: list[float] = []
        self.finite = True

    def run(self, steps: int) -> bool:
        """Advance every direction by ``steps`` inner steps; False if a non-finite loss or gradient stopped it."""
        check_steps(steps)
        for _ in range(steps):
            if not self._step():
                return False
        return True

    def restart_objective(self) -> None:
        """Start a new update chunk: the meta-loss and its tangent restart from zero; tangents of the state flow on."""
        self.meta_tangent.zero_()
        self.meta_loss = 0.0

    def _step(self) -> bool:
        """One inner step for the primal and every tangent; False (and no step) on a non-finite loss or gradient.

        The step itself is the shared :func:`l2o.hypergrad.unroll.inner_step` (``linearize=True``):
        the same loss, gradient and non-finite stop as every other estimator, which also hands
        back ``dL/dlambda``, the meta-term's gradient and the linearised optimizer step.
        """
        s = inner_step(self.inner_loss, self.params, self.hparams, self.opt, self.state, self.t,
                       second_order=self.second_order, linearize=True)
        self.losses.append(s.value)
        if not s.finite:
            self.finite = False
            return False
        w = weight_at(self.meta_weights, self.t)
        for d, (name, i) in enumerate(self.dirs):
            tp, ts = self.tangents[d]
            if w is not None:  # d term_t / d lambda_i = dterm/dparams . Z + dterm/dlambda . e_i
                lt = sum(float((s.term_params[k] * tp[k]).sum()) for k in tp)
                if s.term_hparams[name] is not None:
                    lt += float(s.term_hparams[name].detach().reshape(-1)[i])
                self.meta_tangent[d] += float(w) * lt
            g_tan = (self._gradient_tangent(s.params, s.raw_grads, s.hparam_grads, tp, name, i)
                     if self.second_order else {})
            self.tangents[d] = s.linear.jvp(tp, g_tan, ts, name, i)
        self.params, self.state = s.next_params, s.next_state
        if w is not None:
            self.meta_loss += float(w) * float(s.term.detach())
        self.t += 1
        return True

    def _gradient_tangent(self, p: Params, g_p: dict, g_h: dict, tp: Params, name: str, i: int) -> Params:
        """``d/dparams [g . Z + dL/dlambda_name . e_i]``: the tangent of the gradient in direction ``i``."""
        outs, vecs = [], []
        for k, g in g_p.items():
            if g is not None and g.requires_grad:
                outs.append(g)
                vecs.append(tp[k])
        gh = g_h[name]
        if gh is not None and gh.requires_grad:
            e = torch.zeros_like(gh)
            e.view(-1)[i] = 1.0
            outs.append(gh)
            vecs.append(e)
        if not outs:  # the gradient is constant in params and lambda
            return {}
        keys = list(p)
        jg = torch.autograd.grad(outs, [p[k] for k in keys], grad_outputs=vecs, retain_graph=True, allow_unused=True)
        return {k: g for k, g in zip(keys, jg) if g is not None}

    def hypergrad(self, outer_loss: OuterLoss | None) -> dict[str, torch.Tensor]:
        """``d objective / d hparams`` at the current step: tangents dotted with the outer gradient."""
        total = self.meta_tangent.clone()
        if outer_loss is not None:
            p = {k: v.detach().requires_grad_() for k, v in self.params.items()}
            with torch.enable_grad():
                out = outer_loss(p, self.hparams)
                keys = list(p)
                gp = torch.autograd.grad(out, [p[k] for k in keys] + list(self.hparams.values()), allow_unused=True)
            g_params, g_h = gp[:len(keys)], dict(zip(self.hparams, gp[len(keys):]))
            for d, (name, i) in enumerate(self.dirs):
                tp, _ = self.tangents[d]
                acc = sum(float((g * tp[k]).sum()) for k, g in zip(keys, g_params) if g is not None)
                if g_h[name] is not None:
                    acc += float(g_h[name].reshape(-1)[i])
                total[d] += acc
        out_g = {k: torch.zeros_like(v) for k, v in self.hparams.items()}
        for d, (name, i) in enumerate(self.dirs):
            out_g[name].view(-1)[i] = total[d].to(out_g[name].dtype)
        return out_g


def forward(inner_loss: InnerLoss, outer_loss: OuterLoss | None, params: Params, hparams: dict, opt, steps: int, *,
            second_order: bool = True, meta_weights: Sequence[float] | None = None, state: Any = None,
            max_directions: int = 1000) -> dict[str, torch.Tensor]:
    """Forward-mode hypergradient after ``steps`` steps (equals :func:`reverse` to rounding).

    Cost: about one inner step per scalar meta-parameter per step, plus one primal
    step; for many meta-parameters use reverse mode.
    """
    check_steps(steps)
    if outer_loss is None and meta_weights is None:
        raise ValueError("give an outer_loss, meta_weights, or both: the objective is empty")
    fu = ForwardUnroll(inner_loss, params, hparams, opt, second_order=second_order, meta_weights=meta_weights,
                       state=state, max_directions=max_directions)
    if not fu.run(steps):
        raise FloatingPointError(f"non-finite loss or gradient at step {fu.t}; lower the learning rate or the horizon")
    return fu.hypergrad(outer_loss)


def forward_online(inner_loss: InnerLoss, outer_loss: OuterLoss, params: Params, hparams: dict, opt, steps: int,
                   every: int, **kwargs) -> Iterator[tuple[int, dict[str, torch.Tensor], ForwardUnroll]]:
    """RTHO: yield ``(step, hypergradient, unroll)`` every ``every`` steps of one run.

    The caller may update ``hparams`` in place between yields; the tangents keep
    accumulating across updates (the real-time approximation of Franceschi et al. 2017).
    """
    check_steps(steps)
    check_steps(every, "every")
    fu = ForwardUnroll(inner_loss, params, hparams, opt, **kwargs)
    while fu.t < steps:
        fu.run(min(every, steps - fu.t))
        yield fu.t, fu.hypergrad(outer_loss), fu


@dataclass
class ForwardOptions(Options):
    """``max_directions``: refuse more scalar meta-parameters than this (cost is linear in them)."""

    max_directions: int = 1000


@register
class Forward(Estimator):
    """Forward mode (RTHO): tangents carried through the run; with ``every < steps`` they
    flow on across the outer updates (Franceschi et al. 2017's real-time approximation).
    """

    name = "forward"
    options_class = ForwardOptions

    def check(self, problem, meta_params) -> None:
        _directions(meta_params, self.options.max_directions)

    def init(self, problem, meta_params, generator=None):
        state = super().init(problem, meta_params, generator)
        state.extra["_unroll"] = ForwardUnroll(problem.inner_loss, problem.params, meta_params, problem.opt,
                                               second_order=problem.second_order, meta_weights=problem.meta_weights,
                                               max_directions=self.options.max_directions)
        return state

    def _chunk(self, meta_params, state, n):
        fu = state.extra["_unroll"]
        fu.restart_objective()
        finite = fu.run(n)
        state.t += n
        state.params, state.opt_state = fu.params, fu.state
        if not finite:
            return {k: torch.zeros_like(v) for k, v in meta_params.items()}, math.nan, False
        ol = state.problem.outer_loss
        grads = fu.hypergrad(ol)
        ml = fu.meta_loss + (float(ol(fu.params, meta_params)) if ol is not None else 0.0)
        return grads, ml, True

    def state_dict(self, state):
        out = super().state_dict(state)
        if state is not None:
            fu = state.extra["_unroll"]
            out["extra"] = {"tangents": fu.tangents, "t": fu.t}
        return out

    def load_state_dict(self, state, saved):
        if saved:
            fu = state.extra["_unroll"]
            fu.params, fu.state, fu.t = saved["params"], saved["opt_state"], saved["extra"]["t"]
            fu.tangents = saved["extra"]["tangents"]
            state.t, state.params, state.opt_state = saved["t"], saved["params"], saved["opt_state"]
        return state
