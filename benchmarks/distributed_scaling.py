"""Scaling over processes: meta-steps per second and meta_eval wall time, 1 process against 2.

    python benchmarks/distributed_scaling.py --data-dir DATA              # both parts
    python benchmarks/distributed_scaling.py --data-dir DATA --part train --rounds 3
    python benchmarks/distributed_scaling.py --data-dir DATA --part members --rounds 5

Meta-training: the shipped MNIST setup (2x20 LSTM, 1x20 sigmoid MLP, 100-step unrolls
truncated every 20) with meta-batch 2, launched with ``torchrun --nproc_per_node=N``;
each launch times ``--steps`` meta-steps after one warm-up step, so start-up, Adam
tuning and validation are left out. Configurations: 1 process with 1 and with 2 torch
threads (``--meta-batch 2`` in one process), and 2 processes of 1 thread (one member
each). Evaluation: ``meta_eval.py --baselines-only --no-cache`` on a few suite tasks with
``--workers 1`` and ``--workers 2``, wall time of the whole command (start-up included).

Members (``--part members``): the cost, in one process, of unrolling the meta-batch's
members one by one (what the trainer does, so that any number of processes gives the
same bits) against one batched unroll of all members as a single super-optimizee (the
earlier trainer), both on the MNIST setup above, alternated in one process.

Rounds alternate the configurations side by side, so a load change on a shared machine
hits them alike; the ratio is of the medians. ``uptime`` is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: time meta-steps of the MNIST LSTM setup."""
    sys.path.insert(0, ROOT)
    import torch

    from l2o import distributed
    from l2o.config import TrainConfig
    from l2o.train import MetaTrainer

    ctx = distributed.init("cpu")
    cfg = TrainConfig(meta_batch=2, data_dir=args.data_dir, meta_steps=args.steps + 1, seed=1,
                      **({"horizon": args.horizon} if args.horizon else {}))
    trainer = MetaTrainer(cfg)
    trainer.dist = ctx
    trainer.meta_step_once()  # warm-up
    ctx.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        trainer.meta_step_once()
    cpu = torch.tensor([time.process_time() - c0])
    ctx.barrier()
    took = time.perf_counter() - t0
    if ctx.active:  # the busiest rank's CPU time: what the wall time would be on otherwise idle cores
        torch.distributed.all_reduce(cpu, op=torch.distributed.ReduceOp.MAX)
    if ctx.is_main:
        print(json.dumps({"steps_per_s": args.steps / took, "cpu_steps_per_s": args.steps / float(cpu)}))
    ctx.close()


def batched_meta_step(trainer) -> None:
    """The earlier trainer's meta-step: all members in one inner run (one LSTM call per step for all)."""
    from l2o.tasks import seeded
    from l2o.train import TRAIN_SEEDS

    problem = trainer.problem(trainer._members(trainer.meta_step))
    gen = seeded(TRAIN_SEEDS + trainer.cfg.seed * 1_000_000 + trainer.meta_step * 100, 4)
    est = trainer.estimator
    state = est.init(problem, trainer.meta_params, gen)
    while not est.done(state):
        grads, metrics, state = est.estimate(trainer.meta_params, state)
        trainer._apply(grads, metrics["meta_loss"], bool(metrics["finite"]))
    trainer.meta_step += 1


def members(args: argparse.Namespace) -> None:
    """Per-member unrolls against one batched unroll, in this process, rounds alternated."""
    sys.path.insert(0, ROOT)
    import torch

    from l2o.config import TrainConfig
    from l2o.train import MetaTrainer

    torch.set_num_threads(1)
    runs = {"one batched unroll (earlier)": batched_meta_step,
            "one unroll per member (now)": lambda tr: tr.meta_step_once()}
    cfg = TrainConfig(meta_batch=args.meta_batch, data_dir=args.data_dir, seed=1, meta_steps=1000,
                      **({"horizon": args.horizon} if args.horizon else {}))
    trainers = {k: MetaTrainer(cfg) for k in runs}
    for k, step in runs.items():
        step(trainers[k])  # warm-up
    rates: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in runs}
    for rnd in range(args.rounds):
        for k, step in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(trainers[k])
            rates[k]["wall"].append(args.steps / (time.perf_counter() - t0))
            rates[k]["cpu"].append(args.steps / (time.process_time() - c0))
        print(f"round {rnd}: " + ", ".join(f"{k} {v['wall'][-1]:.4f} (cpu {v['cpu'][-1]:.4f})"
                                           for k, v in rates.items()), flush=True)
    now, before = rates["one unroll per member (now)"], rates["one batched unroll (earlier)"]
    for what in ("wall", "cpu"):
        for k, v in rates.items():
            print(f"meta-batch {args.meta_batch}, horizon {cfg.horizon}, 1 process, 1 thread, {k:<30} "
                  f"{statistics.median(v[what]):.4f} meta-steps/s by {what} time (median of {args.rounds})")
        print(f"per-member / batched by {what} time: "
              f"{statistics.median(now[what]) / statistics.median(before[what]):.3f}x meta-steps/s "
              f"(round ratios: {', '.join(f'{a / b:.3f}' for a, b in zip(now[what], before[what]))})")


