"""Common plumbing of the experiment scripts: flags, output folder, data subsets, error exits.

Every experiment script reads top to bottom as ``parse -> run -> write``: it builds its
parser with :func:`parser`, calls :func:`start` for the output folder and TensorBoard
writer, and hands its ``main`` to :func:`cli`, which turns bad input into a one-line
error and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import torch

from l2o import cli as l2o_cli
from l2o.cli import Parser, finite_float  # noqa: F401 - the scripts' flag types come from here
from l2o.tasks import DataNotFoundError
from l2o.tasks.data import data_root, load


class UsageError(l2o_cli.UsageError):
    """Bad input found after parsing (a size larger than the data, say): one line, exit 2."""


positive_int = l2o_cli.positive_int


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The flags every experiment shares: ``--data-dir``, ``--out``, ``--quick``, ``--seed``, ``--threads``."""
    p = Parser(prog=f"{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=l2o_cli.path, default=None,
                   help="data root holding MNIST/raw (default: $L2O_DATA_DIR, else ./data)")
    p.add_argument("--out", type=l2o_cli.path, default=os.path.join("runs", "experiments", name),
                   help="output folder for tb/, the PNG and results.json (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run with tiny sizes")
    p.add_argument("--seed", type=l2o_cli.seed, default=0, help="random seed (default: %(default)s)")
    l2o_cli.add_threads(p)
    return p


def start(args: argparse.Namespace, name: str):
    """Seed, set threads, create ``args.out`` and return a TensorBoard ``SummaryWriter`` on ``OUT/tb``."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    args.data_dir = data_root(args.data_dir)
    args.t_start = time.time()
    return SummaryWriter(os.path.join(args.out, "tb"))


def mnist_subsets(data_dir: str, sizes: Sequence[int], generator: torch.Generator,
                  split: str = "train") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random subsets of an MNIST split, ``[(x [n, 1, 28, 28], y [n]) for n in sizes]``."""
    ds = load("mnist", split, data_dir)
    if sum(sizes) > len(ds):
        raise UsageError(f"asked for {sum(sizes)} MNIST {split} examples ({' + '.join(map(str, sizes))}) "
                         f"but the data holds {len(ds)}; use smaller sizes")
    idx = torch.randperm(len(ds), generator=generator)
    out, at = [], 0
    for n in sizes:
        sel = idx[at:at + n]
        out.append((ds.x[sel], ds.y[sel]))
        at += n
    return out


def finite(value: Any) -> Any:
    """Replace non-finite floats by None (JSON has no inf / nan) throughout a nested structure."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def finish(args: argparse.Namespace, name: str, results: dict, fig, writer) -> dict:
    """Write ``OUT/<name>.png`` and ``OUT/results.json`` (with the command and runtime); close the writer."""
    results = {"experiment": name, "command": " ".join([f"{name}.py", *args.argv]),
               "runtime_s": round(time.time() - args.t_start, 1), **results}
    results = finite(results)
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=60 if args.quick else 110)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    writer.flush()
    writer.close()
    print(f"{name}: wrote {args.out}/{name}.png, results.json, tb/ in {results['runtime_s']:.0f}s")
    return results


def cli(name: str, build: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], dict],
        argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, run, and turn bad input into ``<name>.py: error: <one line>`` on stderr with exit 2."""
    import matplotlib

    matplotlib.use("Agg")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build().parse_args(argv)
    args.argv = argv
    try:
        l2o_cli.writable_dir(args.out, "--out")  # before any work, not after it
        return run(args)
    except (l2o_cli.UsageError, DataNotFoundError, FileNotFoundError) as exc:
        l2o_cli.fail(f"{name}.py", str(exc))
