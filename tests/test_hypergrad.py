"""Hypergradient estimators against finite differences, closed forms, hand-written references and each other.

Problems are tiny (ridge regression in 4 dimensions, a 3-5-2 tanh MLP) and horizons
short, so every check runs in float64 in milliseconds. Meta-parameters covered: a
learning rate, a momentum, a per-parameter weight-decay tensor that enters the inner
loss, initial weights (the very tensors in ``params`` and ``hparams``) and an
optimizer's own ``nn.Parameter``.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import l2o
from l2o.hypergrad import forward, forward_online, implicit, reverse, segments, truncated, unroll

T = 8
FD_EPS = 1e-5
FD_RTOL = 1e-6

# ============================================================================= problems
_gen = torch.Generator().manual_seed(0)


def _randn(*shape):
    # module-level data is built at import, before the float64 fixture runs: say the dtype
    return torch.randn(*shape, generator=_gen, dtype=torch.float64)


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ridge regression: train (X, y), validation (Xv, yv); per-coordinate weight decay
X, Xv = _randn(24, 4), _randn(16, 4)
W_TRUE = _randn(4)
Y, YV = X @ W_TRUE + 0.3 * _randn(24), Xv @ W_TRUE + 0.3 * _randn(16)
W0 = 0.5 * _randn(4)
WD0 = torch.tensor([0.05, 0.1, 0.2, 0.02], dtype=torch.float64)

# tiny MLP 3-5-2, regression on minibatches that change with the step
MX, MXv = _randn(12, 3), _randn(8, 3)
MY, MYv = torch.sin(MX[:, :2] * 1.5), torch.sin(MXv[:, :2] * 1.5)
MLP0 = {"W1": 0.7 * _randn(3, 5), "b1": 0.1 * _randn(5), "W2": 0.7 * _randn(5, 2), "b2": 0.1 * _randn(2)}
MWD0 = torch.full((3, 5), 0.01, dtype=torch.float64)
META_WEIGHTS = [0.0, 0.1, 0.0, 0.2, 0.1, 0.0, 0.3, 0.5]


def ridge_inner(p, h, t):
    """Mean squared error plus ``sum_i wd_i w_i^2``; the full objective for every ``t`` (and t=None)."""
    wd = h["wd"] if "wd" in h else WD0
    r = X @ p["w"] - Y
    return (r * r).mean() + (wd * p["w"] ** 2).sum()


def ridge_outer(p, h):
    r = Xv @ p["w"] - YV
    return (r * r).mean()


def _mlp(p, x):
    return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def mlp_inner(p, h, t):
    # squared error written out: forward-mode AD through F.mse_loss fails in torch 2.14
    rows = slice(None) if t is None else slice(4 * (t % 3), 4 * (t % 3) + 4)
    wd = h["wd"] if "wd" in h else MWD0
    return ((_mlp(p, MX[rows]) - MY[rows]) ** 2).mean() + (wd * p["W1"] ** 2).sum()


def mlp_outer(p, h):
    return ((_mlp(p, MXv) - MYv) ** 2).mean()


class Case:
    """A meta-learning problem: ``build(h) -> (params, opt)`` from meta-parameter values ``h``."""

    def __init__(self, inner, outer, hparams: dict, build: Callable, meta_weights=None) -> None:
        self.inner, self.outer, self.h0, self.build, self.meta_weights = inner, outer, hparams, build, meta_weights

    def fresh(self) -> tuple[dict, dict, object]:
        """Meta-parameters as new leaves requiring grad, and the params / optimizer built from them."""
        h = {k: v.clone().requires_grad_() for k, v in self.h0.items()}
        params, opt = self.build(h)
        return h, params, opt

    def objective(self, h: dict, steps: int = T) -> float:
        """The meta-objective at ``h`` without any graph: ``outer(params_T) + sum_t w_t loss_t``."""
        h = {k: v.detach().clone() for k, v in h.items()}
        params, opt = self.build(h)
        res = unroll(self.inner, params, h, opt, steps, graph=False, meta_weights=self.meta_weights)
        return float(res.meta_loss) + float(self.outer(res.params, h))

    def fd_check(self, grads: dict, rtol: float = FD_RTOL) -> None:
        """Central difference along a random direction of every meta-parameter at once."""
        g = torch.Generator().manual_seed(1)
        v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in self.h0.items()}
        plus = self.objective({k: t + FD_EPS * v[k] for k, t in self.h0.items()})
        minus = self.objective({k: t - FD_EPS * v[k] for k, t in self.h0.items()})
        fd = (plus - minus) / (2 * FD_EPS)
        ours = float(sum((grads[k] * v[k]).sum() for k in self.h0))
        assert abs(ours - fd) <= rtol * abs(fd), f"hypergradient {ours!r} vs finite difference {fd!r}"
        assert abs(fd) > 1e-6  # the check is not vacuous


def _ridge_params(h):
    return {"w": h["w0"] if "w0" in h else W0.clone()}


def _mlp_params(h):
    p = {k: v.clone() for k, v in MLP0.items()}
    if "W1" in h:
        p["W1"] = h["W1"]  # the very tensor: initial weights are meta-parameters
    return p


def _momentum(h, lr=0.1, mu=0.6):
    return l2o.optim.Momentum(lr=h.get("lr", lr), momentum=h.get("momentum", mu))


CASES = {
    "ridge-lr": Case(ridge_inner, ridge_outer, {"lr": _scalar(0.05)},
                     lambda h: (_ridge_params(h), l2o.optim.SGD(lr=h["lr"]))),
    "ridge-momentum": Case(ridge_inner, ridge_outer, {"momentum": _scalar(0.7)},
                           lambda h: (_ridge_params(h), _momentum(h, lr=0.05))),
    "ridge-weight_decay": Case(ridge_inner, ridge_outer, {"wd": WD0.clone()},
                               lambda h: (_ridge_params(h), _momentum(h, lr=0.05))),
    "ridge-init": Case(ridge_inner, ridge_outer, {"w0": W0.clone()},
                       lambda h: (_ridge_params(h), _momentum(h, lr=0.05))),
    "mlp-lr": Case(mlp_inner, mlp_outer, {"lr": _scalar(0.3)},
                   lambda h: (_mlp_params(h), l2o.optim.SGD(lr=h["lr"])), META_WEIGHTS),
    "mlp-momentum": Case(mlp_inner, mlp_outer, {"momentum": _scalar(0.5)},
                         lambda h: (_mlp_params(h), _momentum(h, lr=0.2)), META_WEIGHTS),
    "mlp-weight_decay": Case(mlp_inner, mlp_outer, {"wd": MWD0.clone()},
                             lambda h: (_mlp_params(h), _momentum(h, lr=0.2)), META_WEIGHTS),
    "mlp-init": Case(mlp_inner, mlp_outer, {"W1": MLP0["W1"].clone()},
                     lambda h: (_mlp_params(h), _momentum(h, lr=0.2)), META_WEIGHTS),
    "mlp-all": Case(mlp_inner, mlp_outer,
                    {"lr": _scalar(0.2), "momentum": _scalar(0.5), "wd": MWD0.clone(), "W1": MLP0["W1"].clone()},
                    lambda h: (_mlp_params(h), _momentum(h)), META_WEIGHTS),
}


def _estimate(name: str, case: Case, **kwargs) -> dict:
    h, params, opt = case.fresh()
    args = (case.inner, case.outer, params, h, opt)
    kw = {"meta_weights": case.meta_weights, **kwargs}
    if name == "reverse":
        return reverse(*args, steps=T, **kw)
    if name == "reverse_truncate_T":
        return reverse(*args, steps=T, truncate=T, **kw)
    if name == "truncated_T":
        return truncated(*args, steps=T, truncate=T, **kw)
    if name == "forward":
        return forward(*args, steps=T, **kw)
    raise KeyError(name)


# ============================================================================= finite differences
@pytest.mark.parametrize("estimator", ["reverse", "reverse_truncate_T", "truncated_T", "forward"])
@pytest.mark.parametrize("case", list(CASES))
def test_estimators_match_finite_differences(case, estimator):
    c = CASES[case]
    grads = _estimate(estimator, c)
    assert grads.keys() == c.h0.keys()
    assert all(grads[k].shape == c.h0[k].shape and torch.isfinite(grads[k]).all() for k in grads)
    c.fd_check(grads)


def test_optimizer_own_parameters_as_hparams():
    """``hparams={"log_lr": opt.log_lr, ...}``: reverse, forward and finite differences agree."""
    def run(estimator, log_lr=None, logit_mu=None):
        opt = l2o.optim.Momentum(lr=0.2, momentum=0.5)
        with torch.no_grad():
            if log_lr is not None:
                opt.log_lr.copy_(log_lr)
                opt.logit_momentum.copy_(logit_mu)
        h = {"log_lr": opt.log_lr, "logit_momentum": opt.logit_momentum}
        params = _mlp_params({})
        if estimator is None:
            res = unroll(mlp_inner, params, {}, opt, T, graph=False, meta_weights=META_WEIGHTS)
            return float(res.meta_loss) + float(mlp_outer(res.params, {}))
        out = estimator(mlp_inner, mlp_outer, params, h, opt, steps=T, meta_weights=META_WEIGHTS)
        # forward mode swaps duals in and must put the optimizer's own parameters back
        assert isinstance(opt.log_lr, torch.nn.Parameter) and opt.log_lr is h["log_lr"]
        assert opt.log_lr.grad is None  # estimators return gradients, they do not assign them
        return out

    g_rev, g_fwd = run(reverse), run(forward)
    for k in g_rev:
        torch.testing.assert_close(g_fwd[k], g_rev[k], rtol=1e-9, atol=1e-12)
    l0, m0 = torch.tensor(0.2).log(), torch.tensor(0.5).logit()
    for k, (dl, dm) in {"log_lr": (FD_EPS, 0.0), "logit_momentum": (0.0, FD_EPS)}.items():
        fd = (run(None, l0 + dl, m0 + dm) - run(None, l0 - dl, m0 - dm)) / (2 * FD_EPS)
        assert abs(float(g_rev[k]) - fd) <= FD_RTOL * abs(fd), k


def test_lstm_weights_reverse_matches_finite_differences():
    """The learned optimizer's weights go through the same estimator as a learning rate."""
    torch.manual_seed(0)
    opt = l2o.optim.LSTMOptimizer(hidden=4, layers=2, init_scale=0.3)
    h = dict(opt.named_parameters())
    g = reverse(ridge_inner, ridge_outer, {"w": W0.clone()}, h, opt, steps=5)
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for k, t in h.items()}

    def objective(sign):
        with torch.no_grad():
            for k, t in h.items():
                t.add_(sign * FD_EPS * v[k])
        res = unroll(ridge_inner, {"w": W0.clone()}, {}, opt, 5, graph=False)
        with torch.no_grad():
            for k, t in h.items():
                t.sub_(sign * FD_EPS * v[k])
        return float(ridge_outer(res.params, {}))

    fd = (objective(1.0) - objective(-1.0)) / (2 * FD_EPS)
    ours = float(sum((g[k] * v[k]).sum() for k in h))
    assert abs(ours - fd) <= FD_RTOL * abs(fd) and abs(fd) > 1e-6


