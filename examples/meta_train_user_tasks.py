#!/usr/bin/env python
"""Meta-train an LSTM optimizer on your own task family, then evaluate it on your own task.

The tasks live in an ordinary Python file (examples/user_tasks.py); the CLIs reach them
through an import path. This script runs the two commands it prints:

    python meta_train.py --task examples/user_tasks.py:TeacherFamily --meta-batch 2 --horizon 40 \\
        --truncation 20 --meta-steps 30 --checkpoint OUT/lstm_teacher.pt ...
    python meta_eval.py --checkpoint OUT/lstm_teacher.pt --tasks examples/user_tasks.py:wide_task \\
        --baselines sgd,adam --out OUT/eval ...

    python examples/meta_train_user_tasks.py --out runs/user_tasks      # a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # meta_train.py and meta_eval.py sit at the repository root

import meta_eval  # noqa: E402
import meta_train  # noqa: E402
from l2o.cli import Parser, positive_int  # noqa: E402

TASKS_FILE = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "user_tasks.py"))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="meta_train_user_tasks.py", description=__doc__.split("\n\n")[0])  # bad input: one line, exit 2
    p.add_argument("--out", default=os.path.join("runs", "user_tasks"), help="output folder (default %(default)s)")
    p.add_argument("--meta-steps", type=positive_int, default=30, help="meta-training steps (default %(default)s)")
    p.add_argument("--horizon", type=positive_int, default=40, help="inner steps per unroll (default %(default)s)")
    p.add_argument("--eval-steps", type=positive_int, default=200, help="steps of each evaluation run (default %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=5, help="evaluation seeds (default %(default)s)")
    p.add_argument("--tuning-seeds", type=positive_int, default=2, help="seeds for tuning baselines (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    return p.parse_args(argv)


def run(prog: str, main, argv: list[str]) -> None:
    print(f"$ python {prog} {shlex.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.quick:
        args.meta_steps, args.horizon, args.eval_steps, args.seeds, args.tuning_seeds = 2, 6, 8, 2, 1
    ckpt = os.path.join(args.out, "lstm_teacher.pt")
    if os.path.exists(ckpt):
        print(f"meta_train_user_tasks.py: error: {ckpt} exists; choose another --out", file=sys.stderr)
        return 2
    run("meta_train.py", meta_train.main, [
        "--task", f"{TASKS_FILE}:TeacherFamily", "--meta-batch", "2",
        "--horizon", str(args.horizon), "--truncation", str(min(20, args.horizon)),
        "--meta-steps", str(args.meta_steps), "--val-every", str(max(1, args.meta_steps // 3)),
        "--val-seeds", "2" if args.quick else "5", "--outer-lr", "3e-3",
        "--checkpoint", ckpt, "--log-dir", os.path.join(args.out, "tb"), "--no-progress"])
    run("meta_eval.py", meta_eval.main, [
        "--checkpoint", ckpt, "--tasks", f"{TASKS_FILE}:wide_task", "--steps", str(args.eval_steps),
        "--seeds", str(args.seeds), "--tuning-seeds", str(args.tuning_seeds), "--baselines", "sgd,adam",
        "--grid", "1e-3,1,4" if args.quick else "1e-3,3,8", "--no-cache", "--no-progress",
        "--out", os.path.join(args.out, "eval")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
