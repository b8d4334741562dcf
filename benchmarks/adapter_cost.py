#!/usr/bin/env python
"""Cost of ``l2o.LearnedOptimizer.step`` against the functional step it wraps and torch.optim.Adam.

On the CIFAR-10 example's convnet (13,642 parameters in 10 tensors), one process, one
thread, the three timed in rounds side by side (median of rounds), plus one forward +
backward of the convnet at batch 128 for scale:

    python benchmarks/adapter_cost.py [--checkpoint checkpoints/lstm_cifar10.pt] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import l2o  # noqa: E402
from train_cifar10 import convnet  # noqa: E402


def per_call_ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints", "lstm_cifar10.pt"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = convnet()
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    F.cross_entropy(model(x), y).backward()
    adapter = l2o.LearnedOptimizer(model.parameters(), args.checkpoint)
    fopt = adapter.functional
    params = {str(i): q.detach().clone() for i, q in enumerate(model.parameters())}
    grads = {str(i): q.grad.clone() for i, q in enumerate(model.parameters())}
    state = fopt.init(params)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)

    def functional() -> None:
        with torch.no_grad():
            fopt.step(params, grads, state)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    timed = {"LearnedOptimizer.step": adapter.step, "functional opt.step": functional,
             "torch.optim.Adam.step": adam.step, "forward+backward (batch 128)": forward_backward}
    for fn in timed.values():
        fn()  # warm up
    rounds: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(args.rounds):
        for name, fn in timed.items():
            rounds[name].append(per_call_ms(fn, args.calls))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    n = sum(q.numel() for q in model.parameters())
    print(f"{n} parameters in {len(params)} tensors, {os.path.basename(args.checkpoint)}, 1 thread, "
          f"median of {args.rounds} rounds x {args.calls} calls")
    for name, ms in med.items():
        print(f"  {name:<30} {ms:8.2f} ms")
    print(f"  LearnedOptimizer / functional step: {med['LearnedOptimizer.step'] / med['functional opt.step']:.3f}x")
    print(f"  LearnedOptimizer / torch Adam:      {med['LearnedOptimizer.step'] / med['torch.optim.Adam.step']:.1f}x")


if __name__ == "__main__":
    main()