# ============================================================================= estimators against each other
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("case", ["mlp-all", "ridge-init"])
def test_forward_equals_reverse(case, second_order):
    c = CASES[case]
    for meta_weights in ([0.2] * T, c.meta_weights):
        for outer in (c.outer, None) if meta_weights is not None else (c.outer,):
            h, params, opt = c.fresh()
            g_rev = reverse(c.inner, outer, params, h, opt, steps=T, second_order=second_order,
                            meta_weights=meta_weights)
            h2, params2, opt2 = c.fresh()
            g_fwd = forward(c.inner, outer, params2, h2, opt2, steps=T, second_order=second_order,
                            meta_weights=meta_weights)
            for k in h:
                assert float(g_rev[k].abs().max()) > 1e-6
                torch.testing.assert_close(g_fwd[k], g_rev[k], rtol=1e-9, atol=1e-12)


OPTIMIZERS = {
    "sgd": lambda: l2o.optim.SGD(lr=0.2),
    "nesterov": lambda: l2o.optim.Momentum(lr=0.1, momentum=0.6, nesterov=True),
    "inv_decay": lambda: l2o.optim.MomentumInvDecay(lr=0.2, momentum=0.5, decay=0.7, T0=3.0),
    "adam": lambda: l2o.optim.Adam(lr=0.05, beta1=0.8, beta2=0.95),
    "rmsprop": lambda: l2o.optim.RMSprop(lr=0.02, alpha=0.9),
    "lstm_rich": lambda: l2o.optim.LSTMOptimizer(hidden=3, layers=1, inputs="rich", init_scale=0.3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_forward_equals_reverse_for_every_optimizer(name):
    """Each optimizer's own parameters as meta-parameters (the LSTM's output layer: 4 of them)."""
    torch.manual_seed(0)
    opt = OPTIMIZERS[name]()
    h = {k: v for k, v in opt.named_parameters() if not k.startswith("cells")}
    g_rev = reverse(mlp_inner, mlp_outer, _mlp_params({}), h, opt, steps=6, meta_weights=META_WEIGHTS)
    g_fwd = forward(mlp_inner, mlp_outer, _mlp_params({}), h, opt, steps=6, meta_weights=META_WEIGHTS)
    assert g_rev.keys() == h.keys()
    for k in h:
        assert float(g_rev[k].abs().max()) > 1e-8
        torch.testing.assert_close(g_fwd[k], g_rev[k], rtol=1e-9, atol=1e-13)


def test_first_order_differs_from_second_order():
    """``second_order=False`` drops d(gradient)/d(hparams): a weight decay keeps only its direct effect."""
    c = CASES["mlp-weight_decay"]
    exact, first = _estimate("reverse", c), _estimate("reverse", c, second_order=False)
    assert float((exact["wd"] - first["wd"]).abs().max()) > 1e-4
    # with only the meta-weighted inner losses, first order sees wd just where it enters those losses
    h, params, opt = c.fresh()
    g = reverse(c.inner, None, params, h, opt, steps=T, second_order=False, meta_weights=c.meta_weights)
    direct = torch.zeros_like(MWD0)
    res_params = dict(params)
    st = opt.init(res_params)
    with torch.no_grad():
        for t in range(T):  # first order: params_t are constants, only the explicit wd term remains
            direct += c.meta_weights[t] * res_params["W1"] ** 2
            res = unroll(c.inner, res_params, {}, opt, 1, state=st, start=t, graph=False)
            res_params, st = res.params, res.state
    torch.testing.assert_close(g["wd"], direct, rtol=1e-12, atol=1e-15)


def test_truncated_with_K_equal_T_is_reverse_exactly():
    c = CASES["mlp-all"]
    full = _estimate("reverse", c)
    for name in ("reverse_truncate_T", "truncated_T"):
        other = _estimate(name, c)
        assert all(torch.equal(other[k], full[k]) for k in full), name
    h, params, opt = c.fresh()
    longer = truncated(c.inner, c.outer, params, h, opt, steps=T, truncate=3 * T, meta_weights=c.meta_weights)
    assert all(torch.equal(longer[k], full[k]) for k in full)


def _momentum_steps(p, b, hp, steps, t0, graph):
    """Hand-written heavy ball on the MLP: b <- mu b + g, p <- p - lr b; returns (p, b, meta-loss)."""
    meta = 0.0
    for t in range(t0, t0 + steps):
        q = {k: (v if v.requires_grad else v.detach().requires_grad_()) for k, v in p.items()}
        loss = mlp_inner(q, hp, t)
        g = dict(zip(q, torch.autograd.grad(loss, list(q.values()), create_graph=graph)))
        meta = meta + META_WEIGHTS[t] * (loss if graph else float(loss.detach()))
        b = {k: hp["momentum"] * b[k] + g[k] for k in q}
        p = {k: q[k] - hp["lr"] * b[k] for k in q}
        if not graph:
            p, b = {k: v.detach() for k, v in p.items()}, {k: v.detach() for k, v in b.items()}
    return p, b, meta


def _hp():
    return {"lr": torch.tensor(0.2, requires_grad=True), "momentum": torch.tensor(0.5, requires_grad=True),
            "wd": MWD0.clone().requires_grad_()}


@pytest.mark.parametrize("K", [1, 3, 5])
def test_reverse_truncate_matches_hand_written_reference(K):
    hp = _hp()
    p0 = {k: v.clone() for k, v in MLP0.items()}
    b0 = {k: torch.zeros_like(v) for k, v in p0.items()}
    # reference: T-K steps without a graph, then K with one; objective = outer + weighted losses of those K steps
    p, b, _ = _momentum_steps(p0, b0, hp, T - K, 0, graph=False)
    p, b, meta = _momentum_steps(p, b, hp, K, T - K, graph=True)
    ref = dict(zip(hp, torch.autograd.grad(meta + mlp_outer(p, hp), list(hp.values()))))

    h = _hp()
    ours = reverse(mlp_inner, mlp_outer, {k: v.clone() for k, v in MLP0.items()}, h,
                   l2o.optim.Momentum(lr=h["lr"], momentum=h["momentum"]), steps=T, truncate=K,
                   meta_weights=META_WEIGHTS)
    for k in hp:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-12, atol=1e-15)
    full = _estimate("reverse", CASES["mlp-all"])
    assert float((ours["lr"] - full["lr"]).abs()) > 1e-6  # truncation is biased: the check is not vacuous


@pytest.mark.parametrize("K", [2, 3])
def test_accumulated_truncated_is_sum_of_segments(K):
    hp = _hp()
    p = {k: v.clone() for k, v in MLP0.items()}
    b = {k: torch.zeros_like(v) for k, v in p.items()}
    ref = {k: torch.zeros_like(v) for k, v in hp.items()}
    per_segment = []
    for t0 in range(0, T, K):  # T = 8 is not a multiple of 3: the last segment is shorter
        k = min(K, T - t0)
        p, b, meta = _momentum_steps(p, b, hp, k, t0, graph=True)
        objective = meta + (mlp_outer(p, hp) if t0 + k == T else 0.0)
        gs = dict(zip(hp, torch.autograd.grad(objective, list(hp.values()))))
        per_segment.append(gs)
        for name in ref:
            ref[name] += gs[name]
        p, b = {n: v.detach() for n, v in p.items()}, {n: v.detach() for n, v in b.items()}

    def setup():
        h = _hp()
        return {k: v.clone() for k, v in MLP0.items()}, h, l2o.optim.Momentum(lr=h["lr"], momentum=h["momentum"])

    params, h, opt = setup()
    ours = truncated(mlp_inner, mlp_outer, params, h, opt, steps=T, truncate=K, meta_weights=META_WEIGHTS)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-12, atol=1e-15)
    params, h, opt = setup()
    segs = list(segments(mlp_inner, mlp_outer, params, h, opt, T, K, meta_weights=META_WEIGHTS))
    assert [s.step for s in segs] == list(range(K, T, K)) + [T]
    for s, gs in zip(segs, per_segment):
        for name in gs:
            torch.testing.assert_close(s.grads[name], gs[name], rtol=1e-12, atol=1e-15)


