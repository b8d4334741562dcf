"""Short-horizon bias in meta-optimization (Wu, Ren, Liao & Grosse, ICLR 2018).

An MNIST MLP trained by SGD with heavy-ball momentum and the inverse-time schedule
``lr_t = lr0 * (1 + t / T0) ** -decay``. The meta-objective is the training loss (on a
fixed subset of the training set) after T steps. Four parts:

  (a) random search over (lr0, decay): the loss surface at several horizons T. The
      schedule does not depend on T, so one run to the longest horizon gives every point's
      loss at every horizon (same init and batches for all points);
  (b) the best point of each horizon retrained to the longest horizon on fresh seeds;
  (c) gradient-based meta-optimization of (lr0, decay) at the shortest horizon with
      forward-mode hypergradients (l2o.hypergrad.forward), the result trained long;
  (d) online meta-optimization during one long run (RTHO, the forward estimator updating every K steps):
      --num-meta-steps updates, one every --steps-per-update inner steps.

Expected: the optimum chosen at a short horizon decays the learning rate faster and ends
worse at the long horizon than the long-horizon optimum. Horizons default to 100/500/2000
(instead of the paper's up to 5000) to fit 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm import tqdm

import common
from l2o.hypergrad import Problem as Run, forward, make, unroll
from l2o.optim import MomentumInvDecay
from l2o.tasks import BatchStream, get, seeded

NAME = "short_horizon"
DEFAULTS = dict(horizons=[100, 500, 2000], num_points=24, hidden=100, batch_size=128, eval_examples=1000,
                rerun_seeds=2, meta_iters=30, num_meta_steps=40, steps_per_update=50)
QUICK = dict(horizons=[4, 8, 16], num_points=3, hidden=8, batch_size=16, eval_examples=64,
             rerun_seeds=1, meta_iters=2, num_meta_steps=3, steps_per_update=4)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(NAME, __doc__)
    p.add_argument("--horizons", type=common.int_list, help="comma-separated horizons T (default 100,500,2000)")
    p.add_argument("--num-points", type=common.positive_int, help="random-search points (default 24)")
    p.add_argument("--lr-range", type=common.positive_float, nargs=2, default=[0.03, 1.0], metavar=("LO", "HI"),
                   help="log-uniform range of lr0 (default: 0.03 1.0)")
    p.add_argument("--decay-max", type=common.positive_float, default=1.5, help="decay ~ U(0, MAX) (default: 1.5)")
    p.add_argument("--momentum", type=common.fraction, default=0.9, help="momentum, fixed (default: 0.9)")
    p.add_argument("--T0", type=common.positive_float, default=20.0, help="schedule time scale (default: 20)")
    p.add_argument("--hidden", type=common.positive_int, help="hidden units of the ReLU MLP (default 100)")
    p.add_argument("--batch-size", type=common.positive_int, help="minibatch size (default 128)")
    p.add_argument("--eval-examples", type=common.positive_int,
                   help="fixed training examples on which the meta-objective is measured (default 1000)")
    p.add_argument("--rerun-seeds", type=common.positive_int, help="fresh seeds for part (b) (default 2)")
    p.add_argument("--meta-horizon", type=common.positive_int, help="horizon of part (c) (default: the shortest)")
    p.add_argument("--meta-iters", type=common.positive_int, help="meta-steps of part (c) (default 30)")
    p.add_argument("--meta-lr", type=common.positive_float, default=0.1,
                   help="Adam step on (log lr0, decay) in parts (c) and (d) (default: 0.1)")
    p.add_argument("--init", type=common.finite_float, nargs=2, default=[0.1, 0.5], metavar=("LR0", "DECAY"),
                   help="starting point of parts (c) and (d) (default: 0.1 0.5)")
    p.add_argument("--num-meta-steps", type=common.positive_int,
                   help="online updates in part (d); its run lasts NUM x --steps-per-update steps (default 40)")
    p.add_argument("--steps-per-update", type=common.positive_int, help="inner steps per online update (default 50)")
    return p


def resolve(args: argparse.Namespace) -> None:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.horizons = sorted(set(args.horizons))
    args.meta_horizon = args.meta_horizon or args.horizons[0]
    lo, hi = args.lr_range
    if not 0 < lo < hi:
        raise common.UsageError(f"--lr-range needs 0 < LO < HI, got {lo} {hi}")
    if not 0 <= args.momentum < 1 or args.init[0] <= 0 or args.init[1] < 0:
        raise common.UsageError("--momentum must be in [0, 1) and --init needs LR0 > 0, DECAY >= 0")


class Problem:
    """The MNIST MLP, its minibatches and the fixed meta-objective subset."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.task = get("mnist_mlp", data_dir=args.data_dir, hidden=[args.hidden], activation="relu",
                        batch_size=args.batch_size)
        self.eval_batch = common.mnist_subsets(args.data_dir, [args.eval_examples], seeded(args.seed, 7))[0]
        self.long = args.horizons[-1]
        self.marks = sorted(set(args.horizons) | {max(1, round(self.long ** (i / 12))) for i in range(1, 13)})

    def optimizer(self, lr0: float, decay: float) -> MomentumInvDecay:
        return MomentumInvDecay(lr=lr0, momentum=self.args.momentum, decay=decay, T0=self.args.T0)

    def start(self, seed: int):
        stream = BatchStream(self.task, "train", seeded(seed, 1))
        return self.task.init(seeded(seed, 0)), (lambda p, h, t: self.task.loss(p, stream[t]))

    def objective(self, params, hparams=None) -> torch.Tensor:
        return self.task.loss(params, self.eval_batch)

    def train(self, lr0: float, decay: float, seed: int) -> tuple[dict[int, float], float]:
        """Train to the longest horizon; the meta-objective at every mark, and the final test accuracy."""
        params, inner = self.start(seed)
        opt, state, t, curve = self.optimizer(lr0, decay), None, 0, {}
        for mark in self.marks:
            res = unroll(inner, params, {}, opt, mark - t, state=state, start=t, graph=False)
            if not res.finite:
                return {**curve, **{m: math.inf for m in self.marks if m >= mark}}, 0.0
            params, state, t = res.params, res.state, mark
            with torch.no_grad():
                curve[mark] = float(self.objective(params))
        acc = float(self.task.accuracy(params, self.task.full_batch("test")))
        return curve, acc


