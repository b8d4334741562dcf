#!/usr/bin/env python
"""Cost of one PES / ES meta-step against truncated backprop at the same horizon, side by side.

One meta-step of :class:`l2o.train.MetaTrainer` (one inner run of ``--horizon`` steps,
an outer update every ``--truncation`` steps, the L2L setup) is timed for each method on
the same optimizee seeds, interleaved, and the median over ``--repeats`` is reported as
a ratio to truncated backprop. PES and ES with ``N`` antithetic pairs run ``2N`` unrolls
without a graph, either as one batch (``batched``: the particles' losses, gradients and
optimizer steps vmapped together) or one particle after another (``sequential``);
truncated backprop runs one unroll with a graph and a backward pass. The last column is
the cost of one antithetic pair, relative to truncated backprop.

    python benchmarks/pes_cost.py --data-dir DATA [--task mnist_mlp] [--population 1,4,8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from l2o.config import TrainConfig
from l2o.train import MetaTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="data root (default $L2O_DATA_DIR or ./data)")
    ap.add_argument("--task", default="mnist_mlp")
    ap.add_argument("--optimizer", default="lstm")
    ap.add_argument("--learn", default=None, help="comma-separated hyperparameters to learn (default: all weights)")
    ap.add_argument("--horizon", type=int, default=100)
    ap.add_argument("--truncation", type=int, default=20)
    ap.add_argument("--population", default="1,4,8", help="PES/ES antithetic pairs to time (comma-separated)")
    ap.add_argument("--methods", default="pes", help="comma-separated: pes, es")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pops = [int(x) for x in args.population.split(",")]
    learn = args.learn.split(",") if args.learn else None

    def trainer(method: str, population: int = 1, batched: bool | None = None) -> MetaTrainer:
        tr = MetaTrainer(TrainConfig(task=args.task, data_dir=args.data_dir, optimizer=args.optimizer, learn=learn,
                                     horizon=args.horizon, truncation=args.truncation, method=method,
                                     population=population, log_dir="/dev/null", checkpoint="/dev/null"))
        if batched is not None:
            tr.estimator.options.batched = batched
        return tr

    runs = {"truncated": (trainer("truncated"), 0)}
    for n in pops:
        for m in args.methods.split(","):
            for mode in ("batched", "sequential"):
                runs[f"{m} N={n} {mode}"] = (trainer(m, n, mode == "batched"), n)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, (tr, _) in runs.items():
            tr.meta_step = 0  # the same optimizees for every method
            t0 = time.perf_counter()
            tr.meta_step_once()
            times[name].append(time.perf_counter() - t0)
        for name, (tr, _) in runs.items():
            if getattr(tr.estimator, "_unbatchable", None):
                print(f"note: {name} fell back to sequential: {tr.estimator._unbatchable}")
    base = statistics.median(times["truncated"])
    print(f"{args.task}, {args.optimizer}{' learn=' + args.learn if args.learn else ''}, horizon {args.horizon}, "
          f"truncation {args.truncation}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'method':<24} {'s / meta-step':>14} {'vs truncated':>13} {'per pair':>9} {'unrolls':>8}")
    for name, ts in times.items():
        m, n = statistics.median(ts), runs[name][1]
        per_pair = f"{m / base / n:.2f}x" if n else ""
        unrolls = str(2 * n) if n else "1+bwd"
        print(f"{name:<24} {m:>14.3f} {m / base:>12.2f}x {per_pair:>9} {unrolls:>8}")
    for n in pops:
        for m in args.methods.split(","):
            b, s = (statistics.median(times[f"{m} N={n} {x}"]) for x in ("batched", "sequential"))
            print(f"{m} N={n}: batched / sequential = {b / s:.2f}")


if __name__ == "__main__":
    main()
