"""The allocation-lean implicit path: the written-out penalty and the in-place Neumann series (float64)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import l2o
from l2o.hypergrad import implicit
from l2o.hypergrad.implicit import neumann
from l2o.optim.penalty import _PenaltyGrad, penalty



def _plain(p, x, soft):
    return 0.5 * ((F.softplus(x) if soft else x) * p * p).sum()


@pytest.mark.parametrize("soft,x_shape", [(True, (4, 3)), (False, (4, 3)), (False, ()), (True, (1, 3))])
def test_penalty_value_gradient_hvp_mixed_and_third_order_match_the_plain_formula(soft, x_shape):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=gen, requires_grad=True)
    x = (torch.randn(x_shape, generator=gen) if soft else torch.rand(x_shape, generator=gen) + 0.1).requires_grad_()
    v, w = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    ours, plain = penalty(p, x.view_as(x), soft=soft), _plain(p, x, soft)
    torch.testing.assert_close(ours, plain, rtol=1e-13, atol=0)
    for a, b in zip(torch.autograd.grad(ours, [p, x]), torch.autograd.grad(plain, [p, x])):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    g1 = torch.autograd.grad(penalty(p, x.view_as(x), soft=soft), p, create_graph=True)[0]
    g2 = torch.autograd.grad(_plain(p, x, soft), p, create_graph=True)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=0)
    # Hessian-vector and mixed products asked separately (the backward computes only what is asked) and together
    for inputs in ([p], [x], [p, x]):
        for a, b in zip(torch.autograd.grad(g1, inputs, v, retain_graph=True),
                        torch.autograd.grad(g2, inputs, v, retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # a graph of those products (third derivatives) falls back to the plain formula
    h1 = torch.autograd.grad(g1, [p, x], v, create_graph=True)
    h2 = torch.autograd.grad(g2, [p, x], v, create_graph=True)
    t1 = torch.autograd.grad((h1[0] * w).sum() + h1[1].sum(), [p, x])
    t2 = torch.autograd.grad((h2[0] * w).sum() + h2[1].sum(), [p, x])
    for a, b in zip(t1, t2):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_penalty_gradchecks():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(3, 2, generator=gen, requires_grad=True)
    raw = torch.randn(3, 2, generator=gen, requires_grad=True)
    grad = torch.tensor(1.7, requires_grad=True)  # the incoming gradient itself differentiated
    assert torch.autograd.gradcheck(lambda q, r: penalty(q, r.view_as(r), soft=True), (p, raw))
    assert torch.autograd.gradgradcheck(lambda q, r: penalty(q, r.view_as(r), soft=True), (p, raw))
    assert torch.autograd.gradcheck(lambda q, r, g: _PenaltyGrad.apply(q, r, g, F.softplus(r).detach(),
                                                                       torch.sigmoid(r).detach(), True),
                                    (p, raw, grad))
    assert torch.autograd.gradgradcheck(lambda q, r, g: _PenaltyGrad.apply(q, r, g, F.softplus(r).detach(),
                                                                           torch.sigmoid(r).detach(), True),
                                        (p, raw, grad))


def test_weight_decay_penalty_follows_in_place_updates_of_its_raw_decays():
    shapes = {"w": [4, 3], "b": [3]}
    opt = l2o.optim.WeightDecay(l2o.optim.SGD(), 0.2, shapes=shapes)
    gen = torch.Generator().manual_seed(2)
    params = {k: torch.randn(s, generator=gen, requires_grad=True) for k, s in shapes.items()}
    raw = dict(opt.raw_weight_decay.named_parameters())
    for _ in range(2):  # the cached softplus and slope must follow an outer optimizer's in-place step
        plain = sum(_plain(params[k], raw[k], True) for k in shapes)
        ours = opt.penalty(params)
        torch.testing.assert_close(ours, plain, rtol=1e-13, atol=0)
        v = [torch.randn(s, generator=gen) for s in shapes.values()]
        g1 = torch.autograd.grad(ours, list(params.values()), create_graph=True)
        g2 = torch.autograd.grad(plain, list(params.values()), create_graph=True)
        for a, b in zip(torch.autograd.grad(g1, list(raw.values()), v), torch.autograd.grad(g2, list(raw.values()), v)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        with torch.no_grad():
            for r in raw.values():
                r.add_(torch.linspace(-1.0, 1.0, r.numel()).view_as(r))


def _old_implicit(inner, outer, params, hparams, iters, alpha):
    """The formula written plainly: autograd's own derivatives, out-of-place Neumann terms."""
    p = [v.detach().requires_grad_() for v in params.values()]
    pd, hv = dict(zip(params, p)), list(hparams.values())
    g_out = torch.autograd.grad(outer(pd, hparams), p)
    dLdp = torch.autograd.grad(inner(pd, hparams, None), p, create_graph=True)
    term, total = list(g_out), list(g_out)
    for _ in range(iters):
        h = torch.autograd.grad(dLdp, p, grad_outputs=term, retain_graph=True)
        term = [t - alpha * x for t, x in zip(term, h)]
        total = [s + t for s, t in zip(total, term)]
    mixed = torch.autograd.grad(dLdp, hv, grad_outputs=[alpha * t for t in total])
    return [-m for m in mixed]


