"""Evaluate learned optimizers on new tasks against tuned baselines.

    python meta_eval.py                                   # your meta_train.py run (else the shipped LSTM)
    python meta_eval.py --checkpoint runs/a/checkpoint.pt --checkpoint lstm_mnist --tasks mnist_mlp,quadratic
    python meta_eval.py --baselines-only --seeds 5 --out runs/eval_baselines
    python meta_eval.py --workers 2                       # spread tuning and evaluation over 2 processes
    torchrun --standalone --nproc_per_node=2 meta_eval.py # the same under torchrun (or across machines)

Writes OUT/results.json, OUT/results.md (also printed), OUT/<task>.png and TensorBoard
runs under OUT/tb (``tensorboard --logdir OUT/tb``); an OUT holding results is never
replaced without --overwrite. The logic lives in l2o.suite.
"""
from __future__ import annotations

import argparse
import os
import sys

from l2o.cli import Parser, add_threads, run, fail as _fail, path, positive_int as positive, set_threads

PROG = "meta_eval.py"
HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_CHECKPOINT = os.path.join(HERE, "checkpoints", "lstm_mnist.pt")
SHIPPED_GENERALIST = os.path.join(HERE, "checkpoints", "lstm_generalist.pt")
DEFAULT_RUN = os.path.join("runs", "lstm_mnist", "checkpoint.pt")  # what `python meta_train.py` writes
DEFAULT_OUT = os.path.join("runs", "eval")


def fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # with several processes every rank fails alike; rank 0 says so
        _fail(PROG, message)
    raise SystemExit(2)


def grid(text: str) -> tuple[float, float, int]:
    try:
        lo, hi, n = text.split(",")
        lo, hi, n = float(lo), float(hi), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI,N (e.g. 1e-4,1,9), got {text!r}") from None
    if not (0 < lo <= hi < float("inf") and n >= 1):
        raise argparse.ArgumentTypeError(f"need finite 0 < LO <= HI and N >= 1, got {text!r}")
    return lo, hi, n


def names(text: str) -> list[str]:
    out = [t for t in text.replace(" ", ",").split(",") if t]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return out


def shipped_name(path: str) -> str:
    """``lstm_mnist`` -> the shipped checkpoints/lstm_mnist.pt when no such file exists here."""
    shipped = os.path.join(HERE, "checkpoints", f"{path}.pt")
    return shipped if not os.path.exists(path) and os.sep not in path and os.path.isfile(shipped) else path


