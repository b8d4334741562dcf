"""Implicit differentiation at scale (Lorraine, Vicol & Duvenaud, AISTATS 2020).

An MLP 784-784-10 on 50 MNIST training examples with one weight-decay coefficient per
weight (~623k hyperparameters, softplus-positive, l2o.optim.WeightDecay). The weights are
trained by Adam on ``train loss + 0.5 * sum(wd * w**2)``; every --inner-steps steps the
hypergradient of the loss on 50 validation examples is computed with the implicit function
theorem (l2o.hypergrad.implicit, Neumann-series inverse Hessian) and RMSprop updates the
decays. The same model with the decay frozen at its initial value is trained alongside on
the same examples from the same initial weights.

Expected: the validation loss falls below the baseline's, and one hypergradient costs a
few training steps (both timed in this run).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

import common
from l2o.hypergrad import implicit, unroll
from l2o.hypergrad.implicit import largest_eigenvalue
from l2o.optim import Adam, WeightDecay
from l2o.tasks import get, seeded

NAME = "implicit_weight_decay"
DEFAULTS = dict(n_train=50, n_val=50, hidden=784, outer_steps=100, inner_steps=10)
QUICK = dict(n_train=20, n_val=20, hidden=16, outer_steps=3, inner_steps=2)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(NAME, __doc__)
    p.add_argument("--n-train", type=common.positive_int, help="training examples (default 50)")
    p.add_argument("--n-val", type=common.positive_int, help="validation examples (default 50)")
    p.add_argument("--hidden", type=common.positive_int, help="hidden units (default 784)")
    p.add_argument("--outer-steps", type=common.positive_int, help="hypergradient updates (default 100)")
    p.add_argument("--inner-steps", type=common.positive_int, help="Adam steps between updates (default 10)")
    p.add_argument("--lr", type=common.positive_float, default=1e-3, help="Adam step on the weights (default: 1e-3)")
    p.add_argument("--hyper-lr", type=common.positive_float, default=0.03,
                   help="RMSprop step on the decays' softplus-inverse (default: 0.03)")
    p.add_argument("--init-decay", type=common.positive_float, default=1e-3,
                   help="initial decay of every weight, also the baseline's (default: 1e-3)")
    p.add_argument("--neumann-iters", type=common.positive_int, default=5, help="Neumann terms (default: 5)")
    return p


def resolve(args: argparse.Namespace) -> None:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def decay_vector(opt: WeightDecay) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([opt.decay(k).reshape(-1) for k in opt._keys])


def neumann_alpha(inner, params, hparams) -> tuple[float, float]:
    """``1 / lambda_max`` of the penalised training loss's Hessian (20 power iterations, done once)."""
    p = [v.detach().requires_grad_() for v in params.values()]
    with torch.enable_grad():
        g = torch.autograd.grad(inner(dict(zip(params, p)), hparams, None), p, create_graph=True)
        lam = largest_eigenvalue(lambda v: list(torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)), p)
    return 1.0 / max(lam, 1e-8), lam