def test_truncated_with_only_an_outer_loss_is_its_last_segment():
    """Earlier segments have no objective: zero gradients, and the sum is reverse(truncate=K)."""
    c = CASES["mlp-all"]
    h, params, opt = c.fresh()
    segs = list(segments(c.inner, c.outer, params, h, opt, T, 2))
    assert [s.step for s in segs] == [2, 4, 6, 8]
    for s in segs[:-1]:
        assert all(float(g.abs().max()) == 0.0 for g in s.grads.values())
    h2, params2, opt2 = c.fresh()
    ref = reverse(c.inner, c.outer, params2, h2, opt2, steps=T, truncate=2)
    for k in h:
        if k != "W1":  # initial weights are cut off by the truncation: 0 in both
            assert float(ref[k].abs().max()) > 0
        torch.testing.assert_close(segs[-1].grads[k], ref[k], rtol=1e-12, atol=0)
    # the inner losses were still recorded in every segment
    assert [len(s.losses) for s in segs] == [2, 2, 2, 2]


def test_forward_online_yields_every_K_steps():
    c = CASES["mlp-all"]
    h, params, opt = c.fresh()
    out = list(forward_online(c.inner, c.outer, params, h, opt, steps=T, every=3, meta_weights=c.meta_weights))
    assert [step for step, _, _ in out] == [3, 6, 8]
    for steps, (_, g_online, _) in ((3, out[0]), (T, out[-1])):  # hparams left unchanged: same as forward()
        h2, params2, opt2 = c.fresh()
        g_ref = forward(c.inner, c.outer, params2, h2, opt2, steps=steps, meta_weights=c.meta_weights)
        for k in h:
            torch.testing.assert_close(g_online[k], g_ref[k], rtol=1e-12, atol=1e-15)


