"""Speedup over tuned Adam, VeLO style: how many times fewer steps an optimizer needs for a loss.

The curve compared
    For one optimizer on one task, ``L(t)`` for ``t = 0 .. T`` (``T`` the horizon):
    ``L(t)`` for ``t < T`` is the training-loss curve averaged over the evaluation seeds
    (``curve.mean`` in results.json: the minibatch loss of the weights after ``t``
    steps), smoothed by a centred moving average over 5% of the horizon so one lucky
    minibatch does not count; ``L(T)`` is the table's final training loss (the same
    seeds' weights after ``T`` steps, each on 10 fresh minibatches), unsmoothed. If any
    seed diverged, ``L(T) = inf``: a run that blew up reaches no finite loss.

Steps needed to reach a loss ``y`` (:func:`reach_step`)
    The first step from which the curve stays at or below ``y`` until the horizon,
    linearly interpolated between recorded steps (so fractional, and curves recorded
    every ``k`` steps are handled by passing their step numbers). A dip that is not
    held does not count. Non-finite points (None, NaN, inf) count as above any target.

Speedup of a learned optimizer (final loss ``y_L``) over Adam (final loss ``y_A``), :func:`speedup`
    * ahead (``y_L < y_A``): ``T / s``, ``s`` the steps it needs to reach ``y_A``; > 1.
    * behind (``y_L > y_A``): ``s / T``, ``s`` the steps Adam needs to reach ``y_L``; < 1.
    * tie (``y_L == y_A``): Adam's steps to that loss / its steps to it (identical
      curves give exactly 1; two optimizers that both solve a problem exactly are
      told apart by when they got there).
    ``s`` is clamped to ``[1, T]``, so a speedup lies in ``[1/T, T]``; a value at
    either end is a bound (shown ``≥ T`` or ``≤ 1/T``): at least ``T`` when the
    optimizer is at Adam's final loss from its first step (or Adam diverged), at most
    ``1/T`` when it diverged. Both diverged: undefined (None). The speedup is > 1
    exactly when the final loss is below Adam's, so it never contradicts the table.

Over tasks, :func:`geomean_speedups` takes each optimizer's geometric mean.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

SMOOTH = 0.05  # moving-average window, as a fraction of the horizon


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (shrinking at the ends); NaN taints what follows."""
    h = window // 2
    c = np.concatenate([[0.0], np.cumsum(curve)])
    idx = np.arange(len(curve))
    lo, hi = np.maximum(idx - h, 0), np.minimum(idx + h + 1, len(curve))
    return (c[hi] - c[lo]) / (hi - lo)


def _values(curve: Sequence[float | None]) -> np.ndarray:
    """Float array with every non-finite entry (None, NaN, -inf too) as +inf: no loss is reached there."""
    v = np.array([math.inf if x is None else x for x in curve], dtype=float)
    v[~np.isfinite(v)] = math.inf
    return v


def _positions(steps: Sequence[float] | None, n: int) -> np.ndarray:
    x = np.arange(n, dtype=float) if steps is None else np.asarray(steps, dtype=float)
    if x.shape != (n,) or n < 2:
        raise ValueError(f"need a curve of at least 2 points with one step number each, got {n} and {x.shape}")
    if x[0] != 0 or np.any(np.diff(x) <= 0):
        raise ValueError("step numbers must start at 0 and increase")
    return x


def reach_step(curve: Sequence[float | None], target: float, steps: Sequence[float] | None = None) -> float | None:
    """Steps the curve needs to get to ``target`` and stay there until its end.

    Args:
        curve: losses at ``steps`` (non-finite entries count as above any target).
        target: the loss to reach (NaN is never reached; ``inf`` is reached at step 0).
        steps: increasing step numbers of the points, from 0 (default ``0 .. len-1``).

    Returns:
        The first (linearly interpolated) step from which every later point is
        ``<= target``, or None if the curve ends above it.
    """
    v, x = _values(curve), _positions(steps, len(curve))
    if math.isnan(target) or v[-1] > target:
        return None
    above = np.nonzero(v > target)[0]
    if above.size == 0:
        return float(x[0])
    i = int(above[-1])  # the last point above: v[i] > target >= v[i + 1]
    if math.isinf(v[i]):  # no line to interpolate along: the curve comes back at the next point
        return float(x[i + 1])
    return float(x[i] + (v[i] - target) / (v[i] - v[i + 1]) * (x[i + 1] - x[i]))


