"""Hyper-representation (Franceschi, Frasconi, Salzo, Grazzi & Pontil, ICML 2018; FAR-HO).

A representation ``h_lambda`` (a ReLU MLP on the 784 pixels, or a small convnet) shared by every episode, and
the inner learning rate, are the outer variables. Each N-way K-shot episode fits only a
linear head ``(W, b)``, from zero, by T steps of gradient descent on the cross-entropy of
``h_lambda(support)``; the outer objective is the query cross-entropy after those T steps,
averaged over a meta-batch of episodes. Its gradient with respect to ``lambda`` and the
learning rate is taken by reverse mode through the T steps (``l2o.hypergrad.segments`` with
K = T, which is ``reverse``) and, in a second run, by truncated reverse through the last K
steps only. The episodes of a meta-batch are stacked (head ``W`` of shape [B, d, N]; inner
loss = sum of the episodes' mean losses), so each head gets exactly its own gradient.

Split (default ``--split mixed --rotations 4``): meta-training classes are MNIST digits 0-4 and
Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress, coat), training images, each at
four quarter turns as a class of its own: 40 classes. Test episodes: 5 of the 10 classes
MNIST 5-9 and Fashion-MNIST 5-9 (sandal, shirt, sneaker, bag, ankle boot), upright, training
and test images (never seen before testing). Validation episodes (held-out test images of
the training classes) make every choice: the inner learning rates, baseline (a)'s training
length, the meta-training length and meta learning rate. Why not MNIST 0-4 / 5-9
alone (``--split digits --rotations 1``): five training classes are too few: every episode
holds the same five digits, and the learned representations (both meta-learned and
supervised) measured below raw pixels on digits 5-9.

Meta-training (defaults ``--init supervised --train-shots 5``): pre-train, then meta-fine-tune
(as in Meta-Baseline, Chen et al. 2021): the representation and the inner lr start from baseline
(a)'s pick (below) at the meta-training shot, then one meta-training per candidate ``--meta-lr``
on 5-shot episodes; every ``--eval-every`` meta-steps (step 0, the supervised start, included)
the validation episodes of each test shot score the snapshot, and the (meta lr, meta-steps)
with the best score is that shot's hyper-representation: chosen like baseline (a)'s training
length. Its test-time inner lr, like every baseline's, is then picked from the grid on the
validation episodes (the meta-learned lr, fit to the meta-training classes, is reported
beside). ``--init random`` starts from the random initialisation and ``--lr`` (FAR-HO's
setting); ``--train-shots same`` meta-trains one per test shot on its own shot count.

Baselines, on the very same test episodes, each with the same head fit (T steps from zero)
and its inner learning rate chosen from a grid on the validation episodes:
  (a) supervised: the same representation trained by ordinary classification over the 40
      meta-training classes (Adam through the same unroll, no graph), its classifier dropped;
      its number of training steps is picked, with the learning rate, on the validation
      episodes of each test shot from ``--pretrain-steps`` (snapshots of one run);
  (b) random: the representation at its initialisation (where ``--init random`` starts);
  (c) pixels: no representation, the head on the raw 784 pixels.
Reported: accuracy per test episode, mean +- 95% interval (1.96 sd / sqrt(n)), and the
paired difference of the hyper-representation to each baseline on the same episodes.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

import common
from few_shot import Episodes, class_pools, head_problem, interval, representation
from hyper_representation_plot import plot
from l2o.hypergrad import segments, unroll
from l2o.optim import SGD, Adam
from l2o.tasks import seeded
from l2o.tasks.base import cross_entropy
from l2o.tasks.data import load

NAME = "hyper_representation"
TRAIN_CLASSES, TEST_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
SPLITS = {"digits": ["mnist"], "mixed": ["mnist", "fashion_mnist"]}  # classes 0-4 of each set train, 5-9 test
LR_GRID = [10.0 ** (e / 2) for e in range(-6, 5)]  # 1e-3 .. 1e2, half decades
DEFAULTS = dict(meta_steps=300, meta_batch=16, queries=15, hidden=[512], pretrain_steps=[300, 600, 1200, 2400],
                meta_lr=[1e-4, 3e-4, 1e-3], test_episodes=20000, val_episodes=200, monitor_episodes=150, eval_every=30)
QUICK = dict(meta_steps=4, meta_batch=2, queries=2, hidden=[16, 8], pretrain_steps=[2, 4], meta_lr=[1e-3, 1e-2],
             test_episodes=12, val_episodes=6, monitor_episodes=6, eval_every=2)


def train_shots(text: str) -> int | str:
    """``same``, ``mixed`` or a positive integer."""
    return text if text in ("same", "mixed") else common.positive_int(text)


def positive_floats(text: str) -> list[float]:
    """Comma-separated positive numbers."""
    try:
        return [common.positive_float(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = common.parser(NAME, __doc__)
    p.add_argument("--ways", type=common.positive_int, default=5, help="classes per episode N (default: 5)")
    p.add_argument("--shots", type=common.int_list, default=[1, 5], help="comma-separated K (default: 1,5)")
    p.add_argument("--queries", type=common.positive_int, help="query examples per class (default 15)")
    p.add_argument("--train-shots", type=train_shots, default=5,
                   help="K of the meta-training episodes: one representation, meta-trained on K-shot episodes, "
                        "is tested at every --shots; 'same' meta-trains one per test shot on its own K; 'mixed' "
                        "meta-trains one on meta-batches split evenly among the test shots (default: 5)")
    p.add_argument("--steps", type=common.positive_int, default=5, help="inner head steps T (default: 5)")
    p.add_argument("--truncate", type=common.positive_int, default=1,
                   help="steps K the truncated run differentiates through (default: 1)")
    p.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="representation (default: mlp)")
    p.add_argument("--norm", action="store_true",
                   help="unit-length features for every method (the supervised classifier and every head see them)")
    p.add_argument("--hidden", type=common.int_list, help="layer widths of the representation (default 512)")
    p.add_argument("--split", choices=sorted(SPLITS), default="mixed",
                   help="digits: MNIST 0-4 / 5-9; mixed: MNIST and Fashion-MNIST, 0-4 of both / 5-9 of both "
                        "(default: mixed)")
    p.add_argument("--rotations", type=int, choices=[1, 2, 3, 4], default=4,
                   help="quarter turns of each meta-training class, each a class of its own (default: 4)")
    p.add_argument("--init", choices=["supervised", "random"], default="supervised",
                   help="where meta-training starts: baseline (a)'s representation and inner lr (picked on the "
                        "validation episodes of the meta-training shot), or the random initialisation and --lr "
                        "(default: supervised)")
    p.add_argument("--lr", type=common.positive_float, default=0.1,
                   help="initial inner learning rate with --init random (default: 0.1)")
    p.add_argument("--meta-steps", type=common.positive_int, help="outer steps per run (default 300)")
    p.add_argument("--meta-batch", type=common.positive_int, help="episodes per outer step (default 16)")
    p.add_argument("--meta-lr", type=positive_floats,
                   help="comma-separated candidate Adam steps on the representation (10x on log lr), one "
                        "meta-training each; the validation episodes pick (default 1e-4,3e-4,1e-3)")
    p.add_argument("--pretrain-steps", type=common.int_list,
                   help="comma-separated candidate steps (batch 128) of baseline (a)'s classification training; "
                        "one run to the largest, the validation episodes pick (default 300,600,1200,2400)")
    p.add_argument("--test-episodes", type=common.positive_int, help="test episodes per shot (default 20000)")
    p.add_argument("--val-episodes", type=common.positive_int, help="validation episodes per lr (default 200)")
    p.add_argument("--monitor-episodes", type=common.positive_int,
                   help="test-class episodes of the accuracy-vs-meta-step curve (default 150)")
    p.add_argument("--eval-every", type=common.positive_int, help="meta-steps between curve points (default 30)")
    return p


def resolve(args: argparse.Namespace) -> None:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shots = sorted(set(args.shots))
    args.pretrain_steps = sorted(set(args.pretrain_steps))
    args.meta_lr = sorted(set(args.meta_lr))
    test_classes = len(TEST_CLASSES) * len(SPLITS[args.split])  # the meta-training side has at least as many
    if args.ways > test_classes:
        raise common.UsageError(f"--ways {args.ways} is more than the {test_classes} test classes "
                                f"of --split {args.split}")
    if args.truncate >= args.steps:
        raise common.UsageError(f"--truncate must be below --steps ({args.steps}) to differ from full reverse")


class HyperRepresentation:
    """The data, the representations and the head fit shared by every method."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.drawn = args, {}
        train, val, test = [], [], []
        for name in SPLITS[args.split]:
            tr, te = load(name, "train", args.data_dir), load(name, "test", args.data_dir)
            train += class_pools(tr.x, tr.y, TRAIN_CLASSES, args.rotations)
            val += class_pools(te.x, te.y, TRAIN_CLASSES, args.rotations)
            test += class_pools(torch.cat([tr.x, te.x]), torch.cat([tr.y, te.y]), TEST_CLASSES)
        self.train, self.val, self.test = Episodes(train, "meta-training"), Episodes(val, "validation"), \
            Episodes(test, "test")
        for eps in (self.train, self.val, self.test):
            eps.check(max(args.shots) + args.queries)
        if isinstance(args.train_shots, int):  # validation picks baseline (a) at the meta-training K too
            for eps in (self.train, self.val):
                eps.check(args.train_shots + args.queries)
        # baseline (a)'s classification data: the meta-training classes, labelled 0 .. classes-1
        self.cls_x = self.train.images
        self.cls_y = torch.cat([torch.full((len(p),), i) for i, p in enumerate(self.train.pools)])
        torch.manual_seed(args.seed)
        self.net = representation(args.arch, args.hidden, args.norm)
        self.init = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        # baseline (a)'s classifier, drawn here so that every pretrain call starts from the same one
        classifier = nn.Linear(args.hidden[-1], len(self.train.pools))
        self.cls_init = {f"cls.{k}": v.detach() for k, v in classifier.named_parameters()}

    def features(self, rep: dict | None, x: torch.Tensor) -> torch.Tensor:
        """``h(x)`` for images ``x`` [..., 1, 28, 28] -> [..., d]; the raw pixels when ``rep`` is None."""
        batch_dims, flat = x.shape[:-3], x.reshape(-1, *x.shape[-3:])
        return (flat.flatten(1) if rep is None else functional_call(self.net, rep, (flat,))).reshape(*batch_dims, -1)

    def accuracy(self, rep: dict | None, lr: float, eps: Episodes, shots: int, n: int, seed: int) -> torch.Tensor:
        """Query accuracy of each of ``n`` episodes after the T-step head fit (no graph)."""
        return self.accuracies(rep, [lr], eps, shots, n, seed)[0]

    def accuracies(self, rep: dict | None, lrs: list[float], eps: Episodes, shots: int, n: int,
                   seed: int) -> list[torch.Tensor]:
        """:meth:`accuracy` at each inner lr of ``lrs``, on the same episodes. When the episodes hold more
        images than half the pools, the features of every pool image are computed once and the episodes
        index them (many episodes cost little more than the head fits); else only the drawn images'."""
        a, out = self.args, [[] for _ in lrs]
        every = n * a.ways * (shots + a.queries) > len(eps.images) // 2
        with torch.no_grad():
            feats = torch.cat([self.features(rep, x) for x in eps.images.split(8192)]) if every else None
        key = (eps.name, n, shots, seed)  # many episodes: drawn once, shared by every representation
        if every and key not in self.drawn:
            self.drawn[key] = list(eps.chunks(n, a.ways, shots, a.queries, seed))
        for si, qi in self.drawn[key] if every else eps.chunks(n, a.ways, shots, a.queries, seed):
            with torch.no_grad():
                fs, fq = (feats[si], feats[qi]) if every else (self.features(rep, eps.images[si]),
                                                               self.features(rep, eps.images[qi]))
            ys, yq = eps.labels(len(si), a.ways, shots), eps.labels(len(si), a.ways, a.queries)
            inner, _, p0, logits = head_problem(fs, ys, fq, yq, a.ways)
            for acc, lr in zip(out, lrs):
                head = unroll(inner, p0, {}, SGD(lr=lr), a.steps, graph=False).params
                acc.append((logits(head, fq).argmax(-1) == yq).to(fq.dtype).mean(-1))
        return [torch.cat(acc) for acc in out]

    def tune_lr(self, rep: dict | None, shots: int) -> tuple[float, float]:
        """The grid learning rate with the best validation accuracy (training classes, held-out images), and that accuracy."""
        accs = self.accuracies(rep, LR_GRID, self.val, shots, self.args.val_episodes, 11)
        scores = [float(acc.mean()) for acc in accs]
        best = max(range(len(LR_GRID)), key=scores.__getitem__)
        return LR_GRID[best], scores[best]

    def pretrain(self, writer) -> dict[int, dict]:
        """Baseline (a): the representation + a linear classifier over the meta-training classes, trained by
        Adam (library unroll, no graph) to the largest of ``--pretrain-steps``; the representation (classifier
        dropped) after each candidate number of steps."""
        a = self.args
        params = {**self.init, **self.cls_init}
        gen, snaps = seeded(a.seed, 5), {}
        strip = lambda p: {k: v.detach().clone() for k, v in p.items() if not k.startswith("cls.")}  # noqa: E731

        def loss(p: dict, h: dict, t: int) -> torch.Tensor:
            idx = torch.randint(0, len(self.cls_y), (128,), generator=gen)
            f = self.features({k: v for k, v in p.items() if not k.startswith("cls.")}, self.cls_x[idx])
            return cross_entropy(f @ p["cls.weight"].T + p["cls.bias"], self.cls_y[idx])

        def log(t: int, p: dict, v: float) -> None:  # p: the parameters after t steps
            writer.add_scalar("supervised/train_loss", v, t)
            if t in a.pretrain_steps:
                snaps[t] = strip(p)

        res = unroll(loss, params, {}, Adam(lr=1e-3), a.pretrain_steps[-1], graph=False, callback=log)
        snaps[a.pretrain_steps[-1]] = strip(res.params)
        return snaps

    def pick_supervised(self, snaps: dict[int, dict], shots: int) -> tuple[dict, float, dict]:
        """The (training steps, inner lr) of baseline (a) with the best validation accuracy at ``shots``."""
        scores = {t: self.tune_lr(rep, shots) for t, rep in snaps.items()}
        best = max(scores, key=lambda t: scores[t][1])
        return snaps[best], scores[best][0], {"pretrain_steps": best, "val_accuracy": {str(t): v for t, (_, v) in
                                                                                       scores.items()}}

    def hypergradient(self, rep: dict, opt, hparams: dict, groups: tuple[int, ...], per_group: int, truncate: int,
                      gen: torch.Generator) -> tuple[dict | None, float]:
        """The query loss's gradient with respect to ``hparams`` (reverse through the last ``truncate`` head
        steps) on ``per_group`` fresh episodes of each shot count of ``groups``, averaged over the groups, and
        that mean loss; ``(None, nan)`` when a head step was not finite."""
        a = self.args
        grads, loss = {k: torch.zeros_like(v) for k, v in hparams.items()}, 0.0
        for group in groups:  # one head problem per shot count; the outer loss is their mean
            xs, ys, xq, yq = self.train.sample(per_group, a.ways, group, a.queries, gen)
            inner, outer, p0, _ = head_problem(self.features(rep, xs), ys, self.features(rep, xq), yq, a.ways)
            # K = T: one segment, full reverse; K < T: only the last segment reaches the outer loss
            for seg in segments(inner, outer, p0, hparams, opt, a.steps, truncate):
                if not seg.finite:
                    return None, math.nan
                for k, g in seg.grads.items():
                    grads[k] += g / len(groups)
            loss += seg.meta_loss / len(groups)
        return grads, loss

    def meta_train(self, shots: int | tuple[int, ...], truncate: int, meta_lr: float, tag: str, writer,
                   start: dict | None = None, lr: float | None = None) -> dict:
        """Hypergradient descent (Adam) on the representation and log lr over ``shots``-shot episodes (a tuple:
        the meta-batch split evenly among those shot counts, the outer loss their mean), from
        ``start`` (default: the random initialisation) and inner lr ``lr`` (default ``--lr``). Every
        ``--eval-every`` meta-steps (step 0 included) it scores the validation episodes at each test shot and
        keeps, per test shot, the representation and lr with the best score (the meta-training length is
        chosen like the supervised baseline's training length); it also records the curve on fixed
        test-class episodes (shown, never selects)."""
        a = self.args
        rep = {k: v.clone().requires_grad_() for k, v in (self.init if start is None else start).items()}
        opt = SGD(lr=a.lr if lr is None else lr).learn(["lr"])
        hparams = {**{f"rep.{k}": v for k, v in rep.items()}, "log_lr": opt.log_lr}
        meta = torch.optim.Adam([{"params": list(rep.values()), "lr": meta_lr},
                                 {"params": [opt.log_lr], "lr": 10 * meta_lr}])
        groups = (shots,) if isinstance(shots, int) else tuple(shots)
        per_group = max(1, a.meta_batch // len(groups))
        gen, curve, val = seeded(a.seed, 20 + sum(groups)), {k: [] for k in a.shots}, {k: [] for k in a.shots}
        best: dict[int, dict] = {}
        for i in tqdm(range(a.meta_steps + 1), desc=f"{tag} meta-steps", leave=False):
            if i % a.eval_every == 0 or i == a.meta_steps:
                frozen, lr_i = {k: v.detach().clone() for k, v in rep.items()}, float(opt.hparam("lr").detach())
                for k in a.shots:  # validation selects; the test-class curve is only shown
                    val[k].append([i, float(self.accuracy(frozen, lr_i, self.val, k, a.val_episodes, 11).mean())])
                    curve[k].append([i, float(self.accuracy(frozen, lr_i, self.test, k, a.monitor_episodes, 12).mean())])
                    writer.add_scalar(f"{tag}/val_accuracy_{k}shot", val[k][-1][1], i)
                    writer.add_scalar(f"{tag}/monitor_test_accuracy_{k}shot", curve[k][-1][1], i)
                    if k not in best or val[k][-1][1] > best[k]["val_accuracy"]:
                        best[k] = {"rep": frozen, "lr": lr_i, "meta_steps": i, "val_accuracy": val[k][-1][1]}
            if i == a.meta_steps:
                break
            grads, loss = self.hypergradient(rep, opt, hparams, groups, per_group, truncate, gen)
            if grads is None:  # the learned lr overshot: halve it and draw new episodes
                with torch.no_grad():
                    opt.log_lr.sub_(math.log(2.0))
                continue
            for k, v in hparams.items():
                v.grad = grads[k]
            meta.step()
            writer.add_scalar(f"{tag}/query_loss", loss, i)
            writer.add_scalar(f"{tag}/inner_lr", float(opt.hparam("lr").detach()), i)
            writer.add_scalar(f"{tag}/hypergrad_norm", math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values())), i)
        return {"best": best, "curve": curve, "val_curve": val, "meta_lr": meta_lr}


