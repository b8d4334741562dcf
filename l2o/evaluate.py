"""Running optimizers on optimizees without graphs, and tuning baselines' learning rates.

Every optimizer given the same ``seed`` sees the same problem, the same initial
parameters and the same minibatch sequence (:func:`l2o.tasks.seeded` streams), so
curves are comparable seed by seed. Evaluation never builds a graph through the
steps (``unroll(..., graph=False)``): memory stays flat however long the run.

The evaluation metric is :func:`final_loss`, the mean training loss of the final
parameters over 10 fresh minibatches (the same 10 for every optimizer). The whole-
test-set loss and accuracy come from :func:`split_metrics`, at the end of a run and at
the steps named by ``rollout(..., eval_at=...)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .hypergrad import detach, unroll
from .optim import DifferentiableOptimizer
from .tasks import BatchStream, ModuleTask, Params, Task, seeded


@dataclass
class Rollout:
    """One optimizer run on one seed: the training-loss curve and the final figures.

    Attributes:
        curve: minibatch training loss at steps ``0 .. steps-1`` (``inf`` after divergence).
        final_loss: :func:`final_loss` of the last parameters (``inf`` if diverged).
        params: parameters after the last step (the last finite ones if diverged).
        diverged: a non-finite loss or gradient stopped the run.
        extra: ``{"test": {step: {"loss": float, "accuracy": float | None}}}`` when
            ``eval_at`` was given.
    """

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


def split_metrics(problem: Task, params: Params, split: str = "test", chunk: int = 2048) -> dict[str, float | None]:
    """Loss and accuracy of ``params`` on a whole split (``task.full_batch(split)``).

    Image tasks are evaluated in chunks of ``chunk`` examples so memory stays bounded;
    the figures are exact means over the split. Returns ``{"loss": None, "accuracy":
    None}`` for tasks without a full split and ``accuracy`` None for regression tasks.
    """
    batch = problem.full_batch(split)
    if batch is None:
        return {"loss": None, "accuracy": None}
    params = detach(params)
    with torch.no_grad():
        if isinstance(problem, ModuleTask):  # (x, y) images: chunk to bound activation memory
            x, y = batch
            n, loss_sum, acc_sum = y.shape[0], 0.0, 0.0
            for i in range(0, n, chunk):
                part = (x[i:i + chunk], y[i:i + chunk])
                m = part[1].shape[0]
                loss_sum += float(problem.loss(params, part)) * m
                acc = problem.accuracy(params, part)  # None: a regression model (a user's task)
                acc_sum = None if acc is None or acc_sum is None else acc_sum + float(acc) * m
            return {"loss": loss_sum / n, "accuracy": None if acc_sum is None else acc_sum / n}
        acc = problem.accuracy(params, batch)
        return {"loss": float(problem.loss(params, batch)), "accuracy": None if acc is None else float(acc)}


def rollout(task: Task, opt: DifferentiableOptimizer, seed: int, steps: int, n_final: int = 10,
            eval_at: Sequence[int] = ()) -> Rollout:
    """Train one optimizee (problem, init and batches from ``seed``) for ``steps`` steps, no graph.

    Args:
        task: the optimizee family; ``task.sample`` draws the problem from ``seed``.
        opt: any differentiable optimizer (it is only called, never changed).
        seed: selects problem, initial parameters, training and final-loss batches.
        steps: inner steps.
        n_final: minibatches averaged by :func:`final_loss`.
        eval_at: steps ``t`` (``0 <= t <= steps``) at which to measure
            :func:`split_metrics` of the parameters after ``t`` steps; stored in
            ``extra["test"]``. Steps after a divergence are left out.
    """
    gen = seeded(seed, 0)
    problem = task.sample(gen)
    params = problem.init(gen)
    stream = BatchStream(problem, "train", seeded(seed, 1))
    wanted = sorted({int(t) for t in eval_at})
    tests: dict[int, dict] = {}

    def probe(t: int, p: Params, loss: float) -> None:
        if t in wanted:
            tests[t] = split_metrics(problem, p)

    res = unroll(lambda p, h, t: problem.loss(p, stream[t]), params, {}, opt, steps, graph=False,
                 callback=probe if wanted else None)
    extra = {"test": tests} if wanted else {}
    if not res.finite:
        tests.pop(len(res.losses) - 1, None)  # measured on the step that blew up
        curve = res.losses + [math.inf] * (steps - len(res.losses))
        return Rollout(curve, math.inf, res.params, diverged=True, extra=extra)
    if steps in wanted:
        tests[steps] = split_metrics(problem, res.params)
    return Rollout(res.losses, final_loss(problem, res.params, seed, n_final), res.params, extra=extra)


def mean_final_loss(task: Task, make_opt: Callable[[], DifferentiableOptimizer], seeds: Sequence[int], steps: int) -> float:
    """Mean of :func:`final_loss` over ``seeds`` (``inf`` if any run diverged)."""
    vals = [rollout(task, make_opt(), s, steps).final_loss for s in seeds]
    return sum(vals) / len(vals)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``lo`` to ``hi`` inclusive."""
    if n < 2:
        return [lo]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def tune_lr(task: Task, make_opt: Callable[[float], DifferentiableOptimizer], grid: Sequence[float],
            seeds: Sequence[int], steps: int, extend: int = 0,
            on_score: Callable[[float, float], None] | None = None,
            map_fn: Callable[[Callable, list], list] | None = None) -> tuple[float, dict[float, float]]:
    """Pick the learning rate with the lowest mean final training loss on ``seeds``.

    Args:
        task, make_opt, seeds, steps: ``make_opt(lr)`` is scored by :func:`mean_final_loss`.
        grid: candidate learning rates (log-spaced, see :func:`log_grid`).
        extend: while the best rate is the smallest or largest one tried, try up to
            ``extend`` more rates beyond that edge, one grid ratio apart (a grid that
            was too narrow widens itself instead of reporting its edge).
        on_score: called as ``on_score(lr, score)`` after each rate (progress).
        map_fn: ``map_fn(fn, items) -> [fn(x) for x in items]``, e.g. spread over processes by
            :meth:`l2o.distributed.Context.map`; every rate of the grid is one call, so the
            work spreads evenly, and the scores are the same sums in the same order.

    Returns:
        ``(best_lr, {lr: mean final loss})``; diverged runs score ``inf``.
    """
    grid = sorted(float(g) for g in grid)
    if not grid:
        raise ValueError("tune_lr needs at least one learning rate")
    scores: dict[float, float] = {}
    seeds, mapper = list(seeds), map_fn or (lambda fn, items: [fn(x) for x in items])

    def score(*lrs: float) -> None:
        jobs = [(lr, s) for lr in lrs for s in seeds]
        vals = mapper(lambda job: rollout(task, make_opt(job[0]), job[1], steps).final_loss, jobs)
        for i, lr in enumerate(lrs):
            mine = vals[i * len(seeds):(i + 1) * len(seeds)]
            scores[lr] = sum(mine) / len(mine)  # as mean_final_loss: the same sum in the same order
            if on_score is not None:
                on_score(lr, scores[lr])

    score(*grid)
    ratio = (grid[-1] / grid[0]) ** (1.0 / (len(grid) - 1)) if len(grid) > 1 else 1.0
    for _ in range(extend if ratio > 1.0 else 0):
        best, tried = min(scores, key=lambda lr: scores[lr]), sorted(scores)
        if best == tried[-1] and math.isfinite(scores[best]):
            score(best * ratio)
        elif best == tried[0]:
            score(best / ratio)
        else:
            break
    best = min(sorted(scores), key=lambda lr: scores[lr])
    return best, scores