# ============================================================================= implicit differentiation
def _ridge_solution(wd: torch.Tensor) -> torch.Tensor:
    """argmin_w mean((Xw - y)^2) + sum wd w^2  =  (X'X/n + diag wd)^-1 X'y/n."""
    n = X.shape[0]
    return torch.linalg.solve(X.T @ X / n + torch.diag(wd), X.T @ Y / n)


def _ridge_closed_form(wd: torch.Tensor) -> torch.Tensor:
    """d outer(w*(wd)) / d wd = -(A^-1 dOuter/dw) * w*,  A = X'X/n + diag wd."""
    n = X.shape[0]
    w = _ridge_solution(wd)
    g_out = 2 * Xv.T @ (Xv @ w - YV) / Xv.shape[0]
    return -torch.linalg.solve(X.T @ X / n + torch.diag(wd), g_out) * w


def test_implicit_cg_equals_closed_form_and_finite_differences():
    wd = WD0.clone().requires_grad_()
    g = implicit(ridge_inner, ridge_outer, {"w": _ridge_solution(WD0)}, {"wd": wd}, method="cg", iters=100)["wd"]
    exact = _ridge_closed_form(WD0)
    assert float((g - exact).norm() / exact.norm()) < 1e-6
    v = torch.randn(4, generator=torch.Generator().manual_seed(3))
    f = lambda s: float(ridge_outer({"w": _ridge_solution(WD0 + s * v)}, {}))
    fd = (f(FD_EPS) - f(-FD_EPS)) / (2 * FD_EPS)
    assert abs(float(g @ v) - fd) <= FD_RTOL * abs(fd)