def run(args: argparse.Namespace) -> dict:
    resolve(args)
    writer = common.start(args, NAME)
    task = get("mnist_mlp", data_dir=args.data_dir, hidden=[args.hidden], activation="relu")
    (x, y), (xv, yv) = common.mnist_subsets(args.data_dir, [args.n_train, args.n_val], seeded(args.seed, 7))
    params0 = task.init(seeded(args.seed, 0))
    shapes = {k: list(v.shape) for k, v in params0.items()}
    models = {}
    for name in ("learned", "baseline"):
        opt = WeightDecay(Adam(lr=args.lr), args.init_decay, shapes=shapes).learn(["weight_decay"])
        models[name] = {"opt": opt, "params": params0, "state": None, "val": {}, "train": {}}
    opt = models["learned"]["opt"]
    hparams = dict(opt.raw_weight_decay.named_parameters())
    n_hyper = sum(v.numel() for v in hparams.values())
    hyper_opt = torch.optim.RMSprop(hparams.values(), lr=args.hyper_lr)

    def train_loss(p, h=None, t=None):
        return task.loss(p, (x, y))

    def inner(p, h, t):  # the training objective the weights minimise: the stationarity of implicit diff.
        return task.loss(p, (x, y)) + opt.penalty(p)

    def val_loss(p, h=None):
        return task.loss(p, (xv, yv))

    alpha, lam, t_step, t_hyper, decays = None, None, [], [], []
    print(f"{n_hyper} weight-decay hyperparameters, {args.n_train} training / {args.n_val} validation examples")
    for k in tqdm(range(args.outer_steps), desc="outer steps"):
        step = (k + 1) * args.inner_steps
        for name, m in models.items():
            t0 = time.perf_counter()
            res = unroll(train_loss, m["params"], {}, m["opt"], args.inner_steps, state=m["state"],
                         start=k * args.inner_steps, graph=False)
            if name == "learned":
                t_step.append((time.perf_counter() - t0) / args.inner_steps)
            if not res.finite:
                raise common.UsageError(f"{name} training diverged at step {step}; lower --lr")
            m["params"], m["state"] = res.params, res.state
            with torch.no_grad():
                m["val"][step], m["train"][step] = float(val_loss(m["params"])), float(train_loss(m["params"]))
            writer.add_scalars("loss/val", {name: m["val"][step]}, step)
            writer.add_scalars("loss/train", {name: m["train"][step]}, step)
        params = models["learned"]["params"]
        if alpha is None:
            alpha, lam = neumann_alpha(inner, params, hparams)
        t0 = time.perf_counter()
        hg = implicit(inner, val_loss, params, hparams, method="neumann", iters=args.neumann_iters, alpha=alpha)
        t_hyper.append(time.perf_counter() - t0)
        for name, v in hparams.items():
            v.grad = hg[name]
        hyper_opt.step()
        d = decay_vector(opt)
        decays.append((step, float(d.mean()), float(d.median()), float(d.max())))
        writer.add_scalars("decay", dict(zip(("mean", "median", "max"), decays[-1][1:])), step)
        writer.add_scalar("hypergrad/norm", float(torch.cat([g.reshape(-1) for g in hg.values()]).norm()), step)
        if k % max(1, args.outer_steps // 5) == 0 or k == args.outer_steps - 1:
            writer.add_histogram("decay/log10", d.log10(), step)
    test = task.full_batch("test")
    final = {}
    for name, m in models.items():
        with torch.no_grad():
            final[name] = {"val_loss": m["val"][step], "min_val_loss": min(m["val"].values()),
                           "train_loss": m["train"][step], "test_loss": float(task.loss(m["params"], test)),
                           "test_acc": float(task.accuracy(m["params"], test)), "val_curve": m["val"]}
    skip = min(len(t_step) - 1, 2)  # the first steps pay one-off allocation costs
    step_ms = 1e3 * sum(t_step[skip:]) / len(t_step[skip:])
    hyper_ms = 1e3 * sum(t_hyper[skip:]) / len(t_hyper[skip:])
    cost = {"training_step_ms": step_ms, "hypergradient_ms": hyper_ms, "ratio": hyper_ms / step_ms,
            "overhead_per_training_step": hyper_ms / (step_ms * args.inner_steps),
            "neumann_iters": args.neumann_iters, "neumann_alpha": alpha, "hessian_lambda_max": lam}
    results = {"n_hyperparameters": n_hyper, "n_train": args.n_train, "n_val": args.n_val, "hidden": args.hidden,
               "steps": step, "final": final, "decay_trajectory": decays, "cost": cost,
               "val_below_baseline": final["learned"]["val_loss"] < final["baseline"]["val_loss"]}
    fig = plot(models, final, decays, decay_vector(opt), cost, args)
    print(f"validation loss: learned decay {final['learned']['val_loss']:.4f} vs baseline "
          f"{final['baseline']['val_loss']:.4f} (best along the run {final['baseline']['min_val_loss']:.4f}); "
          f"test acc {final['learned']['test_acc']:.3f} vs {final['baseline']['test_acc']:.3f}; "
          f"hypergradient = {cost['ratio']:.2f} training steps")
    return common.finish(args, NAME, results, fig, writer)


def plot(models: dict, final: dict, decays: list, final_decay: torch.Tensor, cost: dict, args: argparse.Namespace):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    for name, style in (("learned", "-"), ("baseline", "--")):
        m = models[name]
        ax.plot(list(m["val"]), list(m["val"].values()), "C0" + style, label=f"validation, {name}")
        ax.plot(list(m["train"]), list(m["train"].values()), "C1" + style, label=f"training, {name}")
    acc = {name: m["test_acc"] for name, m in final.items()}
    ax.set(yscale="log", xlabel="training step", ylabel="loss",
           title=f"{args.n_train} train / {args.n_val} val; test acc {acc['learned']:.3f} vs {acc['baseline']:.3f}")
    ax.legend(fontsize=7)
    ax = axes[1]
    steps = [s for s, *_ in decays]
    for i, label in enumerate(("mean", "median", "max")):
        ax.plot(steps, [d[i + 1] for d in decays], label=label)
    ax.set(yscale="log", xlabel="training step", ylabel="weight decay", title=f"{final_decay.numel()} decays")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.hist(final_decay.log10().numpy(), bins=60)
    ax.set(xlabel="log10 decay", ylabel="weights", yscale="log", title="learned decays at the end")
    ax = axes[3]
    ax.bar(["training step", f"hypergradient\n(Neumann {cost['neumann_iters']})"],
           [cost["training_step_ms"], cost["hypergradient_ms"]], color=["C2", "C3"])
    ax.set(ylabel="ms", title=f"hypergradient = {cost['ratio']:.2f} x training step")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    return common.cli(NAME, build_parser, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
