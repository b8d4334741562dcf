"""Cost of an implicit hypergradient with ~623k hyperparameters, in training steps.

The setting of experiments/implicit_weight_decay.py (Lorraine et al. 2020): an MLP
784-784-10 on 50 training / 50 validation examples, one weight decay per weight
(l2o.optim.WeightDecay around l2o.optim.Adam). In one process, interleaved so that load
from other jobs hits both alike, it times

* a training step: one inner step of l2o.hypergrad.unroll (loss, gradient, update);
* a bare loss + gradient (forward and backward only), and a ``torch.optim.Adam`` step
  (fused in-place update, scalar weight decay), for reference;
* l2o.hypergrad.implicit with Neumann series of several lengths;

and reports the median ratio hypergradient / training step. Lorraine et al. report that a
hypergradient costs "a few" training steps; the bar here is at most 5x with the
experiment's default of 5 Neumann terms. Random pixels stand in for MNIST: the cost does
not depend on the values.

    python benchmarks/implicit_cost.py [--reps 7] [--iters 1,5,10] [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from l2o.hypergrad import implicit, unroll
from l2o.optim import Adam, WeightDecay
from l2o.tasks.base import ModuleTask, cross_entropy
from l2o.tasks.mlp import build_mlp

LIMIT, DEFAULT_ITERS = 5.0, 5


def setup(hidden: int, n: int, seed: int = 0):
    task = ModuleTask(lambda: build_mlp(28 * 28, [hidden], 10, "relu"), cross_entropy)
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    val = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    params = task.init(g)
    opt = WeightDecay(Adam(lr=1e-3), 1e-3, shapes={k: list(v.shape) for k, v in params.items()})
    return task, train, val, params, opt


def timed(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=784, help="hidden units (default: %(default)s)")
    p.add_argument("--examples", type=int, default=50, help="training = validation examples (default: %(default)s)")
    p.add_argument("--iters", default="1,5,10", help="Neumann terms to time, comma-separated (default: %(default)s)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="training steps timed per repetition (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--out", default=os.path.join("runs", "benchmarks", "implicit_cost.json"), help="JSON results")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 if the default ({DEFAULT_ITERS} terms) exceeds {LIMIT}x")
    args = p.parse_args(argv)
    iters = sorted({int(v) for v in args.iters.split(",")} | {DEFAULT_ITERS})
    if min(iters) < 1 or args.reps < 1 or args.steps < 1 or args.hidden < 1 or args.examples < 1:
        p.error("--iters, --reps, --steps, --hidden and --examples must be positive")
    torch.set_num_threads(args.threads)
    task, train, val, params, opt = setup(args.hidden, args.examples)
    hparams = dict(opt.raw_weight_decay.named_parameters())
    n_hyper = sum(v.numel() for v in hparams.values())

    def train_loss(q, h=None, t=None):
        return task.loss(q, train)

    def inner(q, h, t):
        return task.loss(q, train) + opt.penalty(q)

    def val_loss(q, h=None):
        return task.loss(q, val)

    res = unroll(train_loss, params, {}, opt, 20, graph=False)  # warm up, and leave the weights mid-training
    state = {"params": res.params, "state": res.state, "t": 20}

    def train_steps():
        r = unroll(train_loss, state["params"], {}, opt, args.steps, state=state["state"], start=state["t"],
                   graph=False)
        state.update(params=r.params, state=r.state, t=state["t"] + args.steps)

    def grad_only():
        q = {k: v.detach().requires_grad_() for k, v in state["params"].items()}
        torch.autograd.grad(train_loss(q), list(q.values()))

    leaves = [v.detach().clone().requires_grad_() for v in res.params.values()]
    torch_opt = torch.optim.Adam(leaves, lr=1e-3, weight_decay=1e-3)

    def torch_step():
        torch_opt.zero_grad()
        train_loss(dict(zip(res.params, leaves))).backward()
        torch_opt.step()

    def hypergrad(k: int):
        return lambda: implicit(inner, val_loss, state["params"], hparams, method="neumann", iters=k, alpha=0.01)

    for k in iters:  # warm-up of every code path
        hypergrad(k)()
    torch_step()
    step_t, grad_t, torch_t, hyper_t = [], [], [], {k: [] for k in iters}
    for _ in range(args.reps):
        step_t.append(timed(train_steps) / args.steps)
        grad_t.append(timed(grad_only, args.steps))
        torch_t.append(timed(torch_step, args.steps))
        for k in iters:
            hyper_t[k].append(timed(hypergrad(k)))
    step_ms = 1e3 * statistics.median(step_t)
    rows = {k: {"hypergradient_ms": 1e3 * statistics.median(v),
                "ratio_to_training_step": statistics.median([h / s for h, s in zip(v, step_t)]),
                "ratio_to_loss_and_gradient": statistics.median([h / s for h, s in zip(v, grad_t)]),
                "ratio_to_torch_adam_step": statistics.median([h / s for h, s in zip(v, torch_t)])}
            for k, v in hyper_t.items()}
    out = {"n_hyperparameters": n_hyper, "hidden": args.hidden, "examples": args.examples, "threads": args.threads,
           "dtype": str(torch.get_default_dtype()), "training_step_ms": step_ms,
           "loss_and_gradient_ms": 1e3 * statistics.median(grad_t),
           "torch_adam_step_ms": 1e3 * statistics.median(torch_t), "neumann": rows, "limit": LIMIT,
           "passes": rows[DEFAULT_ITERS]["ratio_to_training_step"] <= LIMIT}
    print(f"{n_hyper} hyperparameters; training step {step_ms:.1f} ms, loss+gradient {out['loss_and_gradient_ms']:.1f}"
          f" ms, torch.optim.Adam step {out['torch_adam_step_ms']:.1f} ms (medians of {args.reps})")
    print("| Neumann terms | hypergradient (ms) | / training step | / loss+gradient | / torch.optim.Adam step |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['hypergradient_ms']:.1f} | {r['ratio_to_training_step']:.2f} | "
              f"{r['ratio_to_loss_and_gradient']:.2f} | {r['ratio_to_torch_adam_step']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    if args.check and not out["passes"]:
        print(f"FAIL: {DEFAULT_ITERS}-term hypergradient costs more than {LIMIT}x a training step", file=sys.stderr)
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
