#!/usr/bin/env python
"""Cost of one PES / ES meta-step against truncated backprop at the same horizon, side by side.

One meta-step of :class:`l2o.train.MetaTrainer` (one inner run of ``--horizon`` steps,
an outer update every ``--truncation`` steps, the L2L setup) is timed for each method on
the same optimizee seeds, interleaved, and the median over ``--repeats`` is reported as
a ratio to truncated backprop. PES and ES with ``N`` antithetic pairs run ``2N`` unrolls
without a graph; truncated backprop runs one unroll with a graph and a backward pass.

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
    ap.add_argument("--horizon", type=int, default=100)
    ap.add_argument("--truncation", type=int, default=20)
    ap.add_argument("--population", default="1,4,8", help="PES/ES antithetic pairs to time (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pops = [int(x) for x in args.population.split(",")]

    def trainer(method: str, population: int = 1) -> MetaTrainer:
        return MetaTrainer(TrainConfig(task=args.task, data_dir=args.data_dir, optimizer=args.optimizer,
                                       horizon=args.horizon, truncation=args.truncation, method=method,
                                       population=population, log_dir="/dev/null", checkpoint="/dev/null"))

    runs = {"truncated": trainer("truncated")}
    runs.update({f"{m} N={n}": trainer(m, n) for n in pops for m in ("pes", "es")})
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, tr in runs.items():
            tr.meta_step = 0  # the same optimizees for every method
            t0 = time.perf_counter()
            tr.meta_step_once()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["truncated"])
    print(f"{args.task}, {args.optimizer}, horizon {args.horizon}, truncation {args.truncation}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'method':<14} {'s / meta-step':>14} {'vs truncated':>13} {'unrolls':>8}")
    for name, ts in times.items():
        m = statistics.median(ts)
        unrolls = "1+bwd" if name == "truncated" else str(2 * int(name.split("=")[1]))
        print(f"{name:<14} {m:>14.3f} {m / base:>12.2f}x {unrolls:>8}")


if __name__ == "__main__":
    main()