def schedule_end(lr0: float, decay: float, args: argparse.Namespace) -> float:
    return lr0 * (1 + args.horizons[-1] / args.T0) ** -decay


def meta_optimize(prob: Problem, writer, args: argparse.Namespace) -> dict:
    """Part (c): forward-mode hypergradient descent on (log lr0, decay) at ``--meta-horizon``."""
    opt = prob.optimizer(*args.init).learn(["lr", "decay"])
    hparams = {"log_lr": opt.log_lr, "decay": opt.decay}
    meta = torch.optim.Adam(hparams.values(), lr=args.meta_lr)
    traj = [(opt.hparam("lr").item(), opt.decay.item())]
    for i in tqdm(range(args.meta_iters), desc="(c) forward-mode meta-optimization", leave=False):
        params, inner = prob.start(args.seed + 1000 + i)
        g = forward(inner, prob.objective, params, hparams, opt, args.meta_horizon)
        if not all(torch.isfinite(v).all() for v in g.values()):
            continue  # a diverged inner run: no information, skip the update
        for k, v in hparams.items():
            v.grad = g[k].to(v.dtype)
        meta.step()
        with torch.no_grad():
            opt.decay.clamp_(min=0.0)  # projection: the learning rate never grows
        traj.append((opt.hparam("lr").item(), opt.decay.item()))
        writer.add_scalars("c_forward/hparams", {"lr0": traj[-1][0], "decay": traj[-1][1]}, i)
        writer.add_scalars("c_forward/hypergrad", {k: float(v) for k, v in g.items()}, i)
    return {"horizon": args.meta_horizon, "lr0": traj[-1][0], "decay": traj[-1][1], "trajectory": traj}


