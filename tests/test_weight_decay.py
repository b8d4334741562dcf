"""WeightDecay: the wrapped update, rebuild from config, and its hypergradients (float64)."""
from __future__ import annotations

import json

import pytest
import torch

from l2o import checkpoint
from l2o.hypergrad import forward, implicit, reverse
from l2o.optim import SGD, Adam, Momentum, WeightDecay, from_config

SHAPES = {"0.weight": [3, 4], "0.bias": [3]}


def regression(seed: int = 0, n: int = 20):
    """A linear least-squares problem with dotted parameter names, and its validation split."""
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    w_true = torch.randn(3, 4, generator=g)
    y = x @ w_true.T + 0.5 * torch.randn(n, 3, generator=g)
    yv = xv @ w_true.T + 0.5 * torch.randn(n, 3, generator=g)
    params = {"0.weight": 0.1 * torch.randn(3, 4, generator=g), "0.bias": torch.zeros(3)}

    def mse(p, a, b):
        return 0.5 * ((a @ p["0.weight"].T + p["0.bias"] - b) ** 2).sum(1).mean()

    return params, (lambda p: mse(p, x, y)), (lambda p: mse(p, xv, yv))


def run(opt, params, loss, steps=15):
    state = opt.init(params)
    for _ in range(steps):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
        params, state = opt.step(p, grads, state)
    return {k: v.detach() for k, v in params.items()}


def test_matches_base_on_penalised_loss_and_torch_sgd():
    params, loss, _ = regression()
    wd = WeightDecay(Momentum(lr=0.05, momentum=0.8), 0.3)
    base = Momentum(lr=0.05, momentum=0.8)
    got = run(wd, params, loss)
    want = run(base, params, lambda p: loss(p) + 0.5 * 0.3 * sum((v * v).sum() for v in p.values()))
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    # torch.optim.SGD's coupled weight_decay is the same update
    ps = [params[k].clone().requires_grad_() for k in params]
    topt = torch.optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.3)
    for _ in range(15):
        topt.zero_grad()
        loss(dict(zip(params, ps))).backward()
        topt.step()
    for k, p in zip(params, ps):
        torch.testing.assert_close(got[k], p.detach(), rtol=1e-12, atol=1e-12)


def test_per_weight_decay_matches_penalty_and_base():
    params, loss, _ = regression()
    wd = WeightDecay(Adam(lr=0.01), 0.2, shapes=SHAPES)
    with torch.no_grad():
        for r in wd.raw_weight_decay.values():
            r.add_(torch.linspace(-1, 1, r.numel()).view_as(r))
    decays = {k: wd.decay(k).detach() for k in params}
    assert all((d > 0).all() and d.shape == params[k].shape for k, d in decays.items())
    torch.testing.assert_close(wd.penalty(params), 0.5 * sum((decays[k] * params[k] ** 2).sum() for k in params))
    got = run(wd, params, loss)
    want = run(Adam(lr=0.01), params, lambda p: loss(p) + 0.5 * sum((decays[k] * p[k] ** 2).sum() for k in p))
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    assert abs(wd.hparams()["weight_decay"] - float(torch.cat([d.reshape(-1) for d in decays.values()]).mean())) < 1e-12
    with pytest.raises(KeyError, match="per-weight decays"):
        wd.decay("missing")


@pytest.mark.parametrize("shapes", [None, SHAPES])
def test_config_state_dict_round_trip(shapes):
    opt = WeightDecay(Momentum(lr=0.1, momentum=0.5), 1e-3, shapes=shapes)
    with torch.no_grad():
        for p in opt.parameters():
            p.add_(0.37)
    cfg = opt.config()
    assert json.loads(json.dumps(cfg)) == cfg and cfg["type"] == "WeightDecay"
    assert cfg["base"]["type"] == "Momentum" and cfg["shapes"] == (None if shapes is None else SHAPES)
    names = dict(opt.named_parameters())
    assert "base.log_lr" in names and "base.logit_momentum" in names  # base is a registered submodule
    assert ("log_weight_decay" in names) == (shapes is None)
    rebuilt = checkpoint.build_optimizer({"optimizer": checkpoint.optimizer_payload(opt)})
    assert isinstance(rebuilt, WeightDecay) and isinstance(rebuilt.base, Momentum)
    for k in ("0.weight", "0.bias"):
        torch.testing.assert_close(rebuilt.decay(k), opt.decay(k))
    torch.testing.assert_close(rebuilt.hparam("lr"), opt.hparam("lr"))
    again = from_config(rebuilt.config())
    again.load_state_dict(opt.state_dict())
    assert again.hparams() == pytest.approx(opt.hparams())


