"""The evaluation suite: learned optimizers against tuned baselines on held-out tasks.

``SUITE`` lists the L2L paper's generalisation experiments and a few more, each a
named ``(task, options, steps)``. :func:`run` tunes every baseline's learning rate per
task on tuning seeds (cached on disk), runs every optimizer on the evaluation seeds
(same problems, initialisations and minibatches for all), and writes the report as it
goes: ``results.json`` / ``results.md`` after each task, ``<task>.png``, ``speedup.png``
(speedups over tuned Adam, :mod:`l2o.speedup`) and one TensorBoard run per optimizer
under ``tb/<task>/<optimizer>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import checkpoint, optim, report, tasks
from .distributed import LOCAL, Context
from .evaluate import Rollout, log_grid, rollout, tune_lr
from .optim import DifferentiableOptimizer
from .tasks import DataNotFoundError, Task


@dataclass(frozen=True)
class Entry:
    """One suite task: ``tasks.get(task, **options)`` run for ``steps`` steps."""

    name: str
    task: str
    options: dict = field(default_factory=dict)
    steps: int = 100
    description: str = ""
    optional: bool = False  # skipped with a note (not an error) when its data is not on disk
    dataset: str | None = None  # what an optional entry needs on disk (it is never downloaded)


SUITE: list[Entry] = [
    Entry("mnist_mlp", "mnist_mlp", {}, 100, "MNIST, MLP 1x20 sigmoid (the training task)"),
    Entry("mnist_mlp_200", "mnist_mlp", {}, 200, "MNIST, MLP 1x20 sigmoid, 2x the training horizon"),
    Entry("mnist_mlp_1000", "mnist_mlp", {}, 1000, "MNIST, MLP 1x20 sigmoid, 10x the training horizon"),
    Entry("mnist_mlp_h40", "mnist_mlp", {"hidden": [40]}, 100, "MNIST, MLP 1x40 sigmoid"),
    Entry("mnist_mlp_2layer", "mnist_mlp", {"hidden": [20, 20]}, 100, "MNIST, MLP 2x20 sigmoid"),
    Entry("mnist_mlp_relu", "mnist_mlp", {"activation": "relu"}, 100, "MNIST, MLP 1x20 ReLU"),
    Entry("fashion_mnist_mlp", "fashion_mnist_mlp", {}, 100, "Fashion-MNIST, MLP 1x20 sigmoid"),
    Entry("quadratic", "quadratic", {"dim": 10}, 100, "10-d quadratics ||Wx - y||^2, fresh W, y per seed"),
    Entry("cifar10_conv", "cifar10_conv", {}, 100, "CIFAR-10, 3 conv layers + 32 hidden", optional=True,
          dataset="cifar10"),
]
ENTRIES = {e.name: e for e in SUITE}

BASELINES = ("sgd", "nesterov", "rmsprop", "adam")
# 9 half-decade points each, centred where each optimizer's best rate usually lies;
# tune_lr widens a grid by up to EXTEND points when the best rate is at its edge.
GRIDS = {"sgd": (1e-3, 1e1, 9), "nesterov": (1e-3, 1e1, 9), "rmsprop": (1e-5, 1e-1, 9), "adam": (1e-4, 1e0, 9)}
EXTEND = 2
EVAL_SEEDS = list(range(1000, 1020))
TUNING_SEEDS = list(range(5))


def select(names: Sequence[str] | None) -> list[Entry]:
    """Suite entries by name, in the order given (all of them for None); ValueError names the choices."""
    if not names:
        return list(SUITE)
    unknown = [n for n in names if n not in ENTRIES and ":" not in n]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(ENTRIES)} "
                         f"or give an import path package.module:function")
    out: list[Entry] = []
    for n in dict.fromkeys(names):
        if n in ENTRIES:
            out.append(ENTRIES[n])
            continue
        tasks.check(n)  # ValueError (one line) if it cannot be imported
        short, i = n.rpartition(":")[2], 1  # file names and report keys: the function's name, made unique
        name = short
        while name in ENTRIES or any(e.name == name for e in out):
            name, i = f"{short}_{i}", i + 1
        out.append(Entry(name, n, {}, 100, f"user task {n}"))
    return out


def build_tasks(entries: Sequence[Entry], data_dir: str | None = None, device: str = "cpu",
                log: Callable[[str], None] = print) -> list[tuple[Entry, Task]]:
    """Build (and load the data of) every entry before any work starts.

    An entry marked ``optional`` whose data is not on disk is skipped with a one-line note
    through ``log`` (it is not downloaded: CIFAR-10 is 170 MB, and its first evaluation
    would add the tuning of four baselines); any other failure raises
    (DataNotFoundError, ValueError).
    """
    from .tasks.data import on_disk

    built = []
    for e in entries:
        if e.optional and e.dataset and not on_disk(e.dataset, data_dir):
            log(f"note: skipping {e.name}: its data is not under the data root (it is not downloaded for you; "
                f"put it there or pass --data-dir)")
            continue
        opts = dict(e.options, device=device)
        if "data_dir" in tasks.options(e.task):
            opts["data_dir"] = data_dir
        try:
            built.append((e, tasks.get(e.task, **opts)))
        except DataNotFoundError as exc:
            if not e.optional:
                raise
            log(f"note: skipping {e.name}: {exc}")
    return built


Learned = dict[str, tuple[str, DifferentiableOptimizer]]  # display name -> (checkpoint path, optimizer)


def load_learned(paths: Sequence[str], which: str = "best", device: str = "cpu") -> Learned:
    """Saved optimizers by display name (the file stem, made unique): ``{name: (path, optimizer)}``.

    Raises:
        l2o.checkpoint.CheckpointError: a file is missing, unreadable or not an l2o checkpoint.
    """
    out: Learned = {}
    for path in paths:
        opt = checkpoint.build_optimizer(checkpoint.load(path, map_location=device), which).to(device)
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem == "checkpoint":  # meta_train.py's runs/<name>/checkpoint.pt: the run's name says more
            stem = os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
        name, i = stem, 1
        while name in out or name in BASELINES:
            name, i = f"{stem}_{i}", i + 1
        out[name] = (path, opt.eval())
    return out


def check_portable(learned: Learned, built: Sequence[tuple[Entry, Task]]) -> None:
    """Refuse, before any work, a saved optimizer whose decays are learned per weight of other parameters.

    A per-weight decay is keyed by the parameter names and shapes of the task it was
    learned on; on another task its step failed with a KeyError after the baselines' tuning.

    Raises:
        ValueError: naming the checkpoint, the task and both parameter layouts.
    """
    from .optim import WeightDecay

    def shown(shapes: dict) -> str:
        text = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        return text if len(text) <= 80 else text[:77] + "..."

    for _, (path, opt) in learned.items():
        wanted = [m._shapes for m in opt.modules() if isinstance(m, WeightDecay) and m.per_weight]
        for entry, task in built if wanted else ():
            gen = torch.Generator().manual_seed(0)
            have = {k: [int(n) for n in v.shape] for k, v in task.sample(gen).init(gen).items()}
            if any(w != have for w in wanted):
                raise ValueError(f"{path!r} learned one weight decay per weight of a task with parameters "
                                 f"{shown(wanted[0])}; task {entry.name!r} has {shown(have)}: evaluate it on "
                                 f"the task it was learned on (--tasks)")


SHIPPED_TUNING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_lrs.json")


class TuningCache:
    """Tuned learning rates in one JSON file, keyed by everything that determines them.

    A lookup reads the user's file first, then the read-only file shipped with l2o
    (``l2o/tuned_lrs.json``: the default suite tuned on the real datasets), so a first
    evaluation of the default suite needs no tuning. New results go to the user's file only.

    Args:
        folder: where the user's ``tuning.json`` lives; None: keep no cache of one's own.
        shipped: the read-only fallback file (None: none).
        read: False ignores every cached value (``--retune``) but still writes new ones.
    """

    def __init__(self, folder: str | None, shipped: str | None = SHIPPED_TUNING, read: bool = True) -> None:
        self.path = None if folder is None else os.path.join(os.path.expanduser(folder), "tuning.json")
        self.shipped, self.read = shipped, read

    @staticmethod
    def default_folder() -> str:
        """``$L2O_CACHE_DIR``, else ``$XDG_CACHE_HOME/l2o``, else ``~/.cache/l2o``."""
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.environ.get("L2O_CACHE_DIR") or os.path.join(xdg, "l2o")

    @staticmethod
    def key(**fields: Any) -> str:
        return json.dumps(report.clean(fields), sort_keys=True)

    @staticmethod
    def _read_file(path: str | None) -> dict:
        if path is None:
            return {}
        try:
            with open(path) as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):  # absent or damaged: start afresh (it is only a cache)
            return {}

    def _read(self) -> dict:
        return self._read_file(self.path)

    def get(self, key: str) -> dict | None:
        if not self.read:
            return None
        hit = self._read().get(key)
        return hit if hit is not None else self._read_file(self.shipped).get(key)

    def put(self, key: str, value: dict) -> None:
        if self.path is None:
            return
        data = self._read()
        data[key] = report.clean(value)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(self.path))
        try:
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def data_fingerprint(task: Task) -> dict | None:
    """What identifies a task's data without naming where it lives: split sizes and a label digest.

    The cache key uses this rather than the data folder's path, so tuned rates computed on
    one machine serve every copy of the same dataset (and never a different or tiny one).
    """
    splits = getattr(task, "_splits", None)
    if not splits:
        return None
    train = splits["train"]
    digest = hashlib.sha1(train.y[:4096].cpu().numpy().tobytes()).hexdigest()[:16]
    return {"train": len(train), "test": len(splits["test"]), "labels": digest}


def tune(task: Task, entry_task: str, name: str, steps: int, grid: Sequence[float], seeds: Sequence[int],
         cache: TuningCache, on_score: Callable[[float, float], None] | None = None,
         ctx: Context = LOCAL) -> dict[str, Any]:
    """Tuned learning rate of baseline ``name`` on ``task`` (from the cache when it has it).

    With several processes (``ctx``) rank 0 reads and writes the cache and the rollouts
    are spread over the ranks; the scores are the same as in one process.

    Returns:
        ``{"lr", "scores": [[lr, mean final loss], ...], "at_edge", "cached"}``;
        ``at_edge`` is true when the best rate is still the smallest or largest tried.
    """
    key = cache.key(v=2, task=entry_task, options=task.config(), steps=steps, grid=[float(g) for g in grid],
                    seeds=list(seeds), optimizer=name, dtype=str(torch.get_default_dtype()),
                    data=data_fingerprint(task))
    hit = ctx.decide(lambda: cache.get(key))
    if hit is not None:
        return {**hit, "cached": True}
    device = getattr(task, "device", "cpu")
    best, scores = tune_lr(task, lambda lr: optim.make(name, lr=lr).to(device), grid, seeds, steps, extend=EXTEND,
                           on_score=on_score, map_fn=ctx.map)
    tried = sorted(scores)
    value = {"lr": best, "scores": [[lr, scores[lr]] for lr in tried],
             "at_edge": len(tried) > 1 and best in (tried[0], tried[-1])}
    if ctx.is_main:
        cache.put(key, value)
    return {**report.clean(value), "cached": False}


def _bar(total: int, desc: str, enabled: bool, leave: bool = True):
    """A tqdm bar on a terminal, plain periodic lines otherwise (:func:`l2o.progress.bar`); none if not ``enabled``."""
    from .progress import bar

    return bar(total, desc, enabled, leave=leave)


def run(built: Sequence[tuple[Entry, Task]], learned: Learned, out: str, *,
        baselines: Sequence[str] = BASELINES, seeds: Sequence[int] = EVAL_SEEDS,
        tuning_seeds: Sequence[int] = TUNING_SEEDS, grids: dict[str, tuple[float, float, int]] | None = None,
        steps: int | None = None, cache: TuningCache | None = None, n_checkpoints: int = 4,
        progress: bool = True, notes: Sequence[str] = (), log: Callable[[str], None] = print,
        ctx: Context = LOCAL) -> dict[str, Any]:
    """Evaluate learned optimizers and tuned baselines on the built suite entries.

    Args:
        built: ``(entry, task)`` pairs from :func:`build_tasks`.
        learned: saved optimizers from :func:`load_learned`.
        out: output folder (results.json, results.md, ``<task>.png``, ``speedup.png``, ``tb/``).
        baselines: short names for :func:`l2o.optim.make`.
        seeds / tuning_seeds: evaluation and tuning seeds (must not overlap).
        grids: ``{baseline: (lo, hi, n)}`` learning-rate grids (default :data:`GRIDS`).
        steps: overrides every entry's number of steps.
        cache: tuning cache (default: none).
        n_checkpoints: test loss/accuracy measured at ``k * steps / n_checkpoints``.
        progress: show progress bars (on a terminal).
        notes: lines recorded in the results (e.g. skipped tasks).
        log: where one-line notes go (a best rate at the edge of its grid).
        ctx: the process group (:mod:`l2o.distributed`): every rollout of tuning and
            evaluation runs on one rank and its figures are gathered, so the results are
            those of one process; rank 0 alone writes files and logs.

    Returns:
        The results dict that was written to ``out/results.json``.
    """
    if set(seeds) & set(tuning_seeds):
        raise ValueError("evaluation and tuning seeds overlap; tuned rates would be judged on their own seeds")
    unknown = [b for b in baselines if b not in GRIDS and b not in (grids or {})]
    if unknown:
        raise ValueError(f"no learning-rate grid for baseline {unknown[0]!r}; choose from {', '.join(GRIDS)}")
    grids, cache = {**GRIDS, **(grids or {})}, cache or TuningCache(None)
    progress, log = progress and ctx.is_main, log if ctx.is_main else (lambda msg: None)
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    config = {"seeds": list(seeds), "tuning_seeds": list(tuning_seeds), "baselines": list(baselines),
              "grids": {b: list(grids[b]) for b in baselines}, "n_final_batches": 10,
              "checkpoints": {n: p for n, (p, _) in learned.items()}, "runtime_s": None}
    results: dict[str, Any] = {"config": config, "notes": list(notes), "tasks": {}}
    bar = _bar(len(built) * (len(baselines) + len(learned)) * len(seeds), "evaluate", progress)
    for entry, task in built:
        t0, horizon = time.perf_counter(), steps or entry.steps
        runs = _tuned_baselines(entry, task, horizon, baselines, grids, tuning_seeds, cache, progress, log, ctx)
        for name, (path, opt) in learned.items():
            runs[name] = (lambda opt=opt: opt, {"kind": "learned", "source": path, "lr": opt.hparams().get("lr")})
        task_res = {"task": entry.task, "description": entry.description, "options": task.config(),
                    "steps": horizon, "optimizers": {}}
        eval_at = sorted({round(k * horizon / n_checkpoints) for k in range(1, n_checkpoints + 1)})
        def one(job: tuple[str, int]) -> Rollout:
            bar.set_postfix_str(f"{entry.name}/{job[0]}", refresh=False)
            r = rollout(task, runs[job[0]][0](), job[1], horizon, eval_at=eval_at)
            bar.update()
            r.params = {}  # only the figures travel between processes
            return r

        jobs = [(name, s) for name in runs for s in seeds]
        done = ctx.map(one, jobs)
        for i, (name, (_, info)) in enumerate(runs.items()):
            mine = done[i * len(seeds):(i + 1) * len(seeds)]
            task_res["optimizers"][name] = {**report.clean(info), **report.summarize(mine, seeds)}
        report.add_speedups(task_res)
        if ctx.is_main:
            for name, o in task_res["optimizers"].items():
                report.write_tensorboard(os.path.join(out, "tb", entry.name, name), o)
        task_res["runtime_s"] = time.perf_counter() - t0
        results["tasks"][entry.name] = task_res
        results["speedup_vs_adam"] = report.geomean_speedups(results["tasks"])
        if ctx.is_main:
            report.plot_task(os.path.join(out, f"{entry.name}.png"), entry.name, task_res)
            report.plot_speedups(os.path.join(out, "speedup.png"), results)
        config["runtime_s"] = time.perf_counter() - start
        if ctx.is_main:
            report.write_tables(out, results)  # after every task: an interrupted run keeps what it finished
    bar.close()
    return results


def _tuned_baselines(entry: Entry, task: Task, steps: int, baselines: Sequence[str], grids: dict,
                     tuning_seeds: Sequence[int], cache: TuningCache, progress: bool,
                     log: Callable[[str], None], ctx: Context = LOCAL) -> dict[str, tuple[Callable, dict]]:
    """``{baseline: (make_optimizer, report_info)}`` with each learning rate tuned (or read from the cache)."""
    runs: dict[str, tuple[Callable, dict]] = {}
    device = getattr(task, "device", "cpu")
    tbar = _bar(sum(grids[b][2] for b in baselines), f"tune {entry.name}", progress, leave=False)
    for b in baselines:
        tbar.set_postfix_str(b)
        tuned = tune(task, entry.task, b, steps, log_grid(*grids[b]), tuning_seeds, cache,
                     on_score=lambda lr, score: tbar.update(), ctx=ctx)
        if tuned["at_edge"]:
            log(f"note: {entry.name}: {b}'s best learning rate {tuned['lr']:.3g} is at the edge of the grid tried")
        runs[b] = (lambda b=b, lr=tuned["lr"]: optim.make(b, lr=lr).to(device),
                   {"kind": "baseline", "source": f"l2o.optim.make({b!r})", "lr": tuned["lr"],
                    "lr_at_edge": tuned["at_edge"], "lr_scores": tuned["scores"]})
    tbar.close()
    return runs