def test_implicit_neumann_converges_to_closed_form():
    exact = _ridge_closed_form(WD0)
    errors = []
    for iters in (5, 20, 200):
        wd = WD0.clone().requires_grad_()
        g = implicit(ridge_inner, ridge_outer, {"w": _ridge_solution(WD0)}, {"wd": wd}, method="neumann", iters=iters)
        errors.append(float((g["wd"] - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors


def test_implicit_direct_and_indirect_terms():
    """A meta-parameter in both the inner and the outer loss gets both terms (outer L2 on w, scaled by s)."""
    s0 = torch.tensor(0.3)
    inner = lambda p, h, t: ridge_inner(p, {}, t) + h["s"] * (p["w"] ** 2).sum()
    outer = lambda p, h: ridge_outer(p, h) + h["s"] ** 2
    A = X.T @ X / X.shape[0] + torch.diag(WD0 + s0)
    w = torch.linalg.solve(A, X.T @ Y / X.shape[0])
    g = implicit(inner, outer, {"w": w}, {"s": s0.clone().requires_grad_()})["s"]
    g_out = 2 * Xv.T @ (Xv @ w - YV) / Xv.shape[0]
    exact = 2 * s0 - torch.linalg.solve(A, g_out) @ w
    torch.testing.assert_close(g, exact, rtol=1e-8, atol=0)


def test_implicit_refuses_optimizer_and_initial_weight_meta_parameters():
    w_star = {"w": _ridge_solution(WD0)}
    with pytest.raises(ValueError, match="learning rate"):
        implicit(ridge_inner, ridge_outer, w_star, {"lr": torch.tensor(0.1, requires_grad=True)})
    opt = l2o.optim.SGD(lr=0.1)
    with pytest.raises(ValueError, match="'log_lr'.*reverse or forward"):
        implicit(ridge_inner, ridge_outer, w_star, {"wd": WD0.clone().requires_grad_(), "log_lr": opt.log_lr})
    w0 = W0.clone().requires_grad_()
    with pytest.raises(ValueError, match="initial weights"):
        implicit(ridge_inner, ridge_outer, {"w": w0}, {"w0": w0})
    with pytest.raises(ValueError, match="method"):
        implicit(ridge_inner, ridge_outer, w_star, {"wd": WD0.clone().requires_grad_()}, method="lbfgs")
    with pytest.raises(ValueError, match="iters"):
        implicit(ridge_inner, ridge_outer, w_star, {"wd": WD0.clone().requires_grad_()}, iters=0)


# ============================================================================= the public contract and bad input
def test_public_api_contract():
    hparams = {"lr": torch.tensor(0.05, requires_grad=True)}
    params = {"w": W0.clone()}
    inner_loss, outer_loss = ridge_inner, ridge_outer
    opt = l2o.optim.SGD(lr=hparams["lr"])
    g1 = l2o.hypergrad.reverse(inner_loss, outer_loss, params, hparams, opt, steps=T)
    g2 = l2o.hypergrad.reverse(inner_loss, outer_loss, params, hparams, opt, steps=T, truncate=3)
    g3 = l2o.hypergrad.forward(inner_loss, outer_loss, params, hparams, opt, steps=T)
    assert g1.keys() == g2.keys() == g3.keys() == {"lr"}
    torch.testing.assert_close(g3["lr"], g1["lr"], rtol=1e-9, atol=0)
    assert not torch.equal(g2["lr"], g1["lr"]) and torch.isfinite(g2["lr"])
    assert torch.equal(params["w"], W0)  # the caller's params are not trained in place
    hparams = {"wd": WD0.clone().requires_grad_()}
    params_star = {"w": _ridge_solution(WD0)}
    for method in ("cg", "neumann"):
        g = l2o.hypergrad.implicit(inner_loss, outer_loss, params_star, hparams, method=method, iters=100)
        assert g["wd"].shape == (4,) and torch.isfinite(g["wd"]).all()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_non_positive_steps_and_truncate_raise(bad):
    c = CASES["ridge-lr"]
    h, params, opt = c.fresh()
    args = (c.inner, c.outer, params, h, opt)
    calls = [lambda: reverse(*args, steps=bad), lambda: reverse(*args, steps=T, truncate=bad),
             lambda: truncated(*args, steps=T, truncate=bad), lambda: truncated(*args, steps=bad, truncate=2),
             lambda: forward(*args, steps=bad), lambda: next(forward_online(*args, steps=T, every=bad))]
    for call in calls:
        with pytest.raises(ValueError, match="positive integer"):
            call()


def test_hparams_must_require_grad():
    lr = torch.tensor(0.05)  # forgot requires_grad
    opt = l2o.optim.SGD(lr=lr)
    for est in (reverse, forward):
        with pytest.raises(ValueError, match=r"hparams\['lr'\].*requires_grad=True"):
            est(ridge_inner, ridge_outer, {"w": W0.clone()}, {"lr": lr}, opt, steps=T)
    with pytest.raises(ValueError, match="requires_grad=True"):
        implicit(ridge_inner, ridge_outer, {"w": W0.clone()}, {"wd": WD0.clone()})
    with pytest.raises(ValueError, match="non-empty"):
        reverse(ridge_inner, ridge_outer, {"w": W0.clone()}, {}, opt, steps=T)


def test_empty_objective_and_short_meta_weights_raise():
    c = CASES["ridge-lr"]
    h, params, opt = c.fresh()
    with pytest.raises(ValueError, match="objective is empty"):
        reverse(c.inner, None, params, h, opt, steps=T)
    with pytest.raises(ValueError, match="objective is empty"):
        forward(c.inner, None, params, h, opt, steps=T)
    with pytest.raises(ValueError, match="meta_weights"):
        reverse(c.inner, c.outer, params, h, opt, steps=T, meta_weights=[1.0] * (T - 1))


def test_forward_refuses_many_meta_parameters():
    big = {"wd": torch.zeros(10**5, requires_grad=True)}
    inner = lambda p, h, t: ((p["w"] - 1.0) ** 2).sum() + (h["wd"][:4] * p["w"] ** 2).sum()
    with pytest.raises(ValueError, match=r"100000.*max_directions.*reverse mode"):
        forward(inner, ridge_outer, {"w": W0.clone()}, big, l2o.optim.SGD(lr=0.1), steps=2)


def test_divergence_raises_floating_point_error():
    h = {"lr": torch.tensor(1e3, requires_grad=True)}
    with pytest.raises(FloatingPointError, match="non-finite"):
        reverse(lambda p, h_, t: (p["w"] ** 4).sum(), ridge_outer, {"w": W0.clone()}, h, l2o.optim.SGD(lr=h["lr"]),
                steps=20)