@pytest.mark.parametrize("method", ["neumann", "cg"])
def test_implicit_on_a_relu_mlp_with_per_weight_decays_equals_the_plain_formula(method):
    gen = torch.Generator().manual_seed(3)
    task = l2o.tasks.base.ModuleTask(lambda: l2o.tasks.mlp.build_mlp(6, [5], 3, "relu"), l2o.tasks.base.cross_entropy)
    params = task.init(gen)
    data = [(torch.randn(20, 6, generator=gen), torch.randint(0, 3, (20,), generator=gen)) for _ in range(2)]
    opt = l2o.optim.WeightDecay(l2o.optim.SGD(), 0.05, shapes={k: list(v.shape) for k, v in params.items()})
    hp = dict(opt.raw_weight_decay.named_parameters())
    inner = lambda q, h, t: task.loss(q, data[0]) + opt.penalty(q)  # noqa: E731
    outer = lambda q, h: task.loss(q, data[1])  # noqa: E731
    got = implicit(inner, outer, params, hp, method=method, iters=3, alpha=0.3)
    if method == "neumann":
        want = _old_implicit(inner, outer, params, hp, 3, 0.3)
        for k, w in zip(hp, want):
            torch.testing.assert_close(got[k], w, rtol=1e-12, atol=1e-15)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in got.values())
    assert all(torch.equal(params[k], v) for k, v in task.init(torch.Generator().manual_seed(3)).items())


@pytest.mark.parametrize("hvp_kind", ["identity", "shared", "scaled"])
def test_neumann_with_aliased_products_equals_the_series_and_leaves_b_alone(hvp_kind):
    gen = torch.Generator().manual_seed(4)
    b = [torch.randn(3, generator=gen), torch.randn(3, generator=gen)]
    keep = [t.clone() for t in b]
    M = {"identity": torch.eye(6), "shared": torch.ones(6, 6) / 6, "scaled": torch.diag(torch.arange(1.0, 7.0))}[hvp_kind]

    def hvp(v):
        if hvp_kind == "identity":
            return list(v)  # hands its input back: the product aliases the direction
        if hvp_kind == "shared":
            s = (v[0].sum() + v[1].sum()) / 6 * torch.ones(3)
            return [s, s]  # one tensor for both entries, as a sum's backward gives
        out = M @ torch.cat(v)
        return [out[:3].clone(), out[3:].clone()]

    alpha, iters = 0.1, 4
    got = torch.cat(neumann(hvp, b, iters, alpha))
    A, x, total = torch.eye(6) - alpha * M, torch.cat(keep), torch.zeros(6)
    for _ in range(iters + 1):
        total, x = total + x, A @ x
    torch.testing.assert_close(got, alpha * total, rtol=1e-13, atol=1e-15)
    assert all(torch.equal(t, k) for t, k in zip(b, keep))


def test_implicit_estimator_estimates_the_neumann_step_once_per_run(monkeypatch):
    implicit_mod = importlib.import_module("l2o.hypergrad.implicit")
    calls = []
    real = implicit_mod.largest_eigenvalue
    monkeypatch.setattr(implicit_mod, "largest_eigenvalue", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 4, generator=gen), torch.randn(30, generator=gen)
    xv, yv = torch.randn(30, 4, generator=gen), torch.randn(30, generator=gen)
    opt = l2o.optim.WeightDecay(l2o.optim.SGD(lr=0.2), 0.3, shapes={"w": [4]})
    opt.learn(["weight_decay"])
    h = {k: v for k, v in opt.named_parameters() if v.requires_grad}
    problem = l2o.hypergrad.Problem(lambda p, hp, t: ((x @ p["w"] - y) ** 2).mean(),
                                    lambda p, hp: ((xv @ p["w"] - yv) ** 2).mean(), {"w": torch.zeros(4)}, opt, 40)
    est = l2o.hypergrad.make("implicit", every=10)
    for _ in range(2):  # two runs of four chunks each
        state = est.init(problem, h)
        while not est.done(state):
            _, metrics, state = est.estimate(h, state)
            assert metrics["finite"]
        assert "neumann_alpha" in est.state_dict(state)["extra"]
    assert len(calls) == 2


def test_implicit_results_are_distinct_plain_tensors():
    """Autograd may hand one gradient to two meta-parameters, or an expanded view: each result is its own tensor."""
    h = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([0.5, 0.1], requires_grad=True)}
    inner = lambda p, hp, t: ((p["w"] - 1) ** 2).sum()  # noqa: E731
    outer = lambda p, hp: (p["w"] * (hp["a"] + hp["b"])).sum() + hp["a"].sum()  # noqa: E731
    g = implicit(inner, outer, {"w": torch.ones(2)}, h)
    torch.testing.assert_close(g["a"], torch.tensor([2.0, 2.0]), rtol=0, atol=0)
    torch.testing.assert_close(g["b"], torch.tensor([1.0, 1.0]), rtol=0, atol=0)
    assert g["a"].data_ptr() != g["b"].data_ptr() and all(t._base is None for t in g.values())


def test_neumann_with_no_terms_is_the_first_term():
    """``iters=0``: ``alpha * b`` and no Hessian-vector product (as before the in-place series)."""
    from l2o.hypergrad.solvers import neumann
    calls = []
    b = [torch.tensor([1.0, -2.0])]
    out = neumann(lambda v: calls.append(1) or [2.0 * v[0]], b, 0, 0.25)
    assert calls == [] and isinstance(out, list) and torch.equal(out[0], torch.tensor([0.25, -0.5]))
    assert torch.equal(b[0], torch.tensor([1.0, -2.0]))  # the caller's vector is untouched
    one = neumann(lambda v: [2.0 * v[0]], b, 1, 0.25)  # b + (1 - 0.5) b, times 0.25
    assert isinstance(one, list) and torch.allclose(one[0], torch.tensor([0.375, -0.75]))