def _pythonpath() -> str:
    """The repository first, then whatever the caller's PYTHONPATH already held (packages installed there)."""
    return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a launch; on failure stop with the end of its stderr instead of a bare exit status."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        sys.exit(f"distributed_scaling: {' '.join(cmd[:6])} ... exited with {r.returncode}:\n{tail}")
    return r


def launch_train(nproc: int, threads: int, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), L2O_THREADS=str(threads), PYTHONPATH=_pythonpath())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", "--steps", str(args.steps), "--data-dir", args.data_dir,
           *(["--horizon", str(args.horizon)] if args.horizon else [])]
    r = _run(cmd, env)
    return json.loads(r.stdout.strip().splitlines()[-1])


def launch_eval(workers: int, args: argparse.Namespace, out: str) -> tuple[float, float]:
    """Wall time of the command, and the suite's own run time (start-up and data loading left out)."""
    cmd = [sys.executable, os.path.join(ROOT, "meta_eval.py"), "--baselines-only", "--no-cache", "--no-progress",
           "--tasks", args.eval_tasks, "--seeds", str(args.eval_seeds), "--tuning-seeds", str(args.tuning_seeds),
           "--data-dir", args.data_dir, "--out", out, "--overwrite", "--workers", str(workers)]
    t0 = time.perf_counter()
    _run(cmd, dict(os.environ, PYTHONPATH=_pythonpath()))
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "results.json")) as fh:
        return wall, json.load(fh)["config"]["runtime_s"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("L2O_DATA_DIR"))
    ap.add_argument("--part", choices=("train", "eval", "both", "members"), default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed meta-steps per launch")
    ap.add_argument("--eval-tasks", default="mnist_mlp")
    ap.add_argument("--eval-seeds", type=int, default=10)
    ap.add_argument("--tuning-seeds", type=int, default=3)
    ap.add_argument("--meta-batch", type=int, default=2, help="--part members: the meta-batch")
    ap.add_argument("--horizon", type=int, help="--part train / members: a shorter unroll than the shipped 100 steps "
                    "(the same steps, fewer of them: a quicker measurement of the same per-step costs)")
    ap.add_argument("--two-threads", action="store_true", help="also time 1 process with 2 torch threads")
    ap.add_argument("--out", default="/tmp/l2o_dist_bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(f"# {uptime()}  (cores: {os.cpu_count()})")
    if args.part == "members":
        members(args)
    if args.part in ("train", "both"):
        configs = {"1 proc x 1 thread": (1, 1), "2 procs x 1 thread": (2, 1)}
        if args.two_threads:
            configs["1 proc x 2 threads"] = (1, 2)
        rates: dict[str, list[dict]] = {k: [] for k in configs}
        for rnd in range(args.rounds):
            for name, (n, t) in configs.items():
                rates[name].append(launch_train(n, t, args))
            print(f"round {rnd}: " + ", ".join(f"{k} {v[-1]['steps_per_s']:.3f} (cpu-bound {v[-1]['cpu_steps_per_s']:.3f})"
                                               for k, v in rates.items()), flush=True)
        for key, what in (("steps_per_s", "wall"), ("cpu_steps_per_s", "busiest rank's CPU time")):
            med = {k: statistics.median(r[key] for r in v) for k, v in rates.items()}
            best1 = max(v for k, v in med.items() if k.startswith("1 proc"))
            for k, v in med.items():
                print(f"meta-train (horizon {args.horizon or 100}) {k:<20} {v:.3f} meta-steps/s by {what} "
                      f"(median of {args.rounds})")
            print(f"meta-train speed-up by {what}, 2 processes / best 1 process: "
                  f"{med['2 procs x 1 thread'] / best1:.2f}x")
    if args.part in ("eval", "both"):
        walls: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for rnd in range(args.rounds):
            for w in (1, 2):
                walls[w].append(launch_eval(w, args, os.path.join(args.out, f"eval{w}")))
            print(f"round {rnd}: " + ", ".join(f"{w} worker(s) {v[-1][0]:.1f} s (suite {v[-1][1]:.1f} s)"
                                               for w, v in walls.items()), flush=True)
        for i, what in ((0, "whole command"), (1, "suite run time, start-up left out")):
            m1, m2 = (statistics.median(x[i] for x in walls[w]) for w in (1, 2))
            print(f"meta_eval --tasks {args.eval_tasks} --baselines-only --seeds {args.eval_seeds} --tuning-seeds "
                  f"{args.tuning_seeds}, {what}: 1 worker {m1:.1f} s, 2 workers {m2:.1f} s (median of {args.rounds}); "
                  f"speed-up {m1 / m2:.2f}x")
    print(f"# {uptime()}")


if __name__ == "__main__":
    main()
