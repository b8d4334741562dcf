"""Linear solvers on Hessian-vector products for implicit differentiation.

``H x = b`` by conjugate gradients or a truncated Neumann series, and the power
iteration behind the default Neumann step; ``H`` is only ever applied, never formed.
"""
from __future__ import annotations

from typing import Callable

import torch

Vec = list[torch.Tensor]


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def conjugate_gradient(hvp: Callable[[Vec], Vec], b: Vec, iters: int, tol: float = 1e-12) -> Vec:
    """Solve ``H x = b`` for symmetric positive-definite ``H`` given as ``hvp``."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = _dot(r, r)
    b_norm = float(rr) ** 0.5
    for _ in range(iters):
        if float(rr) ** 0.5 <= tol * max(b_norm, 1e-300):
            break
        hp = hvp(p)
        alpha = rr / _dot(p, hp)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * hi for ri, hi in zip(r, hp)]
        rr_new = _dot(r, r)
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x


def neumann(hvp: Callable[[Vec], Vec], b: Vec, iters: int, alpha: float) -> Vec:
    """``H^-1 b ~= alpha * sum_{j=0}^{iters} (I - alpha H)^j b`` (converges for ``alpha < 2 / lambda_max``)."""
    total = _neumann_sum(hvp, list(b), iters, alpha)
    torch._foreach_mul_(total, alpha)
    return total


def _neumann_sum(hvp: Callable[[Vec], Vec], b: Vec, iters: int, alpha: float, own_b: bool = False) -> Vec:
    """``sum_{j=0}^{iters} (I - alpha H)^j b`` (not yet times ``alpha``); empties the list ``b``.

    The terms ``w_{j+1} = w_j - alpha H w_j`` and their sum are updated in place: the
    first term is written into the first product's tensors and the sum into ``b``'s
    (with ``own_b``, i.e. the caller's gradients are its to overwrite) wherever
    :func:`_writable` finds them unshared, and ``b``'s tensors are dropped once used
    (the caller hands them over by the list). Each term then costs its
    Hessian-vector product and two passes, and no weight-sized tensor is allocated
    beyond the products' own, which matters where fresh memory page-faults. The caller
    applies ``alpha`` (folded into a pass of its own).
    """
    if iters == 0:  # the series' first term alone
        total = [t.clone() for t in b]
        b.clear()
        return total
    hv = hvp(b)
    if _writable(hv, b):
        for t, h in zip(b, hv):
            torch.add(t, h, alpha=-alpha, out=h)
        term = hv
    else:
        term = torch._foreach_add(b, hv, alpha=-alpha)
    del hv
    if own_b and _writable(b, term):
        total = list(b)
        torch._foreach_add_(total, term)
    else:
        total = list(torch._foreach_add(b, term))
    b.clear()
    for _ in range(iters - 1):
        hv = hvp(term)  # done with ``term`` as a direction before it is overwritten
        torch._foreach_add_(term, hv, alpha=-alpha)
        del hv
        torch._foreach_add_(total, term)
    return total


def _writable(ts: Vec, others: Vec) -> bool:
    """Whether tensors made by autograd may be overwritten: dense, not views, sharing memory with none of ``others``
    nor with each other (a sum's backward hands one gradient to both operands; an identity passes its input on)."""
    seen = {o.data_ptr() for o in others}
    for t in ts:
        if t._base is not None or t.requires_grad or not t.is_contiguous() or t.numel() == 0 or t.data_ptr() in seen:
            return False
        seen.add(t.data_ptr())
    return True


def largest_eigenvalue(hvp: Callable[[Vec], Vec], like: Vec, iters: int = 20, seed: int = 0) -> float:
    """Power iteration estimate of the Hessian's largest-magnitude eigenvalue."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in like]
    lam = 1.0
    for _ in range(iters):
        n = float(_dot(v, v)) ** 0.5
        v = [t / n for t in v]
        hv = hvp(v)
        lam = float(_dot(v, hv))
        v = hv
    return abs(lam)
