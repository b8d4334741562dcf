"""Hyper-representation experiment: episodes, the exact hypergradient it uses, its --quick run and its errors."""
from __future__ import annotations

import importlib
import json
import math
import os
import sys

import pytest
import torch

from conftest import write_idx
from l2o.hypergrad import segments, unroll
from l2o.optim import SGD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def hr(monkeypatch):
    """The experiment module (and its ``common``); restores the torch thread count it sets."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    monkeypatch.delitem(sys.modules, "hyper_representation", raising=False)
    threads = torch.get_num_threads()
    yield importlib.import_module("hyper_representation")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def episode_data(tmp_path_factory) -> str:
    """Tiny MNIST-format files with enough test images per class for 5-shot validation episodes."""
    root = str(tmp_path_factory.mktemp("hr_data"))
    write_idx(os.path.join(root, "MNIST", "raw"), n_train=300, n_test=200, seed=3)
    write_idx(os.path.join(root, "FashionMNIST", "raw"), n_train=300, n_test=200, seed=4)
    return root


def test_episodes_disjoint_classes_labels_and_determinism(hr):
    x = torch.arange(12 * 28 * 28, dtype=torch.float64).reshape(12, 1, 28, 28)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 7, 7, 7])
    eps = hr.Episodes(hr.class_pools(x, y, (0, 1, 2)), "train")
    xs, ys, xq, yq = eps.sample(4, 2, 1, 2, torch.Generator().manual_seed(0))
    assert xs.shape == (4, 2, 1, 28, 28) and xq.shape == (4, 4, 1, 28, 28)
    assert ys.tolist() == [[0, 1]] * 4 and yq.tolist() == [[0, 0, 1, 1]] * 4
    cls = lambda img: int(y[(x == img).flatten(1).all(1)][0])  # noqa: E731 - the source class of an image
    for b in range(4):
        support = [cls(xs[b, i]) for i in range(2)]
        query = [cls(xq[b, i]) for i in range(4)]
        assert 7 not in support + query and support[0] != support[1]  # only the episode's own classes
        assert query == [support[0]] * 2 + [support[1]] * 2  # query labels follow the support's
        assert all((xs[b, i] != xq[b, j]).any() for i in range(2) for j in range(4))  # disjoint images
    a, b = (list(eps.chunks(5, 2, 1, 1, seed=4, chunk=2)) for _ in range(2))
    assert len(a) == 3 and all(torch.equal(u[0], v[0]) for u, v in zip(a, b))
    si, qi = next(eps.chunks(3, 2, 1, 2, seed=4))  # indices into eps.images: the episodes sample() draws
    xs, _, xq, _ = eps.sample(3, 2, 1, 2, torch.Generator().manual_seed(4))
    assert torch.equal(eps.images[si], xs) and torch.equal(eps.images[qi], xq) and si.shape == (3, 2)
    rot = hr.class_pools(x, y, (0,), rotations=4)
    assert len(rot) == 4 and torch.equal(rot[1][0, 0], torch.rot90(x[0, 0], 1))
    with pytest.raises(hr.common.UsageError, match="need 4 images per class"):
        eps.check(4)


@pytest.mark.parametrize("arch, hidden, dim", [("mlp", [7, 3], 3), ("conv", [4, 6], 6)])
def test_representation_maps_images_to_features(hr, arch, hidden, dim):
    net = hr.representation(arch, hidden)
    x = torch.randn(2, 1, 28, 28)
    assert net(x).shape == (2, dim)
    unit = hr.representation(arch, hidden, norm=True)
    unit.load_state_dict(net.state_dict())  # the same weights; only the unit length differs
    f, u = net(x), unit(x)
    nz = f.norm(dim=-1) > 1e-3  # a ReLU output can be all zero: it stays zero
    assert torch.allclose(u[nz], (f / f.norm(dim=-1, keepdim=True))[nz], atol=1e-6)
    assert torch.allclose(u[nz].norm(dim=-1), torch.ones(int(nz.sum()))) and torch.equal(u[~nz], f[~nz])


def test_head_problem_gives_each_episode_its_own_head(hr):
    g = torch.Generator().manual_seed(0)
    fs, fq = torch.randn(3, 4, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    ys, yq = torch.tensor([0, 0, 1, 1]).expand(3, -1), torch.tensor([0, 1, 1, 0, 0, 1]).expand(3, -1)
    inner, outer, p0, logits = hr.head_problem(fs, ys, fq, yq, 2)
    both = unroll(inner, p0, {}, SGD(lr=0.3), 4, graph=False).params
    for b in range(3):  # episode b alone gives the same head as inside the stack
        i1, _, q0, _ = hr.head_problem(fs[b:b + 1], ys[b:b + 1], fq[b:b + 1], yq[b:b + 1], 2)
        one = unroll(i1, q0, {}, SGD(lr=0.3), 4, graph=False).params
        assert torch.allclose(one["W"][0], both["W"][b], atol=1e-12) and torch.allclose(one["b"][0], both["b"][b])
    assert float(outer(p0, {})) == pytest.approx(math.log(2))  # zero head: uniform over 2 classes


def _problem(hr, net, params, x_s, ys, x_q, yq):
    from torch.func import functional_call

    feat = lambda x: functional_call(net, params, (x.flatten(0, 1),)).reshape(*x.shape[:2], -1)  # noqa: E731
    inner, outer, p0, _ = hr.head_problem(feat(x_s), ys, feat(x_q), yq, 3)
    return inner, outer, p0


def test_reverse_hypergradient_matches_finite_differences(hr):
    """d query loss / d (representation, log lr) through T head steps, float64, as the experiment wires it."""
    torch.manual_seed(0)
    net = hr.representation("mlp", [6, 4])
    g = torch.Generator().manual_seed(1)
    x_s, x_q = torch.randn(2, 6, 1, 28, 28, generator=g), torch.randn(2, 9, 1, 28, 28, generator=g)
    ys, yq = torch.arange(3).repeat_interleave(2).expand(2, -1), torch.arange(3).repeat_interleave(3).expand(2, -1)
    rep = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    opt = SGD(lr=0.5).learn(["lr"])
    hparams = {**rep, "log_lr": opt.log_lr}
    steps = 4
    inner, outer, p0 = _problem(hr, net, rep, x_s, ys, x_q, yq)
    (seg,) = list(segments(inner, outer, p0, hparams, opt, steps, steps))

    def value(rep_: dict, log_lr: float) -> float:
        i, o, q0 = _problem(hr, net, rep_, x_s, ys, x_q, yq)
        return float(o(unroll(i, q0, {}, SGD(lr=math.exp(log_lr)), steps, graph=False).params, {}))

    eps, base, ll = 1e-6, {k: v.detach() for k, v in rep.items()}, float(opt.log_lr.detach())
    assert set(rep) == {"1.weight", "1.bias", "3.weight", "3.bias"}  # Flatten, Linear, ReLU, Linear, ReLU
    for key, idx in (("1.weight", (1, 300)), ("1.bias", (0,)), ("3.weight", (2, 1)), ("3.bias", (3,))):
        plus, minus = ({k: v.clone() for k, v in base.items()} for _ in range(2))
        plus[key][idx] += eps
        minus[key][idx] -= eps
        fd = (value(plus, ll) - value(minus, ll)) / (2 * eps)
        assert seg.grads[key][idx].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    ll = float(opt.log_lr.detach())
    fd = (value(base, ll + eps) - value(base, ll - eps)) / (2 * eps)
    assert seg.grads["log_lr"].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert seg.meta_loss == pytest.approx(value(base, ll), rel=1e-12)
    # truncated reverse through the last step only is a different (biased) estimate
    inner, outer, p0 = _problem(hr, net, rep, x_s, ys, x_q, yq)
    segs = list(segments(inner, outer, p0, hparams, opt, steps, 1))
    assert len(segs) == steps and all(float(g.abs().sum()) == 0 for s in segs[:-1] for g in s.grads.values())
    trunc = segs[-1].grads  # only the last segment reaches the outer loss
    assert not torch.allclose(trunc["log_lr"], seg.grads["log_lr"], rtol=1e-3)


class _NoWriter:
    def add_scalar(self, *args) -> None:
        pass


def test_supervised_snapshots_are_the_shorter_runs(hr, episode_data):
    """pretrain's representation after t steps of one long run equals a run of t steps; the classifier is dropped."""
    args = hr.build_parser().parse_args(["--quick", "--data-dir", episode_data, "--pretrain-steps", "4,2,1"])
    hr.resolve(args)
    prob = hr.HyperRepresentation(args)
    snaps = prob.pretrain(_NoWriter())
    assert sorted(snaps) == [1, 2, 4] and set(snaps[4]) == set(prob.init)
    args.pretrain_steps = [2]
    (short,) = prob.pretrain(_NoWriter()).values()
    assert all(torch.equal(short[k], snaps[2][k]) for k in short)
    assert not torch.equal(snaps[1]["1.weight"], snaps[2]["1.weight"])
    assert not torch.equal(snaps[2]["1.weight"], snaps[4]["1.weight"])
    rep, lr, pick = prob.pick_supervised(snaps, 1)
    assert pick["pretrain_steps"] in (1, 2, 4) and rep is snaps[pick["pretrain_steps"]] and lr in hr.LR_GRID
    assert pick["val_accuracy"][str(pick["pretrain_steps"])] == max(pick["val_accuracy"].values())


