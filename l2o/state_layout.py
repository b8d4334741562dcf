"""Split an optimizer's state into one state per parameter tensor, and merge it back.

A differentiable optimizer keeps one state for the whole dict of parameters it was
``init``-ed with: hand-designed ones as ``{key: tensor}`` dicts per parameter, the LSTM
as per-coordinate tensors batched over *all* coordinates (``[N, hidden]``). A
``torch.optim.Optimizer`` needs per-parameter state (a frozen parameter is skipped and
its state left untouched) but the learned optimizer is fastest on one batch. This
module bridges the two without knowing the optimizer's layout: :func:`infer` calls
``init`` on probe parameters of 3 and 5 coordinates, alone and together, and reads off
what every leaf of the state is:

    "keyed"    a dict keyed by parameter name          merge: {str(i): s_i["0"]}
    ("coord", a)  a tensor whose axis ``a`` runs over coordinates   merge: cat along a
    "shared"   a leaf that does not grow with the parameters (step counts)
               merge: must be equal in every state merged (else they go in separate calls)

A parameter's own state is always the state of ``init({"0": p})``, so merging the
states of ``p_0 .. p_k`` gives exactly ``init({"0": p_0, ..., str(k): p_k})`` and a step
on the merge is the optimizer's own batched step.
"""
from __future__ import annotations

from typing import Any

import torch

KEY = "0"  # the key of a parameter in its own, single-parameter state


class LayoutError(ValueError):
    """The optimizer's state has a shape this module cannot split per parameter."""


def _infer(full: Any, a: Any, b: Any) -> Any:
    if isinstance(full, dict):
        if set(full) == {"0", "1"} and set(a) == {"0"} and set(b) == {"0"}:
            return "keyed"
        if set(full) != set(a) or set(full) != set(b):
            raise LayoutError(f"state dict keys differ: {sorted(full)} vs {sorted(a)}")
        return {k: _infer(full[k], a[k], b[k]) for k in full}
    if isinstance(full, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(full) == len(a) == len(b)):
            raise LayoutError("state lists differ in length")
        return [_infer(f, x, y) for f, x, y in zip(full, a, b)]
    if isinstance(full, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and full.dim() == a.dim() == b.dim()):
            raise LayoutError("state tensors differ in rank")
        if full.shape == a.shape == b.shape:
            return "shared"
        axes = [i for i in range(full.dim()) if not (full.shape[i] == a.shape[i] == b.shape[i])]
        if len(axes) == 1 and a.shape[axes[0]] * 5 == b.shape[axes[0]] * 3 and \
                full.shape[axes[0]] == a.shape[axes[0]] + b.shape[axes[0]]:
            return ("coord", axes[0])
        raise LayoutError(f"a state tensor of shape {tuple(full.shape)} is not per coordinate")
    return "shared"


def infer(opt: Any, like: torch.Tensor) -> Any:
    """The layout of ``opt``'s state (see the module docstring), probed on tensors like ``like``.

    Raises:
        LayoutError: the state is not made of per-parameter dicts, per-coordinate tensors
            and shared leaves; the caller then steps each parameter on its own.
    """
    z3, z5 = like.new_zeros(3), like.new_zeros(5)
    with torch.no_grad():
        return _infer(opt.init({"0": z3, "1": z5}), opt.init({"0": z3}), opt.init({"0": z5}))


def shared_equal(layout: Any, s: Any, t: Any) -> bool:
    """Whether two single-parameter states agree on every shared leaf (so one call can step both)."""
    if layout == "keyed" or isinstance(layout, tuple):
        return True
    if isinstance(layout, dict):
        return all(shared_equal(layout[k], s[k], t[k]) for k in layout)
    if isinstance(layout, list):
        return all(shared_equal(lay, x, y) for lay, x, y in zip(layout, s, t))
    if isinstance(s, torch.Tensor):
        return isinstance(t, torch.Tensor) and s.shape == t.shape and bool(torch.equal(s, t))
    return type(s) is type(t) and s == t


def merge(layout: Any, states: list[Any]) -> Any:
    """The state of ``init({"0": p_0, "1": p_1, ...})`` from the single-parameter states of ``p_i``."""
    if layout == "keyed":
        return {str(i): s[KEY] for i, s in enumerate(states)}
    if isinstance(layout, tuple):
        return states[0] if len(states) == 1 else torch.cat(states, dim=layout[1])
    if isinstance(layout, dict):
        return {k: merge(layout[k], [s[k] for s in states]) for k in layout}
    if isinstance(layout, list):
        out = [merge(lay, [s[i] for s in states]) for i, lay in enumerate(layout)]
        return type(states[0])(out) if isinstance(states[0], tuple) else out
    return states[0]


def split(layout: Any, state: Any, sizes: list[int]) -> list[Any]:
    """Inverse of :func:`merge`: one single-parameter state per entry of ``sizes`` (views, no copy)."""
    if layout == "keyed":
        return [{KEY: state[str(i)]} for i in range(len(sizes))]
    if isinstance(layout, tuple):
        return list(torch.split(state, sizes, dim=layout[1])) if len(sizes) > 1 else [state]
    if isinstance(layout, dict):
        parts = {k: split(layout[k], state[k], sizes) for k in layout}
        return [{k: parts[k][i] for k in layout} for i in range(len(sizes))]
    if isinstance(layout, list):
        parts = [split(lay, s, sizes) for lay, s in zip(layout, state)]
        kind = type(state) if isinstance(state, tuple) else list
        return [kind(p[i] for p in parts) for i in range(len(sizes))]
    return [state] * len(sizes)
