"""The L2 penalty ``0.5 * sum(decay * p**2)`` with its derivatives written out.

Implicit differentiation of ``loss + penalty`` takes the penalty's gradient with a
graph, then differentiates that gradient once per Hessian-vector product and once for
the mixed product with the decay. Recorded by autograd, ``softplus(raw) * p * p`` turns
into several full-size passes in each of those, each allocating a tensor the size of
the weights. Here each derivative is one product:

* :class:`_Penalty` is the penalty; its gradient ``decay * p * grad`` is
  :class:`_PenaltyGrad`, one autograd node whose own derivatives are
  ``V * decay * grad`` (Hessian-vector product) and ``V * p * grad * f'(x)`` (mixed
  product), computed only for the inputs the running backward uses.
* The decay is ``f(x)`` with ``f`` the identity or ``softplus``; its value and slope
  come in as constants (a caller may cache them while ``x`` is unchanged), while ``x``
  stays the differentiable input, so gradients reach the raw decays.
* Asked for a graph of the second derivatives (a third derivative), the backward
  falls back to the plain formula, differentiable in every input.

Derivatives are tested against the plain formula in float64 (gradcheck, gradgradcheck).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _wanted(ctx, i: int) -> bool:
    """Whether the running backward uses the gradient of input ``i``.

    ``needs_input_grad`` only says that the input requires grad; ``autograd.grad(y, p)``
    does not need the decay's gradient even though the decay requires it. The engine
    answers for inner nodes; for a leaf under ``autograd.grad`` (which it cannot answer
    for) or an older torch, the gradient is computed.
    """
    if not ctx.needs_input_grad[i]:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(ctx.next_functions[i][0]))
    except (RuntimeError, AttributeError):
        return True


def _scale(grad: torch.Tensor) -> float | torch.Tensor:
    """The incoming gradient as a number where reading it is free (a CPU scalar), else the tensor."""
    if grad.device.type == "cpu" and grad.numel() == 1:
        return float(grad)
    return grad


def _times(t: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """``t * s``, in place in ``t`` (a tensor made by the caller), skipped for ``s == 1``."""
    if isinstance(s, float) and s == 1.0:
        return t
    return t.mul_(s)


def _plain_decay(x: torch.Tensor, soft: bool) -> torch.Tensor:
    return F.softplus(x) if soft else x


class _Penalty(torch.autograd.Function):
    """``0.5 * sum(f(x) * p**2)``; ``fx = f(x)`` and ``dfx = f'(x)`` (None: identity) as constants."""

    @staticmethod
    def forward(ctx, p, x, fx=None, dfx=None, soft=False):
        fx = x.detach() if fx is None else fx
        ctx.save_for_backward(p, x, fx, dfx)
        ctx.soft = soft
        # f(x) * p is the gradient as well: kept for the first backward, then let go
        # (a graph kept for a second backward recomputes it rather than hold it)
        ctx.fxp = torch.mul(fx, p)
        return 0.5 * torch.dot(ctx.fxp.reshape(-1), p.reshape(-1).to(ctx.fxp.dtype))

    @staticmethod
    def backward(ctx, grad):
        p, x, fx, dfx = ctx.saved_tensors
        fxp, ctx.fxp = ctx.fxp, None
        gp = gx = None
        if _wanted(ctx, 0):
            gp = _PenaltyGrad.apply(p, x, grad, fx, dfx, ctx.soft, [fxp])
        del fxp
        if _wanted(ctx, 1):
            if torch.is_grad_enabled():  # a graph of this gradient is asked for: the plain formula
                slope = torch.sigmoid(x) if ctx.soft else 1.0
                gx = (0.5 * grad * p * p * slope).sum_to_size(x.shape)
            else:
                gx = _times(torch.mul(p, p), 0.5 * _scale(grad))
                gx = (gx if dfx is None else gx.mul_(dfx)).sum_to_size(x.shape)
        return gp, gx, None, None, None


class _PenaltyGrad(torch.autograd.Function):
    """The penalty's gradient ``f(x) * p * grad``, one node with written-out derivatives."""

    @staticmethod
    def forward(ctx, p, x, grad, fx, dfx, soft, fxp=(None,)):
        ctx.save_for_backward(p, x, grad, fx, dfx)
        ctx.soft = soft
        fxp = fxp[0] if fxp[0] is not None else torch.mul(fx, p)  # ``fxp``: a list handing over f(x) * p
        return _times(fxp, _scale(grad))

    @staticmethod
    def backward(ctx, v):
        p, x, grad, fx, dfx = ctx.saved_tensors
        need = [_wanted(ctx, i) for i in range(3)]
        gp = gx = gg = None
        if torch.is_grad_enabled():  # a graph of the second derivatives: the plain formula
            d = _plain_decay(x, ctx.soft)
            if need[0]:
                gp = v * d * grad
            if need[1]:
                gx = (v * p * grad * (torch.sigmoid(x) if ctx.soft else 1.0)).sum_to_size(x.shape)
            if need[2]:
                gg = (v * d * p).sum().reshape(grad.shape)
            return gp, gx, gg, None, None, None, None
        s = _scale(grad)
        if need[0]:  # Hessian-vector product: the Hessian is diagonal
            gp = _times(torch.mul(v, fx), s)
        if need[1]:  # mixed product with the decay's raw parameter
            gx = _times(torch.mul(v, p), s)
            gx = (gx if dfx is None else gx.mul_(dfx)).sum_to_size(x.shape)
        if need[2]:
            gg = torch.mul(v, fx).mul_(p).sum().reshape(grad.shape)
        return gp, gx, gg, None, None, None, None


def penalty(p: torch.Tensor, x: torch.Tensor, fx: torch.Tensor | None = None, dfx: torch.Tensor | None = None,
            soft: bool = False) -> torch.Tensor:
    """``0.5 * sum(decay * p**2)`` with ``decay = softplus(x)`` (``soft``) or ``x``.

    Args:
        p: the parameter.
        x: the differentiable decay (identity) or its raw parameter (``soft``); it may
            broadcast over ``p``.
        fx: the decay's value ``f(x)`` without a graph (computed from ``x`` if None).
        dfx: ``f'(x)`` without a graph (``sigmoid(x)`` for softplus; computed if None).
    """
    if soft:
        if fx is None or dfx is None:
            with torch.no_grad():
                fx, dfx = F.softplus(x), torch.sigmoid(x)
    elif dfx is not None:
        raise ValueError("penalty: dfx is the softplus slope; the identity decay takes none")
    return _Penalty.apply(p, x, fx, dfx, soft)