def test_interval(hr):
    r = hr.interval(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert r["mean"] == 0.5 and r["n"] == 4
    assert r["ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)


def test_quick_run_writes_outputs(hr, episode_data, tmp_path):
    out = str(tmp_path / "out")
    result = hr.main(["--quick", "--data-dir", episode_data, "--out", out, "--seed", "1"])
    assert os.path.isfile(os.path.join(out, "hyper_representation.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    with open(os.path.join(out, "results.json")) as fh:
        saved = json.load(fh)
    assert saved == json.loads(json.dumps(result)) and "--quick" in saved["command"]
    assert saved["shots"] == [1, 5] and set(saved["by_shot"]) == {"1", "5"} and saved["train_shots"] == 5
    assert saved["norm"] is False
    methods = {"hyper_reverse", "hyper_truncated", "supervised", "random", "pixels"}
    for shot in ("1", "5"):
        r = saved["by_shot"][shot]
        assert set(r["methods"]) == methods and set(r["paired_difference"]) == {"supervised", "random", "pixels"}
        for m in r["methods"].values():
            assert 0.0 <= m["mean"] <= 1.0 and m["ci95"] >= 0 and m["n"] == 12 and m["inner_lr"] > 0
        sup = r["methods"]["supervised"]
        assert sup["pretrain_steps"] in (2, 4)
        for c in list(r["curves"].values()) + list(r["val_curves"].values()):
            assert [p[0] for p in c] == [0, 2, 4] and all(0.0 <= p[1] <= 1.0 for p in c)
        assert r["curves"]["hyper_reverse"][0] == r["curves"]["hyper_truncated"][0]  # same start, same episodes
        for m in ("hyper_reverse", "hyper_truncated"):
            h = r["methods"][m]
            assert h["meta_trained_shots"] == 5 and h["init"] == "supervised" and h["meta_lr"] in (1e-3, 1e-2)
            assert set(h["val_by_meta_lr"]) == {"0.001", "0.01"}
            # test-time inner lr: picked on the grid like the baselines'; the learned one is reported beside
            assert h["inner_lr"] in hr.LR_GRID and h["learned_inner_lr"] > 0
            assert h["with_learned_lr"]["n"] == 12 and 0.0 <= h["with_learned_lr"]["mean"] <= 1.0
            # the picked (meta lr, meta-step) is the best validation point of the runs, on the drawn curve
            assert h["val_accuracy"] == max(h["val_by_meta_lr"].values())
            assert [h["meta_steps_picked"], h["val_accuracy"]] in r["val_curves"][m]
            assert h["val_accuracy"] == max(p[1] for p in r["val_curves"][m])
        assert r["methods"]["random"]["inner_lr"] in hr.LR_GRID
        assert isinstance(r["beats_every_baseline"], bool)
    # meta-training starts from baseline (a)'s pick at the meta-training shot (5): its validation score is step 0
    five = saved["by_shot"]["5"]
    assert five["val_curves"]["hyper_reverse"][0][1] == pytest.approx(five["methods"]["supervised"]["val_accuracy"][
        str(five["methods"]["supervised"]["pretrain_steps"])])


def test_quick_run_meta_trains_one_representation_per_shot(hr, episode_data, tmp_path):
    result = hr.main(["--quick", "--data-dir", episode_data, "--out", str(tmp_path), "--train-shots", "same",
                      "--init", "random", "--meta-lr", "0.01"])
    one, five = (result["by_shot"][k]["methods"]["hyper_reverse"] for k in ("1", "5"))
    assert result["train_shots"] == "same" and one["meta_trained_shots"] == 1 and five["meta_trained_shots"] == 5
    assert one["init"] == "random" and one["meta_lr"] == five["meta_lr"] == 0.01 and result["meta_lr"] == [0.01]
    c1, c5 = (result["by_shot"][k]["curves"]["hyper_reverse"] for k in ("1", "5"))
    assert c1[-1] != c5[-1]  # two meta-trainings, each on its own shot count, from the same random start
    assert result["by_shot"]["1"]["curves"]["hyper_reverse"][0] == result["by_shot"]["1"]["curves"][
        "hyper_truncated"][0]


def test_many_episodes_index_features_computed_once(hr, episode_data):
    """Enough episodes switch to features of every pool image, indexed by the episodes: the same accuracies
    as computing each drawn image's features (the first episodes of a longer draw are the shorter draw)."""
    args = hr.build_parser().parse_args(["--quick", "--data-dir", episode_data])
    hr.resolve(args)
    prob = hr.HyperRepresentation(args)
    per_episode = args.ways * (1 + args.queries)
    few = len(prob.test.images) // 2 // per_episode  # at most half the images: each drawn image's features
    many = 3 * few  # more than half: every image's features once
    for rep in (prob.init, None):
        short, = prob.accuracies(rep, [0.3], prob.test, 1, few, 5)
        long, = prob.accuracies(rep, [0.3], prob.test, 1, many, 5)
        assert len(long) == many and torch.allclose(long[:few], short)
    assert (prob.test.name, many, 1, 5) in prob.drawn and (prob.test.name, few, 1, 5) not in prob.drawn


def test_mixed_meta_batch_averages_the_shots_hypergradients(hr, episode_data):
    """--train-shots mixed: the hypergradient is that of the mean of each shot's query loss, each on its own
    share of the meta-batch, float64 against autograd through the unrolled head steps."""
    args = hr.build_parser().parse_args(["--quick", "--data-dir", episode_data])
    hr.resolve(args)
    prob = hr.HyperRepresentation(args)
    prob.net.double()
    prob.train = hr.Episodes([p.double() for p in prob.train.pools], "meta-training")
    rep = {k: v.double().requires_grad_() for k, v in prob.init.items()}
    opt = SGD(lr=0.3).learn(["lr"])
    hparams = {**rep, "log_lr": opt.log_lr}
    grads, loss = prob.hypergradient(rep, opt, hparams, (1, 5), 2, args.steps, torch.Generator().manual_seed(7))
    gen, total = torch.Generator().manual_seed(7), 0.0  # by hand: the same draws, one shot after the other
    for k in (1, 5):
        xs, ys, xq, yq = prob.train.sample(2, args.ways, k, args.queries, gen)
        inner, outer, p0, _ = hr.head_problem(prob.features(rep, xs), ys, prob.features(rep, xq), yq, args.ways)
        total = total + outer(unroll(inner, p0, {}, opt, args.steps, graph=True).params, {}) / 2
    expect = torch.autograd.grad(total, list(hparams.values()))
    assert loss == pytest.approx(float(total.detach()), rel=1e-12)
    for (k, g), e in zip(grads.items(), expect):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12), k
    one, _ = prob.hypergradient(rep, opt, hparams, (5,), 2, args.steps, torch.Generator().manual_seed(7))
    assert not torch.allclose(one["log_lr"], grads["log_lr"])  # the 1-shot half counts


def test_quick_run_mixed_meta_trains_one_representation_for_both_shots(hr, episode_data, tmp_path):
    result = hr.main(["--quick", "--data-dir", episode_data, "--out", str(tmp_path), "--train-shots", "mixed"])
    one, five = (result["by_shot"][k] for k in ("1", "5"))
    assert result["train_shots"] == "mixed"
    assert one["methods"]["hyper_reverse"]["meta_trained_shots"] == [1, 5]
    assert five["methods"]["hyper_reverse"]["meta_trained_shots"] == [1, 5]
    assert [p[0] for p in one["val_curves"]["hyper_reverse"]] == [0, 2, 4]


def test_meta_training_from_supervised_starts_at_its_representation(hr, episode_data):
    """--init supervised: step 0 of meta-training is baseline (a)'s representation and inner lr (left unchanged);
    each test shot's pick is the best validation point of the run."""
    args = hr.build_parser().parse_args(["--quick", "--data-dir", episode_data, "--meta-steps", "2"])
    hr.resolve(args)
    prob = hr.HyperRepresentation(args)
    rep, lr, _ = prob.pick_supervised(prob.pretrain(_NoWriter()), 5)
    both = prob.accuracies(rep, [lr, 3 * lr], prob.test, 5, 7, 12)  # features once, the same as one lr at a time
    assert all(torch.equal(b, prob.accuracy(rep, x, prob.test, 5, 7, 12)) for b, x in zip(both, [lr, 3 * lr]))
    kept = {k: v.clone() for k, v in rep.items()}
    run = prob.meta_train(5, args.steps, 1e-2, "t", _NoWriter(), rep, lr)
    assert all(torch.equal(kept[k], rep[k]) for k in rep)  # the baseline's representation is not touched
    for k in (1, 5):
        val0 = float(prob.accuracy(rep, lr, prob.val, k, args.val_episodes, 11).mean())
        test0 = float(prob.accuracy(rep, lr, prob.test, k, args.monitor_episodes, 12).mean())
        assert run["val_curve"][k][0] == [0, val0] and run["curve"][k][0] == [0, test0]
        best = run["best"][k]
        assert [p[0] for p in run["val_curve"][k]] == [0, 2]
        assert best["val_accuracy"] == max(p[1] for p in run["val_curve"][k])
        assert [best["meta_steps"], best["val_accuracy"]] in run["val_curve"][k]
    moved = run["best"][5] if run["best"][5]["meta_steps"] == 2 else None
    if moved is not None:  # a later pick is a meta-trained representation, not the start
        assert not torch.equal(moved["rep"]["1.weight"], rep["1.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--truncate", "5", "--steps", "5"], "--truncate must be below"),
    (["--queries", "500"], "images per class"),
    (["--ways", "11"], "--ways 11 is more than the 10 test classes"),
    (["--ways", "6", "--split", "digits"], "--ways 6 is more than the 5 test classes"),
    (["--shots", "1,x"], "comma-separated"),
    (["--train-shots", "0"], "--train-shots"),
    (["--train-shots", "400"], "meta-training episodes need 402 images"),
    # validation also runs at the meta-training K (baseline (a)'s pick): a stack error after the pretraining
    (["--shots", "1", "--train-shots", "15"], "validation episodes need 17 images per class"),
    (["--meta-lr", "1e-3,-1"], "--meta-lr: expected comma-separated positive numbers"),
    (["--init", "pretrained"], "--init: invalid choice"),
])
def test_bad_input_exits_2_with_one_line(hr, episode_data, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        hr.main(["--quick", "--data-dir", episode_data, "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hyper_representation.py: error:" in err[0] and message in err[0]
