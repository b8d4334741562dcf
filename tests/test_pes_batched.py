"""PES / ES particles run as one batch give the estimates of the particles run one after another.

Float64: the same perturbation generator must give the same estimate to ~1e-12 on the
MNIST MLP task (the real ``MLPTask`` on tiny data, its minibatch stream drawn once per
step) and on the quadratic, for the LSTM's weights and for SGD's learning rate, over
several truncations and update chunks. Where batching cannot reproduce the sequential
semantics (a particle going non-finite, a loss that draws global randomness or does
not vmap), the sequential path runs and the result is bitwise the sequential one.
"""
from __future__ import annotations

import math

import pytest
import torch

import l2o
from l2o.hypergrad import ES, PES, Problem, pes
from l2o.tasks import BatchStream, seeded


def _mlp_problem(tiny_data, opt):
    task = l2o.tasks.get("mnist_mlp", data_dir=tiny_data, hidden=4, batch_size=8)
    params = task.init(seeded(0, 0))
    stream = BatchStream(task, "train", seeded(0, 1), keep=8)
    val = task.batch("test", seeded(0, 3))
    return (lambda p, h, t: task.loss(p, stream[t])), (lambda p, h: task.loss(p, val)), params


def _quadratic_problem(opt):
    task = l2o.tasks.get("quadratic", dim=6).sample(seeded(1, 0))
    params = task.init(seeded(1, 0))
    batch = task.batch("train", None)
    return (lambda p, h, t: task.loss(p, batch)), None, params


def _optimizer(kind: str):
    if kind == "lstm":
        torch.manual_seed(0)
        opt = l2o.optim.LSTMOptimizer(hidden=3, inputs="rich", readout="dir_mag", init_scale=0.1)
        return opt, {n: p for n, p in opt.named_parameters()}
    opt = l2o.optim.SGD(lr=0.05)
    return opt, {"log_lr": opt.log_lr}


def _estimates(make_problem, kind, batched, cls=PES, steps=6, every=3, truncate=2):
    """Every chunk's (grads, metrics) for one run, and the estimator (to see which path it took)."""
    opt, meta = _optimizer(kind)
    inner, outer, params = make_problem(opt)
    problem = Problem(inner, outer, params, opt, steps, [1.0 / steps] * steps)
    est = cls(particles=3, sigma=1e-2, truncate=truncate, every=every, batched=batched)
    state = est.init(problem, meta, torch.Generator().manual_seed(7))
    out = []
    while not est.done(state):
        g, m, state = est.estimate(meta, state)
        out.append(({k: v.clone() for k, v in g.items()}, m))
    return out, est, state


@pytest.mark.parametrize("cls", [PES, ES])
@pytest.mark.parametrize("kind", ["lstm", "sgd_lr"])
@pytest.mark.parametrize("task", ["mlp", "quadratic"])
def test_batched_equals_sequential(tiny_data, task, kind, cls):
    make = (lambda opt: _mlp_problem(tiny_data, opt)) if task == "mlp" else _quadratic_problem
    seq, est_s, _ = _estimates(make, kind, False, cls)
    bat, est_b, state_b = _estimates(make, kind, True, cls)
    assert getattr(est_b, "_unbatchable", None) is None and "_stacked" in state_b.extra  # it did batch
    assert len(seq) == len(bat) == 2
    worst = 0.0
    for (g_s, m_s), (g_b, m_b) in zip(seq, bat):
        assert m_s["finite"] == m_b["finite"] == 1.0
        assert m_b["meta_loss"] == pytest.approx(m_s["meta_loss"], rel=1e-12, abs=1e-14)
        scale = max(float(g.abs().max()) for g in g_s.values())
        assert scale > 0
        for k in g_s:
            worst = max(worst, float((g_s[k] - g_b[k]).abs().max()) / scale)
    print(f"{task} {kind} {cls.name}: largest difference {worst:.2e} of the largest entry")
    assert worst < 1e-12


def _quartic(lr: float, steps: int = 16):
    h = {"lr": torch.tensor(lr, requires_grad=True)}
    opt = l2o.optim.SGD(lr=h["lr"])
    params = {"w": torch.tensor([1.0, 0.9])}
    return h, Problem(lambda p, h_, t: (p["w"] ** 4).sum(), None, params, opt, steps, [1.0] * steps)


