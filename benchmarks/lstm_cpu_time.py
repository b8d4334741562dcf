#!/usr/bin/env python
"""The LSTM optimizer's step and truncated meta-step, compiled gate kernel / one-node cell against eager / recorded.

CPU time of this process (``time.process_time``), not wall time: on a machine shared with
other work, the time the process actually ran is the steadier measure (cache and memory
contention still count). Medians of --repeats interleaved repetitions, 1 torch thread.

    python benchmarks/lstm_cpu_time.py --data-dir DATA
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import l2o
from l2o.hypergrad import segments
from l2o.hypergrad.unroll import own
from l2o.optim import lstm_kernel
from l2o.tasks import seeded
from speed_cases import recorded_reference, warm_lstm_state  # benchmarks/ is the script's folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="data root holding MNIST/raw")
    ap.add_argument("--checkpoint", default="checkpoints/lstm_mnist.pt")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default 3)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = l2o.tasks.get("mnist_mlp", data_dir=args.data_dir, device="cpu")
    params = task.init(seeded(0, 0))
    gen = seeded(0, 1)
    batches = [task.batch("train", gen) for _ in range(20)]
    opt = l2o.load_optimizer(args.checkpoint)
    hp = dict(opt.named_parameters())
    grads, state = warm_lstm_state(task, params, batches[0], opt)
    a, b = torch.randn(15910, 40), torch.randn(40, 80)

    def mm():
        for _ in range(10):
            a @ b

    chained = {"p": params, "s": state}

    def step():  # out of place, each step from the last one's result, as a run chains them
        with torch.no_grad():
            for _ in range(10):
                chained["p"], chained["s"] = opt.step(chained["p"], grads, chained["s"])

    def eager():
        with lstm_kernel.disabled():
            step()

    owned = {"p": own(params), "s": own(state)}

    def step_():  # in place, as unroll without a graph steps
        with torch.no_grad():
            for _ in range(10):
                owned["p"], owned["s"] = opt.step_(owned["p"], grads, owned["s"])

    def meta():
        for _ in segments(lambda q, h, t: task.loss(q, batches[t]), None, params, hp, opt, 20, 20,
                          second_order=False, meta_weights=[1.0] * 20):
            pass

    def meta_rec():
        with recorded_reference(opt):
            meta()
    fns = dict(mm=mm, step=step, step_=step_, eager=eager, meta=meta, meta_rec=meta_rec)
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            ts[k].append(time.process_time() - t0)
    m = {k: statistics.median(v) for k, v in ts.items()}
    mmeq = m["mm"] * 5414 / 3200  # the shipped LSTM's multiply-adds per coordinate / the product's
    print({k: round(v * 1e3, 1) for k, v in m.items()}, "ms CPU")
    print(f"step/matmul-FLOPs kernel {m['step'] / mmeq:.2f}x eager {m['eager'] / mmeq:.2f}x; "
          f"kernel/eager {m['step'] / m['eager']:.2f}; in place (step_) {m['step_'] / mmeq:.2f}x, "
          f"in place / out of place {m['step_'] / m['step']:.2f}")
    print(f"meta 20 steps one-node+kernel / recorded {m['meta'] / m['meta_rec']:.2f}")


if __name__ == "__main__":
    main()
