#!/usr/bin/env python
"""l2o's speed against PyTorch and its peers, as ratios measured side by side in one process.

Sections (``--only`` picks some; all by default):

* ``lstm``: the learned optimizer's step without a graph (the shipped checkpoint, one
  coordinate per MNIST-MLP weight) against one matmul doing the same number of
  multiply-adds (target <= 3x); the eager fused step and, with ``--compile``, the
  ``torch.compile``d one (compile time printed); a 100-step run with it against a
  ``torch.optim.Adam`` run (target <= 6x); one meta-training unroll (T=100, truncation 20,
  with graph) against 100 plain Adam steps (target <= 10x).
* ``loop``: 100 steps of ``unroll(graph=False)`` with SGD against the same 100 steps of a
  plain ``torch.optim.SGD`` loop on the same module and batches (target <= 1.05x).
* ``handcrafted``: ``step`` without a graph against ``torch.optim``'s foreach step, at 16k
  (MNIST MLP) and 623k (784-784-10) parameters (target <= 1.1x).
* ``reverse``: the reverse-mode hypergradient through T=100 steps of SGD with a learnable
  learning rate (and momentum) against torchopt's functional optimizer on the same loss
  function (target <= 0.9x); both answers are compared in float64. Skipped with a message
  when torchopt is not installed.
* ``implicit``: ``implicit(..., method="neumann", iters=3)`` with default arguments on the
  623k weight-decay problem against one plain ``torch.optim.SGD`` step (target <= 4x).

Every figure is the median over ``--repeats`` interleaved repetitions; 1 torch thread.

    python benchmarks/speed.py --data-dir DATA [--only lstm,loop] [--compile] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_cases as cases  # noqa: E402

SECTIONS = ("lstm", "loop", "handcrafted", "reverse", "implicit")


class Clock:
    """Wall-clock timing that waits for the device (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def compare(clock: Clock, fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per callable; one warm-up each, then interleaved with a rotating order."""
    names = list(fns)
    for n in names:
        fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(clock(fns[n]))
    return {n: statistics.median(v) for n, v in times.items()}


def row(name: str, ours: float, ref: float, target: float | None) -> str:
    ratio = ours / ref
    met = "" if target is None else ("yes" if ratio <= target else "NO")
    tgt = "" if target is None else f"<= {target:g}x"
    return f"| {name} | {1e3 * ours:.2f} | {1e3 * ref:.2f} | {ratio:.2f}x | {tgt} | {met} |"


HEADER = "| figure | ours [ms] | reference [ms] | ratio | target | met |\n|---|---:|---:|---:|---:|:---:|"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="data root holding MNIST/raw (default $L2O_DATA_DIR or ./data)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--checkpoint", default=os.path.join("checkpoints", "lstm_mnist.pt"),
                    help="learned optimizer for the lstm section (default checkpoints/lstm_mnist.pt)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd LSTM step")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or args.repeats < 1 or args.threads < 1:
        ap.error(f"unknown section {bad[0]!r}" if bad else "--repeats and --threads must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, {args.threads} torch thread(s), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", float32, medians of {args.repeats} interleaved repeats")
    for section in only:
        print(f"\n### {section}\n")
        getattr(cases, section)(args, device, lambda fns: compare(clock, fns, args.repeats), row, HEADER)


if __name__ == "__main__":
    main()
