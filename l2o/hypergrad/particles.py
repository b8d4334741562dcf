"""PES / ES particles run through one truncation together, as one batch.

The ``2N`` perturbed unrolls of a truncation differ only in their meta-parameters and
their inner state, so one inner step of all of them is one call of

    loss_i, g_i = value_and_grad(inner_loss)(params_i, h_i, t)      vmapped over i
    params_i, state_i = opt.step(params_i, g_i, state_i)  with h_i  vmapped over i

(:func:`torch.func.vmap`; the perturbed ``h_i`` are swapped into the optimizer with
:class:`l2o.optim.base.substitute`, so an LSTM's weights become a stack of ``2N`` weight
sets and its matrix products batched ones, and a learning rate a vector of ``2N`` rates).
Every particle sees the same values as when it runs alone: the same minibatch at step
``t`` (random draws inside the loss are made once per step, ``randomness="same"``, as
the sequential particles replay a cached batch stream), the same meta-loss accumulated
in float64 in the same order, so batched and sequential estimates agree to rounding.

Where batching cannot reproduce the sequential semantics exactly, :func:`run` returns
None and the caller runs the truncation one particle after another from the same
starting state:

* a particle meets a non-finite loss or gradient: the sequential path stops that
  particle and gives up the chunk, leaving the particles before it advanced and the
  others where they were; replaying it sequentially keeps that state exactly;
* the loss or the step draws from the global random generator (dropout): each
  sequential particle would draw its own numbers (the generator is rewound first);
* the loss or the optimizer cannot be vmapped (``.item()``, in-place writes into
  captured tensors, data-dependent control flow): raised as :class:`Unbatchable`.

One case is not detected: a loss that draws from its *own* generator on every call (not
a replayed stream such as :class:`l2o.tasks.BatchStream`) gets one draw per step shared
by all particles, where sequential particles would draw in turn; give such a loss
``batched=False``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..optim.base import substitute

from .unroll import InnerLoss, OuterLoss, Params, split_term, weight_at

Part = tuple[Params, Any]


class Unbatchable(RuntimeError):
    """The loss, the outer loss or the optimizer step could not run under ``torch.func.vmap``."""


def stack_parts(parts: Sequence[Part]) -> tuple[Params, list[Any], Any]:
    """``(stacked params, state leaves, state spec)``: tensors stacked on a new dim 0, other leaves shared.

    Raises :class:`Unbatchable` when the particles' states differ in a non-tensor leaf
    (a step count) or in structure.
    """
    keys = list(parts[0][0])
    params = {k: torch.stack([p[k] for p, _ in parts]) for k in keys}
    flat = [tree_flatten(s) for _, s in parts]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat):
        raise Unbatchable("particles' optimizer states differ in structure")
    leaves = []
    for j, first in enumerate(flat[0][0]):
        column = [f[0][j] for f in flat]
        if isinstance(first, torch.Tensor):
            leaves.append(torch.stack(column))
        elif any(c != first for c in column[1:]):
            raise Unbatchable("particles' optimizer states differ in a non-tensor entry")
        else:
            leaves.append(first)
    return params, leaves, spec


def unstack_parts(params: Params, leaves: list[Any], spec: Any, n: int) -> list[Part]:
    """The inverse of :func:`stack_parts`: particle ``i`` gets views of row ``i``."""
    out = []
    for i in range(n):
        p = {k: v[i] for k, v in params.items()}
        s = tree_unflatten([x[i] if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        out.append((p, s))
    return out


def run(inner_loss: InnerLoss, outer_loss: OuterLoss | None, opt, meta_params: dict[str, torch.Tensor],
        h: dict[str, torch.Tensor], params: Params, leaves: list[Any], spec: Any, start: int, steps: int,
        meta_weights: Sequence[float] | torch.Tensor | None, read_outer: bool
        ) -> tuple[torch.Tensor, Params, list[Any], Any] | None:
    """Advance every particle ``steps`` inner steps from ``start``, batched.

    Args:
        h: the particles' meta-parameters, each stacked ``[P, *shape]``.
        params, leaves, spec: the particles' stacked state (:func:`stack_parts`).
        read_outer: add the outer loss at the end (the chunk ends with this truncation).

    Returns:
        ``(objective [P] in float64, params, leaves, spec)`` after the steps, or None if a
        particle met a non-finite value or global randomness was drawn (replay sequentially).

    Raises:
        Unbatchable: something could not be vmapped.
    """
    ids = {k: id(v) for k, v in meta_params.items()}
    tensor_at = [isinstance(x, torch.Tensor) for x in leaves]
    consts = [None if t else x for x, t in zip(leaves, tensor_at)]
    out_spec: list[Any] = []

    def step_one(h_i, p_i, s_i, g_i):
        it = iter(s_i)
        state = tree_unflatten([next(it) if t else c for t, c in zip(tensor_at, consts)], spec)
        with substitute(opt, {ids[k]: h_i[k] for k in h_i}):
            new_p, new_s = opt.step(p_i, g_i, state)
        new_leaves, new_spec = tree_flatten(new_s)
        out_spec[:] = [new_spec, [None if isinstance(x, torch.Tensor) else x for x in new_leaves]]
        return new_p, [x for x in new_leaves if isinstance(x, torch.Tensor)]

    rng = torch.get_rng_state()
    objective = torch.zeros(next(iter(params.values())).shape[0], dtype=torch.float64)
    s_tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    try:
        # the differentiable (out-of-place) code paths of the optimizer; nothing here requires grad, so no graph
        with torch.enable_grad():
            for t in range(start, start + steps):
                same: list[bool] = []

                def loss_one(p_i, h_i, t=t):
                    loss, term = split_term(inner_loss(p_i, h_i, t))
                    same[:] = [term is loss]
                    return loss, term.detach()

                grads, (loss, term) = vmap(grad_and_value(loss_one, has_aux=True), randomness="same")(params, h)
                if not _finite(loss, grads):
                    torch.set_rng_state(rng)  # the sequential replay draws as if this never ran
                    return None
                w = weight_at(meta_weights, t)
                if w is not None:  # the sequential unroll's float(w) * float(term), in float64
                    objective = objective + float(w) * (loss if same[0] else term).detach().to(torch.float64)
                params, s_tensors = vmap(step_one, randomness="same")(h, params, s_tensors, grads)
                params = {k: v.detach() for k, v in params.items()}
                s_tensors = [x.detach() for x in s_tensors]
                spec = out_spec[0]
                tensor_at = [x is None for x in out_spec[1]]
                consts = out_spec[1]
            if read_outer and outer_loss is not None:
                with torch.no_grad():
                    objective = objective + vmap(outer_loss, randomness="same")(params, h).to(torch.float64)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        torch.set_rng_state(rng)
        raise Unbatchable(f"{type(exc).__name__}: {exc}") from exc
    if not torch.equal(torch.get_rng_state(), rng):  # per-call randomness: each particle must draw its own
        torch.set_rng_state(rng)
        return None
    if not bool(torch.isfinite(objective).all()):
        return None
    it = iter(s_tensors)
    leaves = [next(it) if t else c for t, c in zip(tensor_at, consts)]
    return objective, params, leaves, spec


def floats(tree: Any) -> int:
    """Number of floating-point entries in the tensors of ``tree`` (one particle's state)."""
    return sum(x.numel() for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor) and x.is_floating_point())


def _finite(loss: torch.Tensor, grads: Params) -> bool:
    """Every particle's loss and gradient finite (one host synchronisation)."""
    # the largest magnitude is finite exactly when every entry is (a NaN propagates through amax)
    peaks = [loss.detach().abs().amax().to(torch.float64)]
    peaks += [g.detach().abs().amax().to(torch.float64) for g in grads.values() if g.numel()]
    return float(torch.stack(peaks).max()) < float("inf")


def perturbed(theta: dict[str, torch.Tensor], eps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``h`` stacked ``[2N, ...]``: row ``2i`` is ``theta + eps_i``, row ``2i + 1`` is ``theta - eps_i``.

    The same arithmetic as the sequential ``theta + sign * eps_i``, so the values are bitwise equal.
    """
    out = {}
    for k, th in theta.items():
        e = eps[k].repeat_interleave(2, dim=0)
        sign = torch.tensor([1.0, -1.0], dtype=e.dtype, device=e.device).repeat(eps[k].shape[0])
        out[k] = th + sign.reshape(-1, *([1] * th.dim())) * e
    return out