def speedup(learned: Sequence[float | None], adam: Sequence[float | None],
            steps: Sequence[float] | None = None) -> float | None:
    """Speedup of one optimizer over Adam on one task (the module docstring has the definition).

    Args:
        learned, adam: comparison curves at the same ``steps``, the last point of each
            its final loss at the horizon (see :func:`comparison_curve`).
        steps: step numbers of the points, from 0; the last is the horizon ``T``.

    Returns:
        A value in ``[1/T, T]``, or None when both final losses are non-finite.
    """
    x = _positions(steps, len(adam))
    if len(learned) != len(adam):
        raise ValueError(f"curves of different lengths: {len(learned)} and {len(adam)}")
    horizon = float(x[-1])
    y_l, y_a = _values(learned)[-1], _values(adam)[-1]
    if math.isinf(y_l) and math.isinf(y_a):
        return None

    def clamp(s: float | None) -> float:  # s is never None here: each curve ends at or below its target
        return min(max(float(s), 1.0), horizon)

    if y_l < y_a:
        return horizon / clamp(reach_step(learned, y_a, x))
    if y_l > y_a:
        return clamp(reach_step(adam, y_l, x)) / horizon
    return clamp(reach_step(adam, y_a, x)) / clamp(reach_step(learned, y_l, x))


def comparison_curve(summary: dict[str, Any], window: int | None = None) -> list[float]:
    """``L(0 .. T)`` of one optimizer's summary (``curve.mean``, ``final_loss``, ``diverged`` of results.json).

    The seed-mean curve smoothed over ``window`` steps (default 5% of the horizon),
    then the mean final loss (``inf`` if any seed diverged).
    """
    mean = np.array([math.nan if v is None else v for v in summary["curve"]["mean"]], dtype=float)
    window = window or max(1, round(SMOOTH * len(mean)))
    final = summary["final_loss"]["mean"]
    final = math.inf if summary.get("diverged") or final is None else float(final)
    return smooth(mean, window).tolist() + [final]


def add_speedups(task: dict[str, Any], reference: str = "adam") -> None:
    """Set ``speedup_vs_adam`` and ``steps_to_adam`` on every optimizer of one task's results.

    ``steps_to_adam`` is :func:`reach_step` of Adam's final loss (None when the
    optimizer ends above it). Both are None for every optimizer when ``reference``
    was not evaluated.
    """
    opts = task["optimizers"]
    ref = comparison_curve(opts[reference]) if reference in opts else None
    for o in opts.values():
        curve = comparison_curve(o)
        o["speedup_vs_adam"] = None if ref is None else speedup(curve, ref)
        o["steps_to_adam"] = None if ref is None else reach_step(curve, ref[-1])


def geomean_speedups(tasks: dict[str, Any], reference: str = "adam") -> dict[str, dict[str, Any]]:
    """Per optimizer (the reference left out): geometric mean of its speedups over the tasks.

    Returns:
        ``{optimizer: {"geomean", "tasks", "undefined", "ahead", "bounds"}}``: the mean
        over ``tasks`` tasks with a speedup (``undefined`` more had none: both
        diverged), ``ahead`` of them above 1, ``bounds`` of them clamped to ``T`` or
        ``1/T`` (so the geometric mean is itself only a bound when ``bounds > 0``).
    """
    out: dict[str, dict[str, Any]] = {}
    for task in tasks.values():
        if reference not in task["optimizers"]:
            continue
        horizon = task["steps"]
        for name, o in task["optimizers"].items():
            if name == reference:
                continue
            row = out.setdefault(name, {"logs": [], "undefined": 0, "ahead": 0, "bounds": 0})
            s = o.get("speedup_vs_adam")
            if s is None:
                row["undefined"] += 1
                continue
            row["logs"].append(math.log(s))
            row["ahead"] += s > 1
            row["bounds"] += s >= horizon or s <= 1.0 / horizon
    return {name: {"geomean": math.exp(sum(r["logs"]) / len(r["logs"])) if r["logs"] else None,
                   "tasks": len(r["logs"]), "undefined": r["undefined"], "ahead": r["ahead"], "bounds": r["bounds"]}
            for name, r in out.items()}


def format_speedup(value: float | None, horizon: int) -> str:
    """``1.83x``; ``≥ 100x`` / ``≤ 0.01x`` for the clamped ends; ``—`` for None."""
    if value is None:
        return "—"
    if value >= horizon:
        return f"≥ {value:.3g}x"
    if value <= 1.0 / horizon:
        return f"≤ {value:.3g}x"
    return f"{value:.3g}x"