def parse(argv: list[str] | None) -> argparse.Namespace:
    from l2o.suite import BASELINES, EVAL_SEEDS, GRIDS, SUITE, TUNING_SEEDS

    suite = "\n".join(f"  {e.name:<18} {e.steps:>5} steps  {e.description}" for e in SUITE)
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Evaluate learned optimizers (LSTM or learned hyperparameters) on held-out tasks against "
                           "SGD, Nesterov momentum, RMSprop and Adam, each with its learning rate tuned per task.",
               epilog=f"default suite (--tasks):\n{suite}\n\nThe CIFAR-10 task is skipped with a note when its data "
                      f"is missing.\nTuned learning rates are cached (--cache-dir), so a second evaluation is fast.")
    p.add_argument("--checkpoint", action="append", type=path, metavar="PATH",
                   help=f"saved optimizer to evaluate (repeatable): a file written by meta_train.py or a shipped "
                        f"name (lstm_mnist, lstm_cifar10); default {DEFAULT_RUN} (what meta_train.py writes by "
                        f"default) if it exists, else the shipped checkpoints/lstm_mnist.pt; and next to it the shipped "
                        f"generalist checkpoints/lstm_generalist.pt")
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
    p.add_argument("--out", type=path, default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in an --out that already holds some (results, plots and TensorBoard "
                        "runs; other files are left alone)")
    p.add_argument("--cache-dir", type=path, metavar="DIR",
                   help="tuning cache folder (default $L2O_CACHE_DIR or ~/.cache/l2o); the rates of the default "
                        "suite on the real datasets ship with l2o, so they are not tuned again")
    p.add_argument("--retune", action="store_true", help="tune every learning rate afresh (ignore cached and shipped "
                                                         "rates) and cache the new ones")
    p.add_argument("--no-cache", action="store_true", help="re-tune learning rates and keep no cache")
    p.add_argument("--data-dir", type=path, metavar="DATA", help="data root (default $L2O_DATA_DIR or ./data)")
    p.add_argument("--device", default="cpu", help="torch device for tasks and optimizers (default cpu)")
    add_threads(p, default=None)
    p.add_argument("--workers", type=positive, default=1, metavar="N",
                   help="processes to spread tuning and evaluation over (default 1; under torchrun its processes "
                        "are used); the results are the same as with one")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (bars on a terminal, a plain line every 30 s otherwise)")
    args = p.parse_args(argv)
    if args.baselines == ["none"]:
        args.baselines = []
    bad = [b for b in args.baselines if b not in GRIDS]
    if bad:
        fail(f"unknown baseline {bad[0]!r}; choose from {', '.join(GRIDS)} or 'none'")
    if args.tuning_seeds > EVAL_SEEDS[0]:
        fail(f"--tuning-seeds must be <= {EVAL_SEEDS[0]} so tuning and evaluation seeds stay disjoint")
    return args


OWNED = ("results.json", "results.md", "tb")  # plus <entry>.png: what an evaluation writes into --out


def earlier_results(out: str, overwrite: bool) -> list[str]:
    """The results of an earlier evaluation in ``out``; refused (one line, exit 2) unless ``overwrite``."""
    from l2o.suite import SUITE

    owned = [os.path.join(out, n) for n in (*OWNED, *(f"{e.name}.png" for e in SUITE))]
    found = [p for p in owned if os.path.lexists(p)]
    if found and not overwrite:
        fail(f"--out {out!r} already holds results ({os.path.basename(found[0])}); pass --overwrite to replace "
             f"them or choose another --out (nothing was changed)")
    return found


def remove(paths: list[str]) -> None:
    """Delete earlier results (so no stale plot or TensorBoard run of another task stays behind)."""
    import shutil

    for path in paths:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


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
    set_threads(args.threads)
    import torch

    from l2o import suite
    from l2o.checkpoint import CheckpointError
    from l2o.tasks import DataNotFoundError

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"bad --device {args.device!r}; use e.g. cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device!r}: l2o runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for, but CUDA is not available here")
    if args.baselines_only and args.checkpoint:
        fail("--checkpoint and --baselines-only exclude each other")
    paths = [] if args.baselines_only else [shipped_name(p) for p in (args.checkpoint or [])]
    if not paths and not args.baselines_only:
        # your run (else the shipped specialist), and the shipped generalist next to it
        first = DEFAULT_RUN if os.path.isfile(DEFAULT_RUN) else SHIPPED_CHECKPOINT
        paths = [p for p in (first, SHIPPED_GENERALIST) if os.path.isfile(p)]
        if not paths:
            fail(f"no optimizer to evaluate: none of {DEFAULT_RUN}, checkpoints/lstm_generalist.pt, "
                 f"checkpoints/lstm_mnist.pt exists; pass "
                 f"--checkpoint PATH, train one with meta_train.py, or use --baselines-only")
    if not paths and not args.baselines:
        fail("nothing to evaluate: no checkpoint and no baselines")
    from l2o.cli import UsageError, writable_dir

    cache_dir = None if args.no_cache else (args.cache_dir or suite.TuningCache.default_folder())
    try:
        learned = suite.load_learned(paths, args.which, str(device))
        entries = suite.select(args.tasks)
        if os.environ.get("RANK", "0") == "0":  # rank 0 alone writes
            writable_dir(args.out, "--out")
            if cache_dir is not None:
                writable_dir(os.path.expanduser(cache_dir), "--cache-dir")
        stale = earlier_results(args.out, args.overwrite)
        notes: list[str] = []
        main_rank = os.environ.get("RANK", "0") == "0"
        built = suite.build_tasks(entries, args.data_dir, str(device),
                                  log=lambda m: (notes.append(m), main_rank and print(m)))
        suite.check_portable(learned, built)
        if built and main_rank:
            remove(stale)
    except (CheckpointError, DataNotFoundError, UsageError, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if not built:
        fail("no task left to evaluate (their data is missing)")
    if main_rank:
        print(f"evaluating {', '.join(f'{n} ({p})' for n, (p, _) in learned.items()) or 'the baselines only'} "
              f"on {len(built)} task(s); results go to {args.out}", flush=True)
    cache = suite.TuningCache(cache_dir, read=not (args.retune or args.no_cache))
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
        done = os.path.isfile(os.path.join(args.out, "results.json"))  # --out held none when this run began
        where = (f"results of the tasks finished so far are in {args.out}" if done
                 else "no task had finished, so no results were written")
        print(f"\n{PROG}: interrupted; {where}", file=sys.stderr)
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
    run(main, PROG, 'interrupted')