def test_a_non_finite_particle_is_treated_exactly_as_sequentially():
    """Some particles blow up in the first truncation: the chunk is given up, and the particles before
    the first one to blow up stand advanced, the others where they started, bitwise as sequentially."""
    runs = {}
    for batched in (False, True):
        h, problem = _quartic(0.3)
        est = PES(particles=6, sigma=0.2, truncate=8, batched=batched)
        gen = torch.Generator().manual_seed(2)  # particles 0-6 stay finite, particle 7 does not
        state = est.init(problem, h, gen)
        g, m, state = est.estimate(h, state)
        runs[batched] = (g, m, state, gen.get_state())
    (g0, m0, s0, r0), (g1, m1, s1, r1) = runs[False], runs[True]
    assert m0["finite"] == m1["finite"] == 0.0 and math.isnan(m0["meta_loss"]) and math.isnan(m1["meta_loss"])
    assert torch.equal(g0["lr"], g1["lr"]) and torch.equal(r0, r1) and s0.t == s1.t == 16
    parts0, parts1 = s0.extra["particles"], s1.extra["particles"]
    assert [p is None for p in parts0] == [p is None for p in parts1]
    assert any(p is None for p in parts0) and parts0[0] is not None  # some advanced, some did not
    for a, b in zip(parts0, parts1):
        if a is not None:
            assert torch.equal(a[0]["w"], b[0]["w"])
    assert torch.equal(s0.extra["accum"]["lr"], s1.extra["accum"]["lr"])
    assert runs[True][2] is s1 and getattr(PES, "_unbatchable", None) is None


def test_functional_pes_still_refuses_a_non_finite_run():
    h, problem = _quartic(1e3, 20)
    with pytest.raises(FloatingPointError, match="non-finite"):
        pes(problem.inner_loss, None, problem.params, h, problem.opt, 20, meta_weights=[1.0] * 20)


@pytest.mark.parametrize("why", ["global_randomness", "not_vmappable"])
def test_losses_batching_cannot_reproduce_run_sequentially(why):
    """A loss drawing from the global generator (dropout-like) or calling ``.item()``: the result is
    bitwise the sequential one, global random state included."""
    x = torch.linspace(-1.0, 1.0, 5)

    def inner(p, h_, t):
        if why == "global_randomness":
            return ((p["w"] * x + 0.1 * torch.randn(5)) ** 2).mean()
        scale = 1.0 + 0.0 * p["w"].sum().item()  # a Python number from the tensor: no vmap
        return scale * ((p["w"] * x - 1.0) ** 2).mean()

    out = {}
    for batched in (False, True):
        torch.manual_seed(5)
        h = {"lr": torch.tensor(0.1, requires_grad=True)}
        est = PES(particles=2, sigma=1e-2, truncate=2, batched=batched)
        problem = Problem(inner, None, {"w": torch.tensor(0.3)}, l2o.optim.SGD(lr=h["lr"]), 4, [1.0] * 4)
        state = est.init(problem, h, torch.Generator().manual_seed(0))
        g, m, state = est.estimate(h, state)
        out[batched] = (g["lr"], m["meta_loss"], torch.get_rng_state(), est)
    assert torch.equal(out[False][0], out[True][0]) and out[False][1] == out[True][1]
    assert torch.equal(out[False][2], out[True][2])
    if why == "not_vmappable":
        assert "item" in out[True][3]._unbatchable or "vmap" in out[True][3]._unbatchable


def test_default_batches_small_particles_and_runs_large_ones_sequentially():
    """``batched=None`` decides by the particles' number and total state, so a resumed run decides alike."""
    from l2o.hypergrad.pes import BATCH_FLOATS

    def decided(dim: int, opt, pairs: int = 4) -> bool:
        meta = {n: p for n, p in opt.named_parameters()}
        problem = Problem(lambda p, h, t: (p["x"] ** 2).sum(), None, {"x": torch.ones(dim)}, opt, 2, [1.0, 1.0])
        est = PES(particles=pairs, sigma=1e-3)
        state = est.init(problem, meta)
        return est._batch(state)

    lstm = l2o.optim.LSTMOptimizer(hidden=20)  # 81 floats per coordinate: h, c of two layers, and the parameter
    assert decided(10, lstm) and not decided(BATCH_FLOATS // (8 * 81) + 1, lstm)
    assert decided(BATCH_FLOATS // (8 * 81), lstm)
    assert not decided(10, lstm, pairs=1)  # one pair: vmap costs more than it saves
