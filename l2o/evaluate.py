"""Running optimizers on optimizees without graphs, and tuning baselines' learning rates.

Every optimizer given the same ``seed`` sees the same problem, the same initial
parameters and the same minibatch sequence (:func:`l2o.tasks.seeded` streams), so
curves are comparable seed by seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .hypergrad import unroll
from .optim import DifferentiableOptimizer
from .tasks import BatchStream, Params, Task, seeded


@dataclass
class Rollout:
    """One optimizer run on one seed: the training-loss curve and the final figures."""

    curve: list[float]
    final_loss: float
    params: Params
    diverged: bool = False
    extra: dict = field(default_factory=dict)


def final_loss(problem: Task, params: Params, seed: int, n_batches: int = 10) -> float:
    """Mean training loss of ``params`` over ``n_batches`` fresh minibatches (same batches for every optimizer)."""
    gen = seeded(seed, 2)
    with torch.no_grad():
        vals = [float(problem.loss(params, problem.batch("train", gen))) for _ in range(n_batches)]
    v = sum(vals) / len(vals)
    return v if math.isfinite(v) else math.inf


def rollout(task: Task, opt: DifferentiableOptimizer, seed: int, steps: int, n_final: int = 10) -> Rollout:
    """Train one optimizee (problem, init and batches from ``seed``) for ``steps`` steps, no graph."""
    gen = seeded(seed, 0)
    problem = task.sample(gen)
    params = problem.init(gen)
    stream = BatchStream(problem, "train", seeded(seed, 1))
    res = unroll(lambda p, h, t: problem.loss(p, stream[t]), params, {}, opt, steps, graph=False)
    if not res.finite:
        curve = res.losses + [math.inf] * (steps - len(res.losses))
        return Rollout(curve, math.inf, res.params, diverged=True)
    return Rollout(res.losses, final_loss(problem, res.params, seed, n_final), res.params)


def mean_final_loss(task: Task, make_opt: Callable[[], DifferentiableOptimizer], seeds: Sequence[int], steps: int) -> float:
    vals = [rollout(task, make_opt(), s, steps).final_loss for s in seeds]
    return sum(vals) / len(vals)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``lo`` to ``hi`` inclusive."""
    if n < 2:
        return [lo]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def tune_lr(task: Task, make_opt: Callable[[float], DifferentiableOptimizer], grid: Sequence[float],
            seeds: Sequence[int], steps: int) -> tuple[float, dict[float, float]]:
    """Pick the learning rate with the lowest mean final training loss on ``seeds``.

    Returns:
        ``(best_lr, {lr: mean final loss})``; diverged runs score ``inf``.
    """
    scores = {lr: mean_final_loss(task, lambda lr=lr: make_opt(lr), seeds, steps) for lr in grid}
    best = min(scores, key=lambda lr: scores[lr])
    return best, scores
