"""Cost of each hypergradient estimator relative to plain training, on the L2L paper's MNIST MLP.

For the 784-20-10 sigmoid MLP (``l2o.tasks.get("mnist_mlp")``, batch 128) trained by
heavy-ball momentum, this measures

* **time**: wall-clock time of each estimator over a ``T``-step unroll divided by the
  time of ``T`` plain training steps (``unroll(graph=False)``, same optimizer, same
  minibatches). Configurations are timed side by side in one process, interleaved
  (the order rotates every repeat), after one warm-up run each; the table shows
  medians. CPU time of the process is shown next to wall time because other jobs
  may run on the machine: CPU time is what the estimator itself consumes.
* **memory**: peak of the bytes held by live CPU tensors during one run, relative to
  its start, at ``T=100`` and ``T=1000``: every allocation and free of the torch CPU
  allocator is recorded with ``torch.profiler`` (``profile_memory=True``) and the
  running sum's maximum is reported. This is what the autograd graph, optimizer state
  and live minibatches cost, exactly and independent of how the C allocator reuses
  pages (process RSS on a machine with a 200 MB data set in memory was too coarse to
  see a 20-step graph). The data set itself, loaded before the run, is not counted.

Targets (from the issue): full reverse, second order <= 2.5x; first order <= 2x;
forward with ``k`` meta-parameters <= (2 + k)x; truncated memory flat in ``T``.

Usage::

    python benchmarks/hypergrad_cost.py --data-dir DATA          # DATA holds MNIST/raw/
    python benchmarks/hypergrad_cost.py --data-dir DATA --quick  # seconds: smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

import l2o
from l2o.hypergrad import forward, reverse, truncated, unroll

TARGETS = {"reverse (2nd order)": 2.5, "reverse (1st order)": 2.0, "forward, k=1": 3.0, "forward, k=2": 4.0}


# ----------------------------------------------------------------------------- one configuration
class Problem:
    """The MNIST MLP, its initial weights and a reproducible minibatch stream."""

    def __init__(self, data_dir: str | None, batch_size: int, seed: int = 0) -> None:
        self.task = l2o.tasks.get("mnist_mlp", data_dir=data_dir, batch_size=batch_size)
        gen = l2o.tasks.seeded(seed, 0)
        self.params = self.task.init(gen)
        self.val = self.task.batch("test", l2o.tasks.seeded(seed, 2))
        self.seed = seed

    def losses(self) -> tuple[Callable, Callable]:
        """A fresh (inner, outer) pair: every call replays the same minibatches."""
        stream = l2o.tasks.BatchStream(self.task, "train", l2o.tasks.seeded(self.seed, 1))
        task, val = self.task, self.val
        return (lambda p, h, t: task.loss(p, stream[t])), (lambda p, h: task.loss(p, val))


def meta(k: int) -> tuple[dict[str, torch.Tensor], l2o.optim.Momentum]:
    """``k`` meta-parameters of heavy-ball momentum: lr (k >= 1) and momentum (k = 2)."""
    h = {"lr": torch.tensor(0.1, requires_grad=True)}
    if k >= 2:
        h["momentum"] = torch.tensor(0.9, requires_grad=True)
    return h, l2o.optim.Momentum(lr=h["lr"], momentum=h.get("momentum", 0.9))


def configurations(prob: Problem, T: int, K: int) -> dict[str, Callable[[], object]]:
    """Name -> zero-argument callable running that estimator once over ``T`` steps."""

    def plain():
        inner, _ = prob.losses()
        h, opt = meta(2)
        return unroll(inner, prob.params, h, opt, T, graph=False)

    def rev(second_order: bool = True, truncate: int | None = None):
        inner, outer = prob.losses()
        h, opt = meta(2)
        return reverse(inner, outer, prob.params, h, opt, steps=T, truncate=truncate, second_order=second_order)

    def acc_truncated():
        inner, outer = prob.losses()
        h, opt = meta(2)
        return truncated(inner, outer, prob.params, h, opt, steps=T, truncate=K)

    def fwd(k: int):
        inner, outer = prob.losses()
        h, opt = meta(k)
        return forward(inner, outer, prob.params, h, opt, steps=T)

    return {
        "plain training": plain,
        "reverse (2nd order)": rev,
        "reverse (1st order)": lambda: rev(False),
        f"truncated, K={K} (accumulated)": acc_truncated,
        f"reverse(truncate={K})": lambda: rev(True, K),
        "forward, k=1": lambda: fwd(1),
        "forward, k=2": lambda: fwd(2),
    }


# ----------------------------------------------------------------------------- time
def time_table(prob: Problem, T: int, K: int, repeats: int) -> list[dict]:
    configs = configurations(prob, T, K)
    names = list(configs)
    for name in names:  # warm-up: lazy imports on first use and allocator growth
        configs[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no config always runs first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            configs[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    base_w, base_c = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    rows = []
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append({"name": name, "wall_s": w, "ratio": w / base_w, "cpu_ratio": c / base_c,
                     "target": TARGETS.get(name)})
    return rows


def print_time_table(rows: list[dict], T: int, judge: bool = True) -> None:
    """Markdown table; ``judge=False`` (smoke runs) leaves the "met" column empty."""
    print(f"\n| estimator (T={T}) | wall time [s] | x plain (wall) | x plain (CPU) | target | met |")
    print("|---|---:|---:|---:|---:|:---:|")
    for r in rows:
        target = f"<= {r['target']:.1f}x" if r["target"] else ""
        met = ("yes" if r["ratio"] <= r["target"] else "NO") if (r["target"] and judge) else ""
        print(f"| {r['name']} | {r['wall_s']:.3f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {target} | {met} |")


# ----------------------------------------------------------------------------- memory
MEMORY_CONFIGS = ("plain training", "reverse (2nd order)", "truncated, K={K} (accumulated)", "reverse(truncate={K})")


def peak_tensor_mb(run: Callable[[], object]) -> float:
    """Peak MiB of CPU tensor memory allocated (net of frees) while ``run()`` executes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # one "[memory]" event per allocation (+bytes) or free (-bytes), in time order
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def memory_table(prob: Problem, K: int, steps: list[int]) -> None:
    names = [n.format(K=K) for n in MEMORY_CONFIGS]
    peaks = {(name, T): peak_tensor_mb(configurations(prob, T, K)[name]) for T in steps for name in names}
    print("\n| configuration | " + " | ".join(f"peak tensor memory, T={T} [MB]" for T in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{peaks[name, T]:.1f}" for T in steps) + " |")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None,
                    help="data root holding MNIST/raw/ (default: $L2O_DATA_DIR, else ./data)")
    ap.add_argument("--steps", type=int, default=100, help="unroll length T for the time table (default 100)")
    ap.add_argument("--truncate", type=int, default=20, help="truncation length K (default 20)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (default 5)")
    ap.add_argument("--memory-steps", type=int, nargs="*", default=None,
                    help="unroll lengths for the memory table (default 100 1000, none with --quick; "
                         "give the flag alone to skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable timings on a small busy machine)")
    ap.add_argument("--batch-size", type=int, default=128, help="minibatch size (default 128, as in the L2L paper)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run in seconds: T=10, K=5, 1 repeat, no memory table unless --memory-steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.truncate, args.repeats = 10, 5, 1
    if args.memory_steps is None:
        args.memory_steps = [] if args.quick else [100, 1000]
    if min(args.steps, args.truncate, args.repeats) < 1:
        ap.error("--steps, --truncate and --repeats must be positive")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), float32, mnist_mlp 784-20-10 sigmoid, "
          f"batch {args.batch_size}, Momentum(lr, momentum)")
    try:
        prob = Problem(args.data_dir, args.batch_size)
    except l2o.tasks.DataNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    rows = time_table(prob, args.steps, args.truncate, args.repeats)
    print_time_table(rows, args.steps, judge=not args.quick)
    if args.quick:
        print("\n--quick: T=10 and one repeat, so per-call costs (outer loss, setup) weigh in and the "
              "ratios are not judged against the targets; run without --quick for that.")
    if args.memory_steps:
        memory_table(prob, args.truncate, args.memory_steps)


if __name__ == "__main__":
    main()