def online(prob: Problem, writer, args: argparse.Namespace) -> dict:
    """Part (d): RTHO, an update of (log lr0, decay) every ``--steps-per-update`` steps of one run."""
    opt = prob.optimizer(*args.init).learn(["lr", "decay"])
    hparams = {"log_lr": opt.log_lr, "decay": opt.decay}
    meta = torch.optim.Adam(hparams.values(), lr=args.meta_lr)
    params, inner = prob.start(args.seed + 2000)
    steps = args.num_meta_steps * args.steps_per_update
    traj, curve = [(0, opt.hparam("lr").item(), opt.decay.item())], {}
    bar = tqdm(total=steps, desc="(d) online meta-optimization", leave=False)
    est = make("forward", every=args.steps_per_update)  # RTHO: tangents flow on across the updates
    state = est.init(Run(inner, prob.objective, params, opt, steps), hparams)
    while not est.done(state):
        g, _, state = est.estimate(hparams, state)
        t = state.t
        with torch.no_grad():
            curve[t] = float(prob.objective(state.params))
        if not math.isfinite(curve[t]):
            break
        for k, v in hparams.items():
            v.grad = g[k].to(v.dtype)
        meta.step()
        with torch.no_grad():
            opt.decay.clamp_(min=0.0)
        traj.append((t, opt.hparam("lr").item(), opt.decay.item()))
        writer.add_scalars("d_online/hparams", {"lr0": traj[-1][1], "decay": traj[-1][2]}, t)
        writer.add_scalars("d_online/hypergrad", {k: float(v) for k, v in g.items()}, t)
        writer.add_scalar("d_online/meta_objective", curve[t], t)
        bar.update(args.steps_per_update)
    bar.close()
    return {"steps": steps, "lr0": traj[-1][1], "decay": traj[-1][2], "final_loss": curve.get(steps, math.inf),
            "trajectory": traj, "curve": curve}


