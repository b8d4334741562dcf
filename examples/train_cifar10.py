#!/usr/bin/env python
"""Train a small convnet on CIFAR-10 with a learned optimizer, next to torch.optim.Adam.

A plain PyTorch training loop; the only l2o line is the optimizer:

    opt = l2o.LearnedOptimizer(model.parameters(), "checkpoints/lstm_cifar10.pt")

Both optimizers start from the same weights and see the same minibatches. The script
prints both training-loss curves (mean over each logging window), the test loss and
accuracy at the end, and saves a plot.

    python examples/train_cifar10.py --data-dir DATA            # DATA holds cifar-10-batches-py/
    python examples/train_cifar10.py --data-dir DATA --steps 1000 --plot cifar10_curves.png
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone without installing l2o

import l2o  # noqa: E402
from l2o.checkpoint import CheckpointError  # noqa: E402
from l2o.cli import Parser, positive_int  # noqa: E402
from l2o.tasks.data import DataNotFoundError, load  # noqa: E402  (reads the cifar-10-batches-py pickles)


def convnet(channels: int = 16, hidden: int = 32) -> nn.Module:
    """Three 3x3 conv layers with max-pooling and a small classifier (the shipped optimizer's training task)."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk])
        loss += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + chunk]).sum())
    return loss / len(y), correct / len(y)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="train_cifar10.py", description=__doc__.split("\n\n")[0])  # bad input: one line, exit 2
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default $L2O_DATA_DIR or ./data)")
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints", "lstm_cifar10.pt"),
                   help="learned optimizer (default: the shipped checkpoints/lstm_cifar10.pt)")
    p.add_argument("--steps", type=positive_int, default=300, help="training steps (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default %(default)s)")
    p.add_argument("--adam-lr", type=float, default=3e-3, help="Adam's learning rate (default %(default)s, "
                   "the rate tuned for this convnet)")
    p.add_argument("--log-every", type=positive_int, default=25, help="print the curves every N steps (default %(default)s)")
    p.add_argument("--plot", default="cifar10_curves.png", help="where to save the plot (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    models = {"l2o": convnet().to(device)}
    models["adam"] = copy.deepcopy(models["l2o"])  # same initial weights
    try:
        dtype = next(models["l2o"].parameters()).dtype
        train, test = (load("cifar10", split, args.data_dir, device, dtype) for split in ("train", "test"))
        opts = {"l2o": l2o.LearnedOptimizer(models["l2o"].parameters(), args.checkpoint),
                "adam": torch.optim.Adam(models["adam"].parameters(), lr=args.adam_lr)}
    except (DataNotFoundError, CheckpointError) as exc:
        print(f"train_cifar10.py: error: {exc}", file=sys.stderr)
        return 2
    curves: dict[str, list[float]] = {k: [] for k in models}
    seconds = {k: 0.0 for k in models}
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{'step':>6} {'l2o loss':>9} {'adam loss':>9}")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train.y), (args.batch_size,), generator=gen).to(device)
        x, y = train.x[idx], train.y[idx]
        for name, model in models.items():  # the usual loop, once per optimizer
            t0 = time.perf_counter()
            opts[name].zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opts[name].step()
            seconds[name] += time.perf_counter() - t0
            curves[name].append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps:
            k = step - (step - 1) // args.log_every * args.log_every
            means = {n: sum(c[-k:]) / k for n, c in curves.items()}
            print(f"{step:>6} {means['l2o']:>9.4f} {means['adam']:>9.4f}")
    for name, model in models.items():
        loss, acc = evaluate(model, test.x, test.y)
        print(f"{name}: test loss {loss:.4f}, test accuracy {acc:.3f}, "
              f"{1000 * seconds[name] / args.steps:.1f} ms per step (forward + backward + update)")
    plot(curves, args)
    print(f"saved {args.plot}")
    return 0


def plot(curves: dict[str, list[float]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = max(1, min(args.log_every, len(curves["l2o"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("l2o", f"l2o.LearnedOptimizer ({os.path.basename(args.checkpoint)})"),
                        ("adam", f"torch.optim.Adam (lr {args.adam_lr:g})")):
        c = torch.tensor(curves[name])
        smooth = c.unfold(0, w, 1).mean(1) if len(c) >= w else c
        ax.plot(range(w, w + len(smooth)), smooth.tolist(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean over {w} steps)")
    ax.set_title("small convnet on CIFAR-10")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