def run(args: argparse.Namespace) -> dict:
    resolve(args)
    writer = common.start(args, NAME)
    prob = HyperRepresentation(args)
    snaps = prob.pretrain(writer)
    supervised: dict[int, tuple] = {}  # test shot -> baseline (a)'s (rep, inner lr, pick), chosen on validation
    trained: dict[tuple[int, int], list[dict]] = {}  # (train shots, K) -> one run per candidate meta lr

    def sup(k: int) -> tuple:
        if k not in supervised:
            supervised[k] = prob.pick_supervised(snaps, k)
        return supervised[k]

    def hyper(train_k: int | tuple, truncate: int, name: str) -> list[dict]:
        if (train_k, truncate) not in trained:  # mixed shots start from the pick at the largest
            start, lr = sup(max(train_k) if isinstance(train_k, tuple) else train_k)[:2] \
                if args.init == "supervised" else (None, None)
            label = "mixed" if isinstance(train_k, tuple) else train_k
            trained[train_k, truncate] = [prob.meta_train(train_k, truncate, m, f"{label}shot_{name}_mlr{m:g}",
                                                          writer, start, lr) for m in args.meta_lr]
        return trained[train_k, truncate]

    results = {}
    for k in args.shots:
        train_k = {"same": k, "mixed": tuple(args.shots)}.get(args.train_shots, args.train_shots)
        # each estimator's (meta lr, meta-steps) snapshot with the best validation accuracy at this test shot
        picked = {m: max(rs, key=lambda r: r["best"][k]["val_accuracy"]) for m, rs in
                  (("hyper_reverse", hyper(train_k, args.steps, "reverse")),
                   ("hyper_truncated", hyper(train_k, args.truncate, "truncated")))}
        sup_rep, sup_lr, sup_pick = sup(k)
        # every method's test-time inner lr is picked on the grid by the same validation episodes (the
        # meta-learned lr fits the meta-training classes; its test accuracy is reported beside)
        reps = {**{m: (r["best"][k]["rep"], prob.tune_lr(r["best"][k]["rep"], k)[0]) for m, r in picked.items()},
                "supervised": (sup_rep, sup_lr),
                **{m: (rep, prob.tune_lr(rep, k)[0]) for m, rep in (("random", prob.init), ("pixels", None))}}
        accs, learned = {}, {}
        for m, (rep, lr) in reps.items():  # the hyper-representations also at their learned lr, same episodes
            lrs = [lr, picked[m]["best"][k]["lr"]] if m in picked else [lr]
            accs[m], *learned[m] = prob.accuracies(rep, lrs, prob.test, k, args.test_episodes, 13)
        methods = {m: {**interval(acc), "inner_lr": reps[m][1]} for m, acc in accs.items()}
        methods["supervised"].update(sup_pick)
        for m, r in picked.items():
            b = r["best"][k]
            methods[m].update(meta_trained_shots=train_k, init=args.init, meta_lr=r["meta_lr"],
                              learned_inner_lr=b["lr"], with_learned_lr=interval(learned[m][0]),
                              meta_steps_picked=b["meta_steps"], val_accuracy=b["val_accuracy"],
                              val_by_meta_lr={f"{x['meta_lr']:g}": x["best"][k]["val_accuracy"]
                                              for x in trained[train_k, args.steps if m == "hyper_reverse"
                                                               else args.truncate]})
        paired = {b: interval(accs["hyper_reverse"] - accs[b]) for b in ("supervised", "random", "pixels")}
        hr = methods["hyper_reverse"]
        beats = all(hr["mean"] - hr["ci95"] > methods[b]["mean"] + methods[b]["ci95"] for b in paired)
        results[str(k)] = {"methods": methods, "paired_difference": paired, "beats_every_baseline": beats,
                           "curves": {m: r["curve"][k] for m, r in picked.items()},
                           "val_curves": {m: r["val_curve"][k] for m, r in picked.items()}}
        print(f"{args.ways}-way {k}-shot test accuracy over {args.test_episodes} episodes: " + ", ".join(
            f"{m} {v['mean']:.3f}+-{v['ci95']:.3f}" for m, v in methods.items()))
    fig = plot(results, args.shots)
    sets = " and ".join(SPLITS[args.split])
    out = {"split": {"name": args.split, "meta_train": f"{sets} classes 0-4 x {args.rotations} quarter turns, "
                     f"training images ({len(prob.train.pools)} classes)",
                     "validation": "the same classes, test images", "test": f"{sets} classes 5-9, upright, "
                     f"training and test images ({len(prob.test.pools)} classes)"},
           "arch": args.arch, "norm": args.norm, "ways": args.ways, "shots": args.shots,
           "train_shots": args.train_shots,
           "queries": args.queries, "steps": args.steps, "truncate": args.truncate, "hidden": args.hidden,
           "init": args.init, "meta_steps": args.meta_steps, "meta_batch": args.meta_batch, "meta_lr": args.meta_lr,
           "pretrain_steps": args.pretrain_steps,
           "by_shot": results}
    return common.finish(args, NAME, out, fig, writer)


def main(argv: list[str] | None = None) -> dict:
    return common.cli(NAME, build_parser, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
