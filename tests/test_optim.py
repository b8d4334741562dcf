"""Differentiable optimizers: torch.optim trajectories, parametrisation, finiteness, the LSTM optimizer."""
from __future__ import annotations

import math

import pytest
import torch

import l2o
from l2o.optim import preprocess

STEPS = 25


def _problem():
    """A small non-quadratic loss over two tensors (so cross-tensor bookkeeping is exercised)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=gen)
    y = torch.randn(6, generator=gen)
    params = {"w": torch.randn(4, generator=gen), "m": torch.randn(2, 3, generator=gen)}

    def loss(p):
        r = A @ p["w"] - y
        return (r * r).mean() + 0.1 * (p["w"] ** 4).sum() + (torch.tanh(p["m"]) ** 2).sum() + (p["m"].sum() - 1) ** 2

    return loss, params


def _ours(opt, loss, params, steps=STEPS):
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    traj = []
    for _ in range(steps):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
        with torch.no_grad():
            params, state = opt.step(p, grads, state)
        traj.append({k: v.clone() for k, v in params.items()})
    return traj


def _torch(make, loss, params, steps=STEPS):
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    topt = make(list(p.values()))
    traj = []
    for _ in range(steps):
        topt.zero_grad()
        loss(p).backward()
        topt.step()
        traj.append({k: v.detach().clone() for k, v in p.items()})
    return traj


@pytest.mark.parametrize("ours,theirs", [
    (lambda: l2o.optim.SGD(lr=0.05), lambda ps: torch.optim.SGD(ps, lr=0.05)),
    (lambda: l2o.optim.Momentum(lr=0.03, momentum=0.8), lambda ps: torch.optim.SGD(ps, lr=0.03, momentum=0.8)),
    (lambda: l2o.optim.Momentum(lr=0.03, momentum=0.8, nesterov=True),
     lambda ps: torch.optim.SGD(ps, lr=0.03, momentum=0.8, nesterov=True)),
    (lambda: l2o.optim.Adam(lr=0.02, beta1=0.85, beta2=0.99, eps=1e-6),
     lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.85, 0.99), eps=1e-6)),
    (lambda: l2o.optim.RMSprop(lr=0.01, alpha=0.95, eps=1e-7),
     lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.95, eps=1e-7)),
], ids=["sgd", "heavy_ball", "nesterov", "adam", "rmsprop"])
def test_handcrafted_follow_torch_optim(ours, theirs):
    loss, params = _problem()
    a, b = _ours(ours(), loss, params), _torch(theirs, loss, params)
    moved = max(float((a[-1][k] - params[k]).abs().max()) for k in params)
    assert moved > 1e-2  # the trajectory goes somewhere, so agreeing is not trivial
    for t, (pa, pb) in enumerate(zip(a, b)):
        for k in params:
            torch.testing.assert_close(pa[k], pb[k], rtol=1e-12, atol=1e-12, msg=f"step {t} {k}")


def test_momentum_inv_decay_follows_reference():
    loss, params = _problem()
    lr, mu, decay, T0 = 0.04, 0.7, 0.6, 5.0
    ours = _ours(l2o.optim.MomentumInvDecay(lr=lr, momentum=mu, decay=decay, T0=T0), loss, params)
    # hand-written: b <- mu b + g ; p <- p - lr (1 + t/T0)^-decay b, t = 0, 1, ...
    p = {k: v.clone() for k, v in params.items()}
    b = {k: torch.zeros_like(v) for k, v in p.items()}
    for t in range(STEPS):
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        g = dict(zip(q, torch.autograd.grad(loss(q), list(q.values()))))
        lr_t = lr * (1.0 + t / T0) ** (-decay)
        b = {k: mu * b[k] + g[k] for k in p}
        p = {k: p[k] - lr_t * b[k] for k in p}
        for k in p:
            torch.testing.assert_close(ours[t][k], p[k], rtol=1e-12, atol=1e-12)
    # decay = 0 is plain heavy ball
    plain = _ours(l2o.optim.MomentumInvDecay(lr=lr, momentum=mu, decay=0.0, T0=T0), loss, params, 5)
    ref = _torch(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mu), loss, params, 5)
    torch.testing.assert_close(plain[-1]["w"], ref[-1]["w"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda lr: l2o.optim.Adam(lr=lr), lambda lr: l2o.optim.RMSprop(lr=lr)],
                         ids=["adam", "rmsprop"])
def test_adaptive_second_derivatives_finite_at_zero_gradient(make):
    # x[2] starts at 0, where its gradient 2 x2 (1 + x0^2) is exactly 0, so it never moves and its
    # second moment stays 0; the Hessian still couples it to x[0], so a sqrt'(0) = inf in the
    # backward pass would reach the learning rate as NaN
    c = torch.tensor([0.5, -1.0])

    def inner(p, h, t):
        x = p["x"]
        return ((x[:2] - c) ** 2).sum() + 0.1 * (x[:2] ** 4).sum() + x[2] ** 2 * (1.0 + x[0] ** 2)

    outer = lambda p, h: ((p["x"] - 0.3) ** 2).sum()
    lr = torch.tensor(0.05, requires_grad=True)
    x0 = torch.tensor([1.0, 2.0, 0.0])
    g = l2o.hypergrad.reverse(inner, outer, {"x": x0}, {"lr": lr}, make(lr), steps=6)["lr"]
    assert torch.isfinite(g) and abs(float(g)) > 1e-3

    def objective(v):
        res = l2o.hypergrad.unroll(inner, {"x": x0}, {}, make(torch.tensor(v)), 6, graph=False)
        return float(outer(res.params, {}))

    h = 1e-6
    fd = (objective(0.05 + h) - objective(0.05 - h)) / (2 * h)
    assert abs(float(g) - fd) < 1e-6 * abs(fd)
    # the raw step's double derivative at g = 0 is finite as well (a plain sqrt gives NaN here)
    opt = make(0.1)
    p = {"x": torch.zeros(2)}
    gr = torch.zeros(2, requires_grad=True)
    new, _ = opt.step(p, {"x": gr}, opt.init(p))
    (d1,) = torch.autograd.grad(new["x"].sum(), gr, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), gr)
    assert torch.isfinite(d1).all() and torch.isfinite(d2).all()


def test_safe_sqrt_values_and_gradient():
    x = torch.tensor([0.0, 4.0, 1e-30], requires_grad=True)
    y = l2o.optim.safe_sqrt(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 2.0, 1e-15]), rtol=1e-14, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g[0] == 0 and math.isclose(float(g[1]), 0.25)


# ----------------------------------------------------------------------------- hyperparameters
def test_numbers_become_unconstrained_parameters():
    sgd = l2o.optim.SGD(lr=0.1)
    assert dict(sgd.named_parameters()).keys() == {"log_lr"}
    assert math.isclose(float(sgd.log_lr.detach()), math.log(0.1), rel_tol=1e-15)
    mom = l2o.optim.Momentum(lr=0.2, momentum=0.9)
    assert dict(mom.named_parameters()).keys() == {"log_lr", "logit_momentum"}
    assert math.isclose(float(mom.logit_momentum.detach()), math.log(0.9 / 0.1), rel_tol=1e-14)
    assert math.isclose(float(mom.hparam("momentum").detach()), 0.9, rel_tol=1e-14)
    adam = l2o.optim.Adam(lr=1e-3, beta1=0.9, beta2=0.999)
    assert dict(adam.named_parameters()).keys() == {"log_lr", "logit_beta1", "logit_beta2"}
    decay = l2o.optim.MomentumInvDecay(lr=0.1, momentum=0.5, decay=-0.25)
    assert float(decay.decay.detach()) == -0.25  # "real" hyperparameters are stored as is
    assert decay.hparams() == pytest.approx({"lr": 0.1, "momentum": 0.5, "decay": -0.25}, rel=1e-14)
    # a gradient on the unconstrained parameter is the chain rule through exp / sigmoid
    p, g = {"x": torch.tensor([1.0])}, {"x": torch.tensor([2.0])}
    new, _ = mom.step(p, g, mom.init(p))
    d_log_lr, d_logit = torch.autograd.grad(new["x"].sum(), [mom.log_lr, mom.logit_momentum])
    torch.testing.assert_close(d_log_lr, torch.tensor(-0.2 * 2.0), rtol=1e-14, atol=0)
    torch.testing.assert_close(d_logit, torch.tensor(0.0), rtol=0, atol=0)  # buffer is 0 at step 0


def test_tensor_hyperparameters_used_as_given():
    lr = torch.tensor(0.3, requires_grad=True)
    sgd = l2o.optim.SGD(lr=lr)
    assert list(sgd.parameters()) == [] and sgd.hparam("lr") is lr
    p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    g = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0])}
    new, _ = sgd.step(p, g, sgd.init(p))
    (new["a"].sum() + new["b"].sum()).backward()
    torch.testing.assert_close(lr.grad, torch.tensor(-(0.5 - 1.0 + 2.0)), rtol=0, atol=0)
    # a dict gives one (tensor) hyperparameter per parameter tensor
    per = {"a": torch.tensor([0.1, 0.2], requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    mom = l2o.optim.Momentum(lr=per, momentum=torch.tensor(0.5))
    new, state = mom.step(p, g, mom.init(p))
    torch.testing.assert_close(new["a"], torch.tensor([1.0 - 0.1 * 0.5, 2.0 + 0.2 * 1.0]), rtol=1e-15, atol=0)
    new["a"].sum().backward()
    torch.testing.assert_close(per["a"].grad, -g["a"], rtol=0, atol=0)
    assert per["b"].grad is None


def test_learn_selects_and_bad_values_raise():
    adam = l2o.optim.Adam(lr=0.01).learn(["lr"])
    assert adam.log_lr.requires_grad and not adam.logit_beta1.requires_grad and not adam.logit_beta2.requires_grad
    adam.learn(None)
    assert all(p.requires_grad for p in adam.parameters())
    with pytest.raises(ValueError, match="no hyperparameter 'momentum'.*lr"):
        adam.learn(["momentum"])
    for bad in (lambda: l2o.optim.SGD(lr=0.0), lambda: l2o.optim.SGD(lr=-1.0),
                lambda: l2o.optim.Momentum(momentum=1.0), lambda: l2o.optim.Momentum(momentum=0.0),
                lambda: l2o.optim.Adam(beta2=1.5), lambda: l2o.optim.MomentumInvDecay(T0=0),
                lambda: l2o.optim.LSTMOptimizer(inputs="fancy"), lambda: l2o.optim.LSTMOptimizer(hidden=0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="unknown optimizer"):
        l2o.optim.make("adagrad")


def test_config_rebuilds_optimizer():
    opt = l2o.optim.make("nesterov", lr=0.2, momentum=0.6)
    again = l2o.optim.from_config(opt.config())
    again.load_state_dict(opt.state_dict())
    assert again.nesterov and again.hparams() == pytest.approx(opt.hparams(), rel=1e-14)


# ----------------------------------------------------------------------------- the LSTM optimizer
def _multi():
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen),
              "c": torch.randn((), generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("inputs", ["paper", "plain", "rich"])
def test_lstm_step_shapes_small_update_and_gradient(inputs):
    torch.manual_seed(0)
    opt = l2o.optim.LSTMOptimizer(hidden=6, layers=2, inputs=inputs)
    params, grads = _multi()
    state = opt.init(params)
    assert [h.shape for h in state["h"]] == [(18, 6), (18, 6)]
    p1, s1 = opt.step(params, grads, state)
    assert {k: v.shape for k, v in p1.items()} == {k: v.shape for k, v in params.items()}
    assert s1["step"] == 1 and all(h.shape == (18, 6) for h in s1["h"] + s1["c"])
    upd = torch.cat([(p1[k] - params[k]).reshape(-1) for k in params])
    assert 0 < float(upd.detach().abs().max()) < 1e-3  # near-zero initial output layer
    p2, _ = opt.step(p1, grads, s1)
    # the second update depends on the LSTM weights through both steps
    gs = torch.autograd.grad(sum(v.sum() for v in p2.values()), list(opt.parameters()))
    assert all(torch.isfinite(g).all() for g in gs) and all(float(g.abs().sum()) > 0 for g in gs)


def test_lstm_is_coordinatewise():
    # one tensor or three: the same coordinates get the same updates
    torch.manual_seed(0)
    opt = l2o.optim.LSTMOptimizer(hidden=5, inputs="rich")
    params, grads = _multi()
    new, _ = opt.step(params, grads, opt.init(params))
    flat_p = {"all": torch.cat([v.reshape(-1) for v in params.values()])}
    flat_g = {"all": torch.cat([v.reshape(-1) for v in grads.values()])}
    flat_new, _ = opt.step(flat_p, flat_g, opt.init(flat_p))
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in new.values()]), flat_new["all"], rtol=1e-14, atol=0)
    # and permuting coordinates permutes their updates
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    perm_new, _ = opt.step({"all": flat_p["all"][perm]}, {"all": flat_g["all"][perm]}, opt.init(flat_p))
    torch.testing.assert_close(perm_new["all"], flat_new["all"][perm], rtol=1e-14, atol=0)


def test_lstm_input_features():
    opt = l2o.optim.LSTMOptimizer(hidden=4, inputs="plain", plain_scale=3.0)
    g = torch.tensor([0.5, -2.0])
    feats, _ = opt._features(g, {})
    torch.testing.assert_close(feats, torch.tensor([[1.5], [-6.0]]), rtol=0, atol=0)
    rich, st = preprocess.rich(g, preprocess.rich_init(2, g), p=10.0)
    assert rich.shape == (2, preprocess.N_RICH) and float(st["t"]) == 1.0
    # after one step the bias-corrected momenta all equal g, normalised by |g|: sign(g)
    torch.testing.assert_close(rich[:, 2:5], torch.sign(g)[:, None].expand(2, 3), rtol=1e-6, atol=0)


def test_log_sign_matches_paper_formula():
    p = 10.0
    g = torch.tensor([1.0, -0.5, 3e-4, -2e-3, 1e-5, -4e-6, 0.0, math.exp(-p)])
    out = preprocess.log_sign(g, p)
    expected = []
    for v in g.tolist():
        if abs(v) >= math.exp(-p):
            expected.append([math.log(abs(v)) / p, math.copysign(1.0, v)])
        else:
            expected.append([-1.0, math.exp(p) * v])
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-14, atol=1e-15)
    assert out.shape == (8, 2)
    # both branches are differentiable, also at g = 0
    x = g.clone().requires_grad_()
    (d,) = torch.autograd.grad(preprocess.log_sign(x, p)[:, 1].sum() + preprocess.log_sign(x, p)[:, 0].sum(), x)
    assert torch.isfinite(d).all()
    assert math.isclose(float(d[6]), math.exp(p)) and math.isclose(float(d[0]), 1.0 / p)
