"""Evaluate learned optimizers on new tasks against tuned baselines.

    python meta_eval.py                                   # checkpoints/lstm_mnist.pt on the default suite
    python meta_eval.py --checkpoint runs/a.pt --checkpoint runs/b.pt --tasks mnist_mlp,quadratic
    python meta_eval.py --baselines-only --seeds 5 --out eval_out
    python meta_eval.py --workers 2                       # spread tuning and evaluation over 2 processes
    torchrun --standalone --nproc_per_node=2 meta_eval.py # the same under torchrun (or across machines)

Writes OUT/results.json, OUT/results.md (also printed), OUT/<task>.png and TensorBoard
runs under OUT/tb (``tensorboard --logdir OUT/tb``). The logic lives in l2o.suite.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "meta_eval.py"
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "lstm_mnist.pt")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # with several processes every rank fails alike; rank 0 says so
        print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def grid(text: str) -> tuple[float, float, int]:
    try:
        lo, hi, n = text.split(",")
        lo, hi, n = float(lo), float(hi), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI,N (e.g. 1e-4,1,9), got {text!r}") from None
    if not (0 < lo <= hi and n >= 1):
        raise argparse.ArgumentTypeError(f"need 0 < LO <= HI and N >= 1, got {text!r}")
    return lo, hi, n


def names(text: str) -> list[str]:
    return [t for t in text.replace(" ", ",").split(",") if t]


def parse(argv: list[str] | None) -> argparse.Namespace:
    from l2o.suite import BASELINES, EVAL_SEEDS, GRIDS, SUITE, TUNING_SEEDS

    suite = "\n".join(f"  {e.name:<18} {e.steps:>5} steps  {e.description}" for e in SUITE)
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Evaluate learned optimizers (LSTM or learned hyperparameters) on held-out tasks against "
                           "SGD, Nesterov momentum, RMSprop and Adam, each with its learning rate tuned per task.",
               epilog=f"default suite (--tasks):\n{suite}\n\nThe CIFAR-10 task is skipped with a note when its data "
                      f"is missing.\nTuned learning rates are cached (--cache-dir), so a second evaluation is fast.")
    p.add_argument("--checkpoint", action="append", metavar="PATH",
                   help="saved optimizer to evaluate (repeatable); default checkpoints/lstm_mnist.pt")
    p.add_argument("--baselines-only", action="store_true", help="evaluate no saved optimizer, only the baselines")
    p.add_argument("--which", choices=("best", "current"), default="best",
                   help="weights to evaluate from each checkpoint: best by validation (default) or the latest")
    p.add_argument("--tasks", type=names, metavar="A,B", help="suite entries to run (default: all, see below), or a user task as an import path "
                        "package.module:function or file.py:function (100 steps unless --steps)")
    p.add_argument("--steps", type=positive, metavar="N", help="override every task's number of steps")
    p.add_argument("--seeds", type=positive, default=len(EVAL_SEEDS), metavar="N",
                   help=f"evaluation seeds {EVAL_SEEDS[0]}..{EVAL_SEEDS[0]}+N-1 (default {len(EVAL_SEEDS)})")
    p.add_argument("--tuning-seeds", type=positive, default=len(TUNING_SEEDS), metavar="N",
                   help=f"seeds 0..N-1 for tuning learning rates, N <= {EVAL_SEEDS[0]} (default {len(TUNING_SEEDS)})")
    p.add_argument("--baselines", type=names, default=list(BASELINES), metavar="A,B",
                   help=f"hand-designed baselines, from {','.join(GRIDS)} (default all; 'none' for none)")
    p.add_argument("--grid", type=grid, metavar="LO,HI,N",
                   help="one learning-rate grid for every baseline, N log-spaced values (default per baseline: "
                        + "; ".join(f"{b} {g[0]:g}..{g[1]:g} x{g[2]}" for b, g in GRIDS.items())
                        + "; widened automatically when the best rate is at an edge)")
    p.add_argument("--test-points", type=positive, default=4, metavar="K",
                   help="measure test loss/accuracy at K evenly spaced steps, the last one the final step (default 4)")
    p.add_argument("--out", default="eval_out", metavar="DIR", help="output folder (default eval_out)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="tuning cache folder (default $L2O_CACHE_DIR or ~/.cache/l2o)")
    p.add_argument("--no-cache", action="store_true", help="re-tune learning rates and keep no cache")
    p.add_argument("--data-dir", metavar="DATA", help="data root (default $L2O_DATA_DIR or ./data)")
    p.add_argument("--device", default="cpu", help="torch device for tasks and optimizers (default cpu)")
    p.add_argument("--threads", type=positive, default=1, metavar="N",
                   help="torch CPU threads (default 1: these small models gain nothing from more, "
                        "and oversubscribed cores make them many times slower)")
    p.add_argument("--workers", type=positive, default=1, metavar="N",
                   help="processes to spread tuning and evaluation over (default 1; under torchrun its processes "
                        "are used); the results are the same as with one")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.baselines == ["none"]:
        args.baselines = []
    bad = [b for b in args.baselines if b not in GRIDS]
    if bad:
        fail(f"unknown baseline {bad[0]!r}; choose from {', '.join(GRIDS)} or 'none'")
    if args.tuning_seeds > EVAL_SEEDS[0]:
        fail(f"--tuning-seeds must be <= {EVAL_SEEDS[0]} so tuning and evaluation seeds stay disjoint")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from l2o import distributed

    if args.workers > 1:
        if distributed.launched():
            fail("--workers starts its own processes; under torchrun leave it out (torchrun's processes are used)")
        with distributed.spawn_workers(args.workers, _worker, (argv if argv is not None else sys.argv[1:],)):
            return evaluate(args)
    return evaluate(args)


def _worker(argv: list[str]) -> None:
    """Ranks 1.. of ``--workers N`` (child processes): the same evaluation, silent."""
    args = parse(argv)
    try:
        evaluate(args)
    except SystemExit:
        pass


def evaluate(args: argparse.Namespace) -> int:
    """Check the inputs, then run the suite (as one rank of several when launched so)."""
    import torch

    torch.set_num_threads(args.threads)

    from l2o import suite
    from l2o.checkpoint import CheckpointError
    from l2o.tasks import DataNotFoundError

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"bad --device {args.device!r}; use e.g. cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for, but CUDA is not available here")
    if args.baselines_only and args.checkpoint:
        fail("--checkpoint and --baselines-only exclude each other")
    paths = [] if args.baselines_only else (args.checkpoint or [])
    if not paths and not args.baselines_only:
        if not os.path.isfile(DEFAULT_CHECKPOINT):
            fail("no optimizer to evaluate: checkpoints/lstm_mnist.pt does not exist; pass --checkpoint PATH, "
                 "train one with meta_train.py, or use --baselines-only")
        paths = [DEFAULT_CHECKPOINT]
    if not paths and not args.baselines:
        fail("nothing to evaluate: no checkpoint and no baselines")
    try:
        learned = suite.load_learned(paths, args.which, str(device))
        entries = suite.select(args.tasks)
        notes: list[str] = []
        main_rank = os.environ.get("RANK", "0") == "0"
        built = suite.build_tasks(entries, args.data_dir, str(device),
                                  log=lambda m: (notes.append(m), main_rank and print(m)))
        if main_rank:
            os.makedirs(args.out, exist_ok=True)
    except (CheckpointError, DataNotFoundError, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if not built:
        fail("no task left to evaluate (their data is missing)")
    cache = suite.TuningCache(None if args.no_cache else (args.cache_dir or suite.TuningCache.default_folder()))
    from l2o import distributed

    try:
        ctx = distributed.init(str(device), threads=args.threads)
    except (distributed.PeerLost, ValueError) as exc:
        fail(str(exc))
    try:
        results = suite.run(built, learned, args.out, baselines=args.baselines,
                            seeds=[suite.EVAL_SEEDS[0] + i for i in range(args.seeds)],
                            tuning_seeds=list(range(args.tuning_seeds)),
                            grids={b: args.grid for b in args.baselines} if args.grid else None, steps=args.steps,
                            cache=cache, n_checkpoints=args.test_points, progress=not args.no_progress, notes=notes,
                            ctx=ctx)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; results of the tasks finished so far are in {args.out}", file=sys.stderr)
        return 130
    except distributed.PeerLost as exc:
        print(f"{PROG}: {exc}; results of the tasks finished so far are in {args.out}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    if not ctx.is_main:
        return 0
    from l2o.report import markdown

    print(markdown(results), end="")
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json, <task>.png and TensorBoard runs in "
          f"{os.path.join(args.out, 'tb')} ({results['config']['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # during imports or setup
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        sys.exit(130)
    if "RANK" in os.environ:  # under torchrun: leave at once, before the launcher stops a slow shutdown with SIGTERM
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
