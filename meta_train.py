#!/usr/bin/env python
"""Meta-train a learned optimizer (or learn hyperparameters) on an optimizee task.

Defaults follow the L2L paper's MNIST setup: a 2x20 coordinatewise LSTM trained on a
1x20 sigmoid MLP (batch 128), 100-step unrolls truncated every 20 steps, meta-loss =
sum of training losses, outer Adam with learning rate 1e-3, for 60 meta-steps (the
quick preset: a few minutes on 2 CPU cores, below tuned Adam); --preset paper runs the
full 200. The run is written to runs/<name>/ (default runs/lstm_mnist/): checkpoint.pt
next to its TensorBoard logs. checkpoints/ holds the shipped optimizers and is never
written.

Examples:
    python meta_train.py                                   # quick LSTM run -> runs/lstm_mnist/checkpoint.pt
    python meta_train.py --preset paper                    # the full recipe, truncated (200 meta-steps)
    python meta_train.py --schedule 20:60,100:200@3e-4     # a curriculum: truncation 20, then the whole unroll
    python meta_train.py --task cifar10_conv --data-dir DATA
    python meta_train.py --optimizer momentum --learn lr,momentum --method forward --objective final_train
    python meta_train.py --optimizer sgd --learn weight_decay --method implicit --objective final_test --online 50
    python meta_train.py --family default --method pes --horizon 200 --truncation 20 --data-dir DATA
    python meta_train.py --resume                          # continue an interrupted run exactly
    torchrun --standalone --nproc_per_node=2 meta_train.py --meta-batch 2   # 2 processes, 1 optimizee each
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from l2o.checkpoint import CheckpointError, load as load_checkpoint
from l2o.cli import Parser, add_threads, run, csv_list, finite_float, nonempty, path, positive_int, seed, set_threads
from l2o.config import METHODS, OBJECTIVES, PRESETS, TrainConfig, UsageError
from l2o.schedule import total as schedule_total
from l2o.optim import NAMES as OPTIMIZERS
from l2o.tasks import FAMILIES, TASKS, DataNotFoundError

PROG = "meta_train.py"


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="quick",
                    help="quick (default: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["quick"].items())
                         + ") or paper (the full recipe: --meta-steps 200); explicit flags override it")
    g = ap.add_argument_group("optimizee")
    g.add_argument("--task", type=nonempty, help=f"optimizee: {', '.join(TASKS)}, or a user task as an import path "
                   f"package.module:function or file.py:function (default {d.task})")
    g.add_argument("--family", type=nonempty, help=f"meta-train on a task family instead: {', '.join(FAMILIES)}, or a spec such as "
                   "'mlp:width=10-64,activation=relu|tanh+quadratic:dim=5-10+mnist_mlp' (see README)")
    g.add_argument("--hidden", type=csv_list(int), help="hidden sizes of the MLP, e.g. 20 or 40,40 (cifar10_conv: FC width)")
    g.add_argument("--activation", help="MLP activation: sigmoid (default), relu or tanh")
    g.add_argument("--batch-size", type=positive_int, help="optimizee minibatch size (default 128)")
    g.add_argument("--data-dir", type=path, help="data root holding MNIST/, FashionMNIST/, cifar-10-batches-py/ (default $L2O_DATA_DIR or ./data)")
    g = ap.add_argument_group("optimizer to learn")
    g.add_argument("--optimizer", default=d.optimizer, help=f"{', '.join(OPTIMIZERS)} (default %(default)s)")
    g.add_argument("--learn", type=csv_list(str), help="hyperparameters to learn, e.g. lr,momentum or weight_decay (hand-designed optimizers); "
                   "with the LSTM, naming those --weight-decay, --adaptive-scale and --plus add (e.g. beta,lr) "
                   "keeps its weights fixed")
    g.add_argument("--inputs", default=d.inputs, help="LSTM inputs: paper (log/sign gradient), plain, rich (momenta + normalised gradient) (default %(default)s)")
    g.add_argument("--readout", default=d.readout, help="LSTM readout: linear (the paper) or dir_mag (direction x exp(log-magnitude), "
                   "with a skip path from the inputs) (default %(default)s)")
    g.add_argument("--skip-gain", type=finite_float, default=d.skip_gain, help="gain of the dir_mag skip path (a larger meta "
                   "learning rate for the step-size weights) (default %(default)s)")
    g.add_argument("--lstm-hidden", type=positive_int, default=d.lstm_hidden, help="LSTM width (default %(default)s)")
    g.add_argument("--lstm-layers", type=positive_int, default=d.lstm_layers, help="LSTM layers (default %(default)s)")
    g.add_argument("--output-scale", type=finite_float, default=d.output_scale, help="LSTM output scale (default %(default)s)")
    g.add_argument("--lr", type=finite_float, help="initial learning rate of a hand-designed optimizer")
    g.add_argument("--momentum", type=finite_float, help="initial momentum")
    g.add_argument("--decay", type=finite_float, help="initial lr decay exponent (momentum_inv_decay)")
    g.add_argument("--weight-decay", type=finite_float, help="initial weight decay (adds a learnable decay when learned)")
    g.add_argument("--per-parameter", action="store_true", help="one weight decay per weight")
    g.add_argument("--adaptive-scale", type=finite_float, metavar="BETA",
                   help="multiply the optimizer's steps by a global scale adapted online by hypergradient descent, "
                        "log-scale rate BETA (e.g. 0.3; learned with the other meta-parameters)")
    g.add_argument("--adaptive-scale-init", type=finite_float, default=d.adaptive_scale_init, metavar="S0",
                   help="with --adaptive-scale: the log of the step scale at the start of every run (default "
                        "%(default)s: the wrapped optimizer's own steps; e.g. -0.7 starts at half of them and "
                        "lets the rule grow the steps)")
    g.add_argument("--adaptive-scale-shrink", type=finite_float, default=d.adaptive_scale_shrink, metavar="K",
                   help="with --adaptive-scale: the rate at which the scales shrink, as a factor on BETA (default "
                        "%(default)s: as fast as they grow; e.g. 0.7 keeps minibatch noise from annealing the "
                        "steps early; applies to every adapted scale, --plus's included)")
    g.add_argument("--plus", metavar="NAME:LR",
                   help="add a hand-designed optimizer's update to the learned one's, e.g. adam:0.003 (NAME at "
                        "learning rate LR; with --adaptive-scale each has its own adapted step scale, so on each "
                        "task the steps of whichever rule makes progress grow; its hyperparameters are "
                        "meta-trained with the rest)")
    g.add_argument("--plus-floor", type=finite_float, metavar="S",
                   help="with --plus and --adaptive-scale: the lowest log-scale of the added optimizer's adapted "
                        "scale (default: none, -6), e.g. -0.5 keeps its steps at or above e^-0.5 = 0.61 of its own "
                        "learning rate, so the rule cannot anneal it away where the one-step cosine reads slightly "
                        "negative but larger steps still pay over the run")
    g = ap.add_argument_group("meta-gradient")
    g.add_argument("--method", default=d.method, help=f"{', '.join(METHODS)} (default %(default)s)")
    g.add_argument("--horizon", type=positive_int, default=d.horizon, help="inner steps per meta-step (default %(default)s)")
    g.add_argument("--truncation", type=positive_int, help=f"steps per truncation (truncated, pes, es) (default {d.truncation})")
    g.add_argument("--online", type=positive_int, help="update the meta-parameters every K inner steps of a run (RTHO with forward, "
                   "TRHO with truncated); default: every truncation for the LSTM, once per run otherwise")
    g.add_argument("--objective", help=f"{', '.join(OBJECTIVES)} (default: normalised = mean over steps of "
                   "log(loss_t / loss_0) with --family, sum_train otherwise)")
    g.add_argument("--second-order", action="store_true", help="differentiate through the optimizee gradients (off in the L2L paper)")
    g.add_argument("--meta-batch", type=positive_int, default=d.meta_batch, help="optimizees per meta-step, averaged (default %(default)s)")
    g.add_argument("--member-balance", action="store_true", help="scale each member's meta-gradient to unit norm "
                   "before the meta-batch mean, so no task of a family dominates the update (quadratics' are ~10-100x an MLP's)")
    g.add_argument("--population", type=positive_int, default=d.population, help="pes/es: antithetic particle pairs "
                   "(2N perturbed unrolls per truncation) (default %(default)s)")
    g.add_argument("--sigma", type=finite_float, default=d.sigma, help="pes/es: perturbation standard deviation (default %(default)s)")
    g.add_argument("--implicit-iters", type=positive_int, default=d.implicit_iters, help="Neumann terms for --method implicit (default %(default)s)")
    g = ap.add_argument_group("outer loop")
    g.add_argument("--meta-steps", type=positive_int, help="meta-steps (inner runs) in total (default: the preset's, "
                   "or the schedule's sum)")
    g.add_argument("--schedule", help="a curriculum in one run: comma-separated phases TRUNCATION:META_STEPS[@OUTER_LR], "
                   "e.g. 20:60,100:200@3e-4 (60 meta-steps truncated every 20 steps at --outer-lr, then 200 through "
                   "the whole 100-step unroll at 3e-4); each phase starts from the best-validated weights so far with a "
                   "fresh outer optimizer and its own --lr-schedule decay; replaces --truncation and --meta-steps")
    g.add_argument("--outer-optimizer", default=d.outer_optimizer, help="adam, sgd or rmsprop (default %(default)s)")
    g.add_argument("--outer-lr", type=finite_float, default=d.outer_lr, help="meta learning rate (default %(default)s)")
    g.add_argument("--lr-schedule", default=d.lr_schedule, help="cosine or constant (default %(default)s)")
    g.add_argument("--clip", type=finite_float, default=d.clip, help="meta-gradient norm clipping, 0 = off (default %(default)s)")
    g = ap.add_argument_group("validation, logging, checkpoints")
    g.add_argument("--val-every", type=positive_int, default=d.val_every, help="validate every N meta-steps (default %(default)s)")
    g.add_argument("--val-seeds", type=positive_int, default=d.val_seeds, help="held-out optimizee seeds for validation (default %(default)s)")
    g.add_argument("--val-horizons", type=csv_list(positive_int),
                   help="with --family: validate at each of these horizons (e.g. 100,200) and average the "
                        "speedups over tuned Adam, so the best weights also hold up over longer runs than "
                        "--horizon (Adam is tuned per member at each; default: --horizon)")
    g.add_argument("--save-every", type=positive_int, default=d.save_every, help="checkpoint every N meta-steps (default %(default)s)")
    g.add_argument("--seed", type=seed, default=d.seed, help="run seed (default %(default)s)")
    g.add_argument("--device", default=d.device, help="cpu or cuda (default %(default)s)")
    g.add_argument("--name", type=nonempty, help="run name (default <optimizer>_<dataset>, e.g. lstm_mnist)")
    g.add_argument("--log-dir", type=path, default=d.log_dir, help="root of the run folders: LOG_DIR/<name>/ holds the "
                   "TensorBoard logs and, by default, the checkpoint (default %(default)s)")
    g.add_argument("--checkpoint", type=path, help="checkpoint path (default LOG_DIR/<name>/checkpoint.pt)")
    g.add_argument("--init-from", type=path, help="start from the best weights of another checkpoint (e.g. a "
                   "shorter-truncation stage), a file or a shipped name such as lstm_mnist")
    g.add_argument("--resume", action="store_true", help="continue the run stored in the checkpoint")
    g.add_argument("--stop-after", type=positive_int, help="stop (with a checkpoint) after N meta-steps of this invocation")
    g.add_argument("--no-progress", action="store_true", help="no progress display (a bar on a terminal, "
                   "a plain line every 30 s otherwise)")
    add_threads(ap, default=None)
    g = ap.add_argument_group("several processes (under torchrun)")
    g.add_argument("--dist-backend", help="gloo or nccl (default: gloo on CPU, nccl on CUDA)")
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="seconds a process waits for a silent peer before giving up (default %(default)s)")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {k: v for k, v in vars(args).items()
              if k not in ("resume", "stop_after", "no_progress", "preset", "threads")}
    if args.family is not None and args.task is not None:
        raise UsageError(f"--task {args.task} and --family {args.family} both given; a family samples its own tasks "
                         f"(a task name can be one of its components: --family {args.task}+...)")
    if fields.get("task") is None:
        fields.pop("task")  # TrainConfig's default
    if args.schedule is not None and args.truncation is not None:
        raise UsageError("--truncation and --schedule both given; the schedule sets each phase's truncation")
    if args.schedule is not None and args.meta_steps is None:
        fields["meta_steps"] = schedule_total(TrainConfig(schedule=args.schedule).phases())  # its sum, not the preset's
    for key, value in PRESETS[args.preset].items():
        if fields.get(key) is None:
            fields[key] = value
    if fields.get("truncation") is None:
        fields["truncation"] = TrainConfig.truncation
    if fields.get("clip") == 0:
        fields["clip"] = None
    return TrainConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_threads(args.threads)  # default: 1, or under torchrun cores / ranks (L2O_THREADS); --threads N wins
    from l2o.distributed import PeerLost, env_rank
    from l2o.train import AllSkipped, fit

    main_rank = env_rank() == 0  # under torchrun every rank fails alike; rank 0 alone says so
    try:
        cfg = config_from_args(args)
        if args.resume and args.meta_steps is None and os.path.isfile(cfg.checkpoint_path):
            # a resumed run keeps its own length (a --preset paper run is not cut to the quick preset's)
            cfg.meta_steps = load_checkpoint(cfg.checkpoint_path)["config"].get("meta_steps", cfg.meta_steps)
        trainer = fit(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                      threads=args.threads)
    except (UsageError, CheckpointError, DataNotFoundError) as exc:
        if main_rank:  # one line, exit 2 (returned, so main(argv) can be called in-process)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else "bad input"
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except PeerLost as exc:  # another process died or went silent; the checkpoint is intact
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except AllSkipped as exc:
        if main_rank:
            print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C reaches every rank; rank 0 alone writes, so it alone says what was kept
        if main_rank:
            print(f"\n{PROG}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    best = trainer.best
    msg = f"done: {trainer.meta_step} meta-steps, checkpoint {cfg.checkpoint_path}"
    if best:
        msg += f"; best validation loss {best['val_loss']:.4f} at meta-step {best['meta_step']}"
    if trainer.is_family:  # scored by the speedup over Adam tuned for each validation member, per component
        print(msg + " (last validation, speedup over tuned Adam per component: "
              + ", ".join(f"{g} {math.exp(-v):.2f}x" for g, v in trainer.val_groups.items()) + ")")
    else:
        print(msg + f" (tuned Adam {trainer.extra['adam_val']:.4f}, lr {trainer.extra['adam_lr']:.3g})")
    return 0


if __name__ == "__main__":
    run(main, PROG, 'interrupted before training started; nothing was written')
