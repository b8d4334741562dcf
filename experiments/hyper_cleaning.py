"""Data hyper-cleaning (Franceschi, Donini, Frasconi & Pontil, ICML 2017; FAR-HO).

An MNIST training subset of which a large share of labels is replaced by a wrong random
class; a clean validation subset. Softmax regression is trained by T steps of full-batch
gradient descent on ``mean_i sigmoid(c_i) * CE_i``: one weight per training example. The
logits ``c`` are learned with reverse-mode hypergradients (l2o.hypergrad, full reverse) of the
validation loss after T steps, by Adam. A second run learns, through the same single
reverse-mode call, the example weights together with the initial weights and the learning
rate (hyperparameters of three kinds: data, initialisation, optimizer).

Reported: test accuracy of the cleaned model against training on all data (and on the
clean examples only, an oracle), and how well low weights (``sigmoid(c) < 0.5``) find the
corrupted examples (precision, recall, F1).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm import tqdm

import common
from l2o.hypergrad import Problem, make, unroll
from l2o.optim import SGD
from l2o.tasks import get, seeded

NAME = "hyper_cleaning"
DEFAULTS = dict(n_train=2000, n_val=1000, steps=100, meta_steps=100, joint_meta_steps=60)
QUICK = dict(n_train=60, n_val=30, steps=5, meta_steps=3, joint_meta_steps=2)


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(NAME, __doc__)
    p.add_argument("--n-train", type=common.positive_int, help="training examples (default 2000)")
    p.add_argument("--n-val", type=common.positive_int, help="clean validation examples (default 1000)")
    p.add_argument("--corrupt", type=common.fraction, default=0.5,
                   help="share of training labels replaced by a wrong class (default: 0.5)")
    p.add_argument("--steps", type=common.positive_int, help="inner gradient-descent steps T (default 100)")
    p.add_argument("--lr", type=common.positive_float, default=0.5, help="inner learning rate (default: 0.5)")
    p.add_argument("--meta-steps", type=common.positive_int, help="hypergradient steps on the weights (default 100)")
    p.add_argument("--meta-lr", type=common.positive_float, default=0.1,
                   help="Adam step on the example logits (default: 0.1)")
    p.add_argument("--joint-meta-steps", type=common.positive_int,
                   help="meta-steps of the joint run: weights + initial weights + lr (default 60)")
    return p


def resolve(args: argparse.Namespace) -> None:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def detection(weights: torch.Tensor, corrupted: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``weight < 0.5`` as a detector of the corrupted examples."""
    flagged = weights < 0.5
    tp = float((flagged & corrupted).sum())
    precision = tp / max(1.0, float(flagged.sum()))
    recall = tp / max(1.0, float(corrupted.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class Cleaning:
    """The bilevel problem: weighted training loss inside, clean validation loss outside."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.task = get("mnist_mlp", data_dir=args.data_dir, hidden=[])  # softmax regression
        (self.x, y), (self.xv, self.yv) = common.mnist_subsets(args.data_dir, [args.n_train, args.n_val],
                                                               seeded(args.seed, 7))
        gen = seeded(args.seed, 8)
        self.corrupted = torch.rand(len(y), generator=gen) < args.corrupt
        wrong = (y + torch.randint(1, 10, y.shape, generator=gen)) % 10  # a uniformly drawn *other* class
        self.y = torch.where(self.corrupted, wrong, y)
        self.test = self.task.full_batch("test")
        self.params0 = self.task.init(seeded(args.seed, 0))

    def inner(self, p: dict, h: dict, t: int | None) -> torch.Tensor:
        logp = self.task.forward(p, self.x).log_softmax(-1)
        ce = -logp.gather(-1, self.y[:, None]).squeeze(1)
        return (h["weights"] * ce).mean() if "weights" in h else (torch.sigmoid(h["logits"]) * ce).mean()

    def outer(self, p: dict, h: dict) -> torch.Tensor:
        return self.task.loss(p, (self.xv, self.yv))

    def train(self, weights: torch.Tensor, params: dict | None = None, lr: float | None = None) -> dict:
        """T steps with fixed example weights; validation loss and test accuracy of the result."""
        res = unroll(self.inner, params or self.params0, {"weights": weights}, SGD(lr=lr or self.args.lr),
                     self.args.steps, graph=False)
        with torch.no_grad():
            return {"val_loss": float(self.outer(res.params, {})),
                    "test_acc": float(self.task.accuracy(res.params, self.test))}

    def learn(self, writer, tag: str, meta_steps: int, joint: bool) -> dict:
        """Hypergradient descent on the logits (and, if ``joint``, on the initial weights and the lr)."""
        logits = torch.zeros(self.args.n_train, requires_grad=True)
        opt = SGD(lr=self.args.lr).learn(["lr"] if joint else [])
        params = {k: v.clone().requires_grad_(joint) for k, v in self.params0.items()}
        hparams = {"logits": logits}
        groups = [{"params": [logits], "lr": self.args.meta_lr}]
        if joint:
            hparams.update({"log_lr": opt.log_lr, **{f"init.{k}": v for k, v in params.items()}})
            groups += [{"params": [opt.log_lr], "lr": 0.02}, {"params": list(params.values()), "lr": 0.01}]
        meta = torch.optim.Adam(groups)
        history = []
        for i in tqdm(range(meta_steps), desc=f"{tag} meta-steps", leave=False):
            # one reverse pass through the whole run: gradient and objective
            est = make("reverse")
            state = est.init(Problem(self.inner, self.outer, params, opt, self.args.steps), hparams)
            g, metrics, _ = est.estimate(hparams, state)
            if not metrics["finite"]:  # the learned lr overshot: project it back and try again
                with torch.no_grad():
                    opt.log_lr.sub_(math.log(2.0))
                continue
            val = metrics["meta_loss"]
            for k, v in hparams.items():
                v.grad = g[k]
            meta.step()
            weights = torch.sigmoid(logits.detach())
            det = detection(weights, self.corrupted)
            history.append({"val_loss": val, **det, "lr": float(opt.hparam("lr").detach()),
                            "w_clean": float(weights[~self.corrupted].mean()),
                            "w_corrupt": float(weights[self.corrupted].mean())})
            for key, v in history[-1].items():
                writer.add_scalar(f"{tag}/{key}", v, i)
            writer.add_scalar(f"{tag}/hypergrad_norm", float(g["logits"].norm()), i)
        weights = torch.sigmoid(logits.detach())
        final = self.train(weights, {k: v.detach() for k, v in params.items()}, float(opt.hparam("lr").detach()))
        for name, mask in (("clean", ~self.corrupted), ("corrupted", self.corrupted)):
            if mask.any():  # --corrupt 0 (or a tiny --n-train) leaves a group empty: no histogram of nothing
                writer.add_histogram(f"{tag}/weights_{name}", weights[mask], meta_steps)
        return {**final, **detection(weights, self.corrupted), "lr": float(opt.hparam("lr").detach()),
                "history": history, "weights": weights}


def plot(prob: Cleaning, base: dict, oracle: dict, clean: dict, joint: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for run, label in ((clean, "weights"), (joint, "weights + init + lr")):
        h = run["history"]
        axes[0].plot([e["val_loss"] for e in h], label=label)
        axes[2].plot([e["f1"] for e in h], label=f"F1, {label}")
    axes[0].axhline(base["val_loss"], color="k", ls="--", label="all data")
    axes[0].axhline(oracle["val_loss"], color="g", ls=":", label="clean data only")
    axes[0].set(xlabel="meta-step", ylabel="validation loss", title="validation loss after T steps")
    axes[0].legend(fontsize=7)
    w = clean["weights"]
    axes[1].hist([w[~prob.corrupted].numpy(), w[prob.corrupted].numpy()], bins=30, label=["clean", "corrupted"])
    axes[1].set(xlabel="learned example weight", ylabel="examples", title="weights after hyper-cleaning")
    axes[1].legend(fontsize=7)
    axes[2].set(xlabel="meta-step", ylabel="F1 (weight < 0.5 = corrupted)", ylim=(0, 1), title="detection")
    axes[2].legend(fontsize=7)
    names = ["all data", "hyper-cleaned", "joint", "clean only"]
    accs = [base["test_acc"], clean["test_acc"], joint["test_acc"], oracle["test_acc"]]
    axes[3].bar(names, accs, color=["C7", "C0", "C1", "C2"])
    for i, a in enumerate(accs):
        axes[3].text(i, a, f"{a:.3f}", ha="center", va="bottom")
    axes[3].set(ylim=(max(0.0, min(accs) - 0.1), 1.0), ylabel="test accuracy", title="test accuracy")
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> dict:
    resolve(args)
    writer = common.start(args, NAME)
    prob = Cleaning(args)
    base = prob.train(torch.ones(args.n_train))
    oracle = prob.train((~prob.corrupted).to(torch.get_default_dtype()))
    clean = prob.learn(writer, "weights", args.meta_steps, joint=False)
    joint = prob.learn(writer, "joint", args.joint_meta_steps, joint=True)
    fig = plot(prob, base, oracle, clean, joint)
    strip = lambda r: {k: v for k, v in r.items() if k != "weights"}  # noqa: E731
    results = {"n_train": args.n_train, "n_val": args.n_val, "corrupted": int(prob.corrupted.sum()),
               "steps": args.steps, "all_data": base, "clean_only": oracle, "hyper_cleaned": strip(clean),
               "joint": strip(joint), "beats_all_data": clean["test_acc"] > base["test_acc"]}
    print(f"test accuracy: all data {base['test_acc']:.4f}, hyper-cleaned {clean['test_acc']:.4f} "
          f"(F1 {clean['f1']:.3f}), joint {joint['test_acc']:.4f} (F1 {joint['f1']:.3f}, lr {joint['lr']:.3g}), "
          f"clean only {oracle['test_acc']:.4f}")
    return common.finish(args, NAME, results, fig, writer)


def main(argv: list[str] | None = None) -> dict:
    return common.cli(NAME, build_parser, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