def test_learn_toggles_decay_and_forwards_to_base():
    opt = WeightDecay(Momentum(), 1e-2, shapes=SHAPES)
    opt.learn(["weight_decay"])
    trainable = {n for n, p in opt.named_parameters() if p.requires_grad}
    assert trainable == {"raw_weight_decay.0_weight", "raw_weight_decay.0_bias"}
    opt.learn(["lr"])
    assert {n for n, p in opt.named_parameters() if p.requires_grad} == {"base.log_lr"}
    opt.learn(None)
    assert all(p.requires_grad for p in opt.parameters())
    with pytest.raises(ValueError, match="no hyperparameter 'beta9'"):
        opt.learn(["beta9"])
    with pytest.raises(ValueError, match="must be > 0"):
        WeightDecay(SGD(), -1.0)
    with pytest.raises(ValueError, match="collide"):
        WeightDecay(SGD(), 0.1, shapes={"a.b": [1], "a_b": [1]})


def test_given_tensor_receives_gradient():
    params, loss, val = regression()
    wd = torch.tensor(0.1, requires_grad=True)
    opt = WeightDecay(SGD(lr=0.1), wd)
    g = reverse(lambda p, h, t: loss(p), lambda p, h: val(p), params, {"wd": wd}, opt, 10)
    assert g["wd"].abs() > 0


def _hypergrad_fd_check(opt, params, loss, val, steps=10):
    hparams = {n: p for n, p in opt.named_parameters() if n.startswith(("log_weight", "raw_weight"))}
    inner, outer = (lambda p, h, t: loss(p)), (lambda p, h: val(p))
    g = reverse(inner, outer, params, hparams, opt, steps)
    gf = forward(inner, outer, params, hparams, opt, steps)
    eps = 1e-6
    for name, h in hparams.items():
        torch.testing.assert_close(gf[name], g[name], rtol=1e-9, atol=1e-12)
        for i in range(min(h.numel(), 4)):
            vals = []
            for sign in (1, -1):
                with torch.no_grad():
                    h.view(-1)[i] += sign * eps
                vals.append(float(val(run(opt, params, loss, steps))))
                with torch.no_grad():
                    h.view(-1)[i] -= sign * eps
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert abs(float(g[name].view(-1)[i]) - fd) < 1e-7 * max(1.0, abs(fd)), (name, i)


@pytest.mark.parametrize("shapes", [None, SHAPES])
def test_reverse_and_forward_hypergradient_match_finite_differences(shapes):
    params, loss, val = regression(seed=1)
    opt = WeightDecay(Momentum(lr=0.1, momentum=0.6), 0.5, shapes=shapes)
    _hypergrad_fd_check(opt, params, loss, val)


def test_implicit_with_own_decay_parameters_equals_ridge_closed_form():
    params, loss, val = regression(seed=2)
    opt = WeightDecay(SGD(lr=0.1), 0.3, shapes=SHAPES)
    with torch.no_grad():
        for r in opt.raw_weight_decay.values():
            r.add_(torch.linspace(-0.5, 0.5, r.numel()).view_as(r))
    hparams = dict(opt.raw_weight_decay.named_parameters())

    def inner(p, h, t):
        return loss(p) + opt.penalty(p)

    def solve():  # the exact minimiser of the (strictly convex) penalised inner loss, differentiable in the decays
        flat = torch.zeros(15, requires_grad=True)
        unflat = lambda v: {"0.weight": v[:12].view(3, 4), "0.bias": v[12:]}  # noqa: E731
        with torch.enable_grad():
            H = torch.autograd.functional.hessian(lambda v: loss(unflat(v)), flat.detach())
            b = -torch.autograd.grad(loss(unflat(flat)), flat)[0]
        d = torch.cat([opt.decay(k).reshape(-1) for k in SHAPES])
        return unflat(torch.linalg.solve(H + torch.diag(d), b))

    exact = torch.autograd.grad(val(solve()), list(hparams.values()))
    star = {k: v.detach() for k, v in solve().items()}
    g_cg = implicit(inner, lambda p, h: val(p), star, hparams, method="cg", iters=50)
    g_ne = implicit(inner, lambda p, h: val(p), star, hparams, method="neumann", iters=400)
    for (k, h), e in zip(hparams.items(), exact):
        torch.testing.assert_close(g_cg[k], e, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g_ne[k], e, rtol=1e-4, atol=1e-6)