def plot(prob: Problem, points: list[dict], best: dict, fwd: dict, onl: dict, args: argparse.Namespace):
    import matplotlib.pyplot as plt

    H = args.horizons
    fig, axes = plt.subplots(2, max(3, len(H)), figsize=(4.2 * max(3, len(H)), 8), squeeze=False)
    xs = [math.log10(p["lr0"]) for p in points]
    ys = [p["decay"] for p in points]
    for j, h in enumerate(H):
        ax = axes[0][j]
        loss = [min(p["loss"][h], 10.0) for p in points]
        sc = ax.scatter(xs, ys, c=[math.log10(v) for v in loss], cmap="viridis_r", s=28)
        fig.colorbar(sc, ax=ax, label="log10 loss")
        b = best[h]
        ax.plot(math.log10(b["lr0"]), b["decay"], "r*", ms=16, label=f"best: {b['loss_at_h']:.3f}")
        if h == fwd["horizon"]:
            ax.plot([math.log10(a) for a, _ in fwd["trajectory"]], [d for _, d in fwd["trajectory"]], "k.-",
                    lw=1, ms=3, label="(c) forward mode")
        if h == H[-1]:
            ax.plot([math.log10(a) for _, a, _ in onl["trajectory"]], [d for _, _, d in onl["trajectory"]], "m.-",
                    lw=1, ms=3, label="(d) online")
        ax.set(title=f"(a) training loss after T={h}", xlabel="log10 lr0", ylabel="decay")
        ax.legend(fontsize=7)
    ax = axes[1][0]
    for h in H:
        c = best[h]["curve"]
        ax.plot(list(c), list(c.values()), label=f"best at T={h} (decay {best[h]['decay']:.2f})")
    c = fwd["curve"]
    ax.plot(list(c), list(c.values()), "k--", label=f"(c) forward-mode, T={fwd['horizon']}")
    ax.plot(list(onl["curve"]), list(onl["curve"].values()), "m:", label="(d) online")
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="training loss", title="(b) trained to the long horizon")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    lr_t = lambda lr0, d, t: lr0 * (1 + t / args.T0) ** -d  # noqa: E731
    ts = list(range(0, H[-1] + 1, max(1, H[-1] // 200)))
    for h in H:
        ax.plot(ts, [lr_t(best[h]["lr0"], best[h]["decay"], t) for t in ts], label=f"best at T={h}")
    ax.plot(ts, [lr_t(fwd["lr0"], fwd["decay"], t) for t in ts], "k--", label="(c) forward mode")
    ax.set(yscale="log", xlabel="step", ylabel="learning rate", title="chosen schedules")
    ax.legend(fontsize=7)
    ax = axes[1][2]
    ax.plot([t for t, _, _ in onl["trajectory"]], [a for _, a, _ in onl["trajectory"]], "m-", label="lr0")
    ax.plot([t for t, _, _ in onl["trajectory"]], [d for _, _, d in onl["trajectory"]], "c-", label="decay")
    ax.set(xlabel="step", title="(d) online hyperparameters")
    ax.legend(fontsize=7)
    for ax in axes[1][3:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> dict:
    resolve(args)
    writer = common.start(args, NAME)
    prob = Problem(args)
    gen = torch.Generator().manual_seed(args.seed)
    lo, hi = (math.log(v) for v in args.lr_range)
    points = []
    for i in tqdm(range(args.num_points), desc="(a) random search"):
        lr0 = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
        decay = args.decay_max * float(torch.rand((), generator=gen))
        curve, _ = prob.train(lr0, decay, args.seed)
        points.append({"lr0": lr0, "decay": decay, "loss": {h: curve[h] for h in args.horizons}})
        writer.add_scalars("a_search/loss", {f"T{h}": curve[h] for h in args.horizons}, i)
    best, rerun = {}, {}
    for h in tqdm(args.horizons, desc="(b) best points, long horizon"):
        b = min(points, key=lambda p: p["loss"][h])
        key = (b["lr0"], b["decay"])  # the same point may win at several horizons: train it once
        if key not in rerun:
            rerun[key] = [prob.train(b["lr0"], b["decay"], args.seed + 1 + s) for s in range(args.rerun_seeds)]
        runs = rerun[key]
        curve = {m: sum(r[0][m] for r in runs) / len(runs) for m in prob.marks}
        best[h] = {"lr0": b["lr0"], "decay": b["decay"], "loss_at_h": b["loss"][h], "curve": curve,
                   "loss_long": curve[prob.long], "test_acc_long": sum(r[1] for r in runs) / len(runs),
                   "lr_at_long": schedule_end(b["lr0"], b["decay"], args)}
        for m, v in curve.items():
            writer.add_scalar(f"b_long/best_at_T{h}", v, m)
    fwd = meta_optimize(prob, writer, args)
    runs = [prob.train(fwd["lr0"], fwd["decay"], args.seed + 1 + s) for s in range(args.rerun_seeds)]
    fwd["curve"] = {m: sum(r[0][m] for r in runs) / len(runs) for m in prob.marks}
    fwd["loss_long"], fwd["test_acc_long"] = fwd["curve"][prob.long], sum(r[1] for r in runs) / len(runs)
    onl = online(prob, writer, args)
    short, long_ = best[args.horizons[0]], best[prob.long]
    verdict = {"short_best_decays_faster": short["lr_at_long"] < long_["lr_at_long"],
               "short_best_ends_worse": short["loss_long"] > long_["loss_long"],
               "forward_mode_ends_worse": fwd["loss_long"] > long_["loss_long"]}
    fig = plot(prob, points, best, fwd, onl, args)
    results = {"horizons": args.horizons, "T0": args.T0, "momentum": args.momentum, "points": points,
               "best": best, "forward": fwd, "online": onl, "shows_bias": verdict}
    print(f"best at T={args.horizons[0]}: lr0={short['lr0']:.3g} decay={short['decay']:.2f} -> loss at "
          f"T={prob.long}: {short['loss_long']:.4f}; best at T={prob.long}: lr0={long_['lr0']:.3g} "
          f"decay={long_['decay']:.2f} -> {long_['loss_long']:.4f}; forward-mode (T={fwd['horizon']}): "
          f"lr0={fwd['lr0']:.3g} decay={fwd['decay']:.2f} -> {fwd['loss_long']:.4f}; online: lr0={onl['lr0']:.3g} "
          f"decay={onl['decay']:.2f} -> {onl['final_loss']:.4f}")
    return common.finish(args, NAME, results, fig, writer)


def main(argv: list[str] | None = None) -> dict:
    return common.cli(NAME, build_parser, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
