"""Validation of a family run against Adam tuned for each validation member.

A learned optimizer is judged by its VeLO-style speedup over tuned Adam on each task
(:mod:`l2o.speedup`: > 1 exactly when its final loss is below Adam's). A family run's
validation measures the same thing: for each held-out member ``s`` (its problem,
initialisation and batches drawn from seed ``s``),

    score_s = -log(speedup of the learned optimizer over Adam tuned for member s)

(0 = as good as tuned Adam, < 0 better), averaged within each family component (``mlp``,
``conv``, ``quadratic``, ...) and then over the components, so each component weighs alike
whatever its loss scale or its number of members. ``log(final / initial loss)``, the earlier
figure, let the quadratics (log-ratios of -7 to -12) outweigh the MLPs (-1.5). The speedup,
not ``log(final loss / Adam's)``, is what is averaged because it is bounded (``[1/T, T]``)
and alike across components: on a quadratic that tuned Adam nearly solves, the loss ratio
reaches e^3 where the MLPs' are e^0.1, and one such member would outweigh a component.
``log(final loss / Adam's)`` is reported beside it, per component.

Adam's learning rate is tuned once per member, at the start of a run, on the member itself
over a log grid (widened at an edge, :func:`l2o.evaluate.tune_lr`); its curve and final
loss are kept in the checkpoint, so a resumed run scores against the same figures without
re-tuning.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from . import optim
from .evaluate import rollout, tune_lr
from .speedup import SMOOTH, smooth, speedup
from .tasks import Task, seeded

Mapper = Callable[[Callable[[Any], Any], list], list]


def component(task: Task, seed: int) -> str:
    """The family component of validation member ``seed`` (``"task"`` for a plain task)."""
    return getattr(task.sample(seeded(seed, 0)), "family", "task")


def curve_of(run) -> list[float]:
    """A single run's curve as :func:`l2o.speedup.speedup` compares it: smoothed losses, then the final loss."""
    if run.diverged:
        return [math.inf] * (len(run.curve) + 1)
    steps = len(run.curve)
    return smooth(np.asarray(run.curve, dtype=float), max(1, round(SMOOTH * steps))).tolist() + [run.final_loss]


def tune_members(task: Task, seeds: Sequence[int], horizon: int, grid: Sequence[float],
                 map_fn: Mapper | None = None, extend: int = 2) -> dict[str, dict[str, Any]]:
    """Adam tuned for each member: ``{str(seed): {"lr", "final", "curve"}}`` (``curve`` as :func:`curve_of`)."""
    out: dict[str, dict[str, Any]] = {}
    for s in seeds:
        lr, scores = tune_lr(task, lambda lr: optim.Adam(lr=lr), grid, [s], horizon, extend=extend, map_fn=map_fn)
        out[str(s)] = {"lr": float(lr), "final": float(scores[lr]),
                       "curve": curve_of(rollout(task, optim.Adam(lr=lr), s, horizon))}
    return out


def relative_scores(task: Task, opt: optim.DifferentiableOptimizer, seeds: Sequence[int], horizon: int,
                    reference: dict[str, dict[str, Any]], map_fn: Mapper | None = None
                    ) -> dict[str, list[tuple[float, float]]]:
    """Per component, ``(-log speedup, log(final loss / Adam's))`` of each member over tuned Adam, in seed order.

    A member whose learned run diverges scores ``log T`` (speedup ``1/T``) and ``inf``; one
    where tuned Adam itself diverged on every rate is left out (it measures nothing).
    """
    mapper = map_fn or (lambda fn, items: [fn(x) for x in items])
    usable = [s for s in seeds if math.isfinite(reference[str(s)]["final"]) and reference[str(s)]["final"] > 0]

    def one(s: int) -> tuple[str, tuple[float, float]]:
        run = rollout(task, opt, s, horizon)
        ref = reference[str(s)]
        ok = math.isfinite(run.final_loss) and run.final_loss > 0
        return component(task, s), (-math.log(speedup(curve_of(run), ref["curve"])),
                                    math.log(run.final_loss / ref["final"]) if ok else math.inf)

    groups: dict[str, list[tuple[float, float]]] = {}
    for group, v in mapper(one, usable):
        groups.setdefault(group, []).append(v)
    return groups


def balanced_mean(groups: dict[str, list[float]]) -> tuple[float, dict[str, float]]:
    """``(mean over components of each component's mean, {component: its mean})``; components sorted by name."""
    means = {g: sum(v) / len(v) for g, v in sorted(groups.items()) if v}
    return (sum(means.values()) / len(means) if means else math.nan), means
