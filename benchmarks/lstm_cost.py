#!/usr/bin/env python
"""Cost of the learned LSTM optimizer, as ratios measured side by side in one run.

Prints, for the default MNIST task (784-20-10 sigmoid MLP, batch 128):

* LSTM step / Adam step: the optimizer's ``step`` alone, on the same parameters and gradients;
* LSTM training run / Adam training run: 100 inner steps (loss, gradient, step), no graph;
* meta-unroll / plain Adam run: one meta-training unroll (100 steps, truncated backprop
  every 20 steps, meta-gradient computed) divided by 100 plain Adam training steps.

Each figure is the median over ``--repeats`` interleaved repetitions.

    python benchmarks/lstm_cost.py --data-dir DATA [--checkpoint checkpoints/lstm_mnist.pt]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import l2o
from l2o.hypergrad import segments, unroll
from l2o.tasks import BatchStream, seeded


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="data root holding MNIST/raw (default $L2O_DATA_DIR or ./data)")
    ap.add_argument("--checkpoint", help="learned optimizer to time (default: a fresh LSTM with --inputs/--readout)")
    ap.add_argument("--inputs", default="paper")
    ap.add_argument("--readout", default="linear")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = l2o.tasks.get("mnist_mlp", data_dir=args.data_dir)
    lstm = (l2o.load_optimizer(args.checkpoint) if args.checkpoint
            else l2o.optim.LSTMOptimizer(inputs=args.inputs, readout=args.readout))
    adam = l2o.optim.Adam(lr=0.01)
    prob = task.sample(seeded(0, 0))
    params = prob.init(seeded(0, 0))
    batch = prob.batch("train", seeded(0, 1))
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = dict(zip(p, torch.autograd.grad(prob.loss(p, batch), list(p.values()))))
    states = {"lstm": lstm.init(params), "adam": adam.init(params)}

    def opt_steps(opt, name, n=100):
        with torch.no_grad():
            for _ in range(n):
                opt.step(params, grads, states[name])

    def train_run(opt):
        stream = BatchStream(prob, "train", seeded(0, 1))
        unroll(lambda q, h, t: prob.loss(q, stream[t]), params, {}, opt, 100, graph=False)

    def meta_unroll():
        stream = BatchStream(prob, "train", seeded(0, 1))
        hp = dict(lstm.named_parameters())
        for _ in segments(lambda q, h, t: prob.loss(q, stream[t]), None, params, hp, lstm, 100, 20,
                          second_order=False, meta_weights=[1.0] * 100):
            pass

    rows = {k: [] for k in ("lstm_step", "adam_step", "lstm_run", "adam_run", "meta")}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every figure alike
        rows["lstm_step"] += timed(lambda: opt_steps(lstm, "lstm"), 1)
        rows["adam_step"] += timed(lambda: opt_steps(adam, "adam"), 1)
        rows["lstm_run"] += timed(lambda: train_run(lstm), 1)
        rows["adam_run"] += timed(lambda: train_run(adam), 1)
        rows["meta"] += timed(meta_unroll, 1)
    med = {k: statistics.median(v) for k, v in rows.items()}
    n = sum(v.numel() for v in params.values())
    print(f"MNIST MLP 784-20-10, {n} coordinates, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| figure | seconds (100 steps) | ratio |")
    print("|---|---|---|")
    print(f"| LSTM step / Adam step | {med['lstm_step']:.3f} / {med['adam_step']:.3f} | {med['lstm_step'] / med['adam_step']:.1f}x |")
    print(f"| LSTM training run / Adam training run | {med['lstm_run']:.3f} / {med['adam_run']:.3f} | {med['lstm_run'] / med['adam_run']:.1f}x |")
    print(f"| meta-unroll (T=100, K=20) / plain Adam run | {med['meta']:.3f} / {med['adam_run']:.3f} | {med['meta'] / med['adam_run']:.1f}x |")


if __name__ == "__main__":
    main()
