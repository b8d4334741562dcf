#!/usr/bin/env python
"""Time default meta-steps with 1 and 2 torch threads, on the machine as it is and with one core kept busy.

Why meta_train.py, meta_eval.py and the experiments default to ``--threads 1``: these
models are small, so a second intra-op thread gains little, and when another process
holds a core every op waits for the descheduled thread. Conditions are interleaved
(round-robin, median of the rounds) and the load average is printed with the figures,
since the machine may be shared.

    python benchmarks/threads.py --data-dir DATA --rounds 2 --steps 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from l2o.config import TrainConfig  # noqa: E402
from l2o.train import MetaTrainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="meta-steps per measurement (default 1)")
    args = ap.parse_args()
    trainer = MetaTrainer(TrainConfig(data_dir=args.data_dir))  # the default: horizon 100, truncation 20
    conditions = [(1, False), (2, False), (1, True), (2, True)]
    times: dict = {c: [] for c in conditions}
    for r in range(args.rounds):
        for threads, busy in conditions:
            torch.set_num_threads(threads)
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                time.sleep(0.5 if busy else 0)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.meta_step_once()
                times[(threads, busy)].append((time.perf_counter() - t0) / args.steps)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            print(f"round {r}: {threads} thread(s), busy loop {'on ' if busy else 'off'}: "
                  f"{times[(threads, busy)][-1]:.1f} s/meta-step (load average {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| condition | 1 thread | 2 threads | 2 / 1 |\n|---|---|---|---|")
    for busy in (False, True):
        one, two = (statistics.median(times[(t, busy)]) for t in (1, 2))
        label = "one core held by a busy loop" if busy else "as found (no extra load)"
        print(f"| {label} | {one:.1f} s | {two:.1f} s | {two / one:.2f}x |")
    print(f"(s per default meta-step, median of {args.rounds} rounds; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
