"""Conformance of every estimator registered in ``l2o.hypergrad.ESTIMATORS``, and PES / ES against bias.

Every registered estimator runs over the same float64 problems through the one
interface (``init`` / ``estimate`` / ``done``): exact ones must match central finite
differences to 1e-6, stochastic ones (PES, ES) must match them within four standard
errors over independent seeds, approximate ones (implicit) must match on the problem
run to stationarity, and an estimator may refuse a problem only with a ``ValueError``
from ``check``. A new estimator is picked up automatically.
"""
from __future__ import annotations

import io
import math
from dataclasses import fields

import pytest
import torch

import l2o
from l2o.hypergrad import ESTIMATORS, Problem, es, pes, reverse, truncated, unroll

from test_hypergrad import FD_EPS, META_WEIGHTS, MLP0, W0, WD0, mlp_inner, mlp_outer, ridge_inner, ridge_outer


class Case:
    """``build(h) -> (params, opt)``; ``stationary`` when ``steps`` converge the inner problem."""

    def __init__(self, inner, outer, h0, build, steps, meta_weights=None, stationary=False) -> None:
        self.inner, self.outer, self.h0, self.build = inner, outer, h0, build
        self.steps, self.meta_weights, self.stationary = steps, meta_weights, stationary

    def fresh(self):
        h = {k: v.clone().requires_grad_() for k, v in self.h0.items()}
        params, opt = self.build(h)
        return h, Problem(self.inner, self.outer, params, opt, self.steps, self.meta_weights, second_order=True)

    def objective(self, h) -> float:
        h = {k: v.detach().clone() for k, v in h.items()}
        params, opt = self.build(h)
        res = unroll(self.inner, params, h, opt, self.steps, graph=False, meta_weights=self.meta_weights)
        return float(res.meta_loss) + (float(self.outer(res.params, h)) if self.outer else 0.0)

    def fd(self, v) -> float:
        plus = self.objective({k: t + FD_EPS * v[k] for k, t in self.h0.items()})
        minus = self.objective({k: t - FD_EPS * v[k] for k, t in self.h0.items()})
        return (plus - minus) / (2 * FD_EPS)


def _mlp_params(h):
    return {k: (h[k] if k in h else v.clone()) for k, v in MLP0.items()}


CASES = {
    "ridge-lr": Case(ridge_inner, ridge_outer, {"lr": torch.tensor(0.05, dtype=torch.float64)},
                     lambda h: ({"w": W0.clone()}, l2o.optim.SGD(lr=h["lr"])), 8),
    "mlp-momentum-init": Case(mlp_inner, mlp_outer, {"momentum": torch.tensor(0.5, dtype=torch.float64),
                                                     "W1": MLP0["W1"].clone()},
                              lambda h: (_mlp_params(h), l2o.optim.Momentum(lr=0.2, momentum=h["momentum"])), 8,
                              META_WEIGHTS),
    "ridge-weight_decay-stationary": Case(ridge_inner, ridge_outer, {"wd": WD0.clone()},
                                          lambda h: ({"w": W0.clone()}, l2o.optim.SGD(lr=0.45)), 30, stationary=True),
}


def options_for(cls, every=None, truncate=None) -> dict:
    """Options shared by name across estimators (never by estimator name): truncation, test-sized PES."""
    names = {f.name for f in fields(cls.options_class)}
    kw = {"every": every}
    if "particles" in names:
        kw.update(particles=4, sigma=1e-4)
    if "truncate" in names:
        kw["truncate"] = truncate
    return kw


def variants(cls) -> list[dict]:
    """Each estimator untruncated, and cut into truncations of 2 steps where it has the option."""
    names = {f.name for f in fields(cls.options_class)}
    return [{}, {"truncate": 2}] if "truncate" in names else [{}]


def run(est, case: Case, generator=None) -> dict | None:
    h, problem = case.fresh()
    try:
        est.check(problem, h)
    except ValueError:
        return None
    state = est.init(problem, h, generator)
    total = {k: torch.zeros_like(v) for k, v in h.items()}
    while not est.done(state):
        g, metrics, state = est.estimate(h, state)
        assert metrics["finite"] == 1.0 and math.isfinite(metrics["meta_loss"])
        assert g.keys() == h.keys() and all(g[k].shape == h[k].shape and g[k].dtype == h[k].dtype for k in h)
        for k in total:
            total[k] += g[k]
    for k, v in case.h0.items():
        assert torch.equal(h[k].detach(), v), "an estimator changed the meta-parameters"
    return total


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_matches_finite_differences(name):
    cls = ESTIMATORS[name]
    accepted = 0
    for case_name, case in CASES.items():
        v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype)
             for k, t in case.h0.items()}
        fd = case.fd(v)
        for variant in variants(cls):
            label = f"{name} {variant} {case_name}"
            if not cls.stochastic:
                est = cls(**options_for(cls, **variant))
                g = run(est, case)
                if g is None:
                    continue
                ours = float(sum((g[k] * v[k]).sum() for k in v))
                if est.exact:
                    assert ours == pytest.approx(fd, rel=1e-6), (label, ours, fd)
                elif case.stationary and not variant:
                    assert ours == pytest.approx(fd, rel=1e-3), (label, ours, fd)
                else:  # a deterministic approximation (truncated backprop): finite, and not the exact value
                    assert math.isfinite(ours)
            else:
                samples = []
                for s in range(8):
                    g = run(cls(**options_for(cls, **variant)), case, torch.Generator().manual_seed(s))
                    if g is None:
                        break
                    samples.append(float(sum((g[k] * v[k]).sum() for k in v)))
                if not samples:
                    continue
                x = torch.tensor(samples, dtype=torch.float64)
                mean, se = float(x.mean()), float(x.std() / math.sqrt(len(x)))
                print(f"{label}: mean {mean:.6g} +- {se:.3g} (finite differences {fd:.6g})")
                assert se > 0 and math.isfinite(mean)
                if not variant or not cls.truncation_bias:  # unbiased: the full unroll, or despite truncation (PES)
                    assert abs(mean - fd) < 4 * se + 1e-3 * abs(fd), (label, mean, se, fd)
            accepted += 1
    assert accepted >= 1, f"estimator {name!r} accepted none of the conformance problems"


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_state_round_trips_mid_run(name):
    """Stop after the first chunk, save the state as a checkpoint would, continue in a fresh estimator: same result."""
    cls = ESTIMATORS[name]
    case = CASES["ridge-weight_decay-stationary"] if name == "implicit" else CASES["mlp-momentum-init"]
    every = case.steps // 2

    def start():
        h, problem = case.fresh()
        est = cls(**options_for(cls, every))
        return h, est, est.init(problem, h, torch.Generator().manual_seed(3))

    h, est, state = start()
    est.estimate(h, state)
    buf = io.BytesIO()
    torch.save(est.state_dict(state), buf)
    g_direct, _, _ = est.estimate(h, state)
    h2, est2, state2 = start()
    buf.seek(0)
    est2.load_state_dict(state2, torch.load(buf, weights_only=True))
    g_resumed, _, state2 = est2.estimate(h2, state2)
    assert est2.done(state2)
    for k in g_direct:
        assert torch.equal(g_direct[k], g_resumed[k]), k
    assert any(bool(g.abs().sum() > 0) for g in g_direct.values())


def test_estimator_options_are_checked():
    with pytest.raises(ValueError, match="unknown estimator 'nope'; choose one of truncated, reverse"):
        l2o.hypergrad.make("nope")
    with pytest.raises(ValueError, match="no option 'sigma'"):
        l2o.hypergrad.make("truncated", sigma=1.0)
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma must be a positive finite number"):
            l2o.hypergrad.make("pes", sigma=bad)
    with pytest.raises(ValueError, match="particles must be a positive integer"):
        l2o.hypergrad.make("es", particles=0)


# ============================================================================= PES and ES against truncation bias
A = torch.tensor([1.0, 4.0], dtype=torch.float64)
T_BIAS, K_BIAS = 8, 2


def _bias_run(estimator, **kw) -> float:
    h = {"lr": torch.tensor(0.1, dtype=torch.float64, requires_grad=True)}
    inner = lambda p, h_, t: 0.5 * (A * p["w"] ** 2).sum()
    params = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    return float(estimator(inner, None, params, h, l2o.optim.SGD(lr=h["lr"]), T_BIAS,
                           meta_weights=[1.0] * T_BIAS, **kw)["lr"])


def _sampled(estimator, truncate, samples=24, particles=10) -> tuple[float, float, float]:
    x = torch.tensor([_bias_run(estimator, truncate=truncate, sigma=1e-3, particles=particles,
                                generator=torch.Generator().manual_seed(s)) for s in range(samples)])
    return float(x.mean()), float(x.std() / math.sqrt(samples)), float(x.var() * particles)


def test_pes_is_unbiased_where_truncated_backprop_is_not():
    """Sum of losses of SGD on a quadratic, learned lr, T=8 as four truncations of 2 steps."""
    exact = _bias_run(reverse)
    trunc = _bias_run(truncated, truncate=K_BIAS)
    mean, se, var = _sampled(pes, K_BIAS)
    print(f"exact {exact:.5f}  truncated {trunc:.5f}  PES {mean:.5f} +- {se:.5f} (per-pair variance {var:.4g})")
    assert abs(trunc - exact) > 6 * se           # truncation is measurably biased ...
    assert abs(mean - exact) < 3 * se            # ... PES is not
    assert abs(mean - trunc) > 5 * se


def test_es_is_unbiased_on_the_full_unroll_and_biased_when_truncated():
    exact = _bias_run(reverse)
    trunc = _bias_run(truncated, truncate=K_BIAS)
    full, se_full, var = _sampled(es, None)
    cut, se_cut, _ = _sampled(es, K_BIAS)
    print(f"exact {exact:.5f}  ES full unroll {full:.5f} +- {se_full:.5f} (per-pair variance {var:.4g})  "
          f"truncated backprop {trunc:.5f}  ES truncated {cut:.5f} +- {se_cut:.5f}")
    assert abs(full - exact) < 3 * se_full
    assert abs(cut - exact) > 6 * se_cut and abs(cut - trunc) < 3 * se_cut  # truncated ES is truncated backprop's bias


def test_pes_functional_contract():
    h = {"lr": torch.tensor(0.1, dtype=torch.float64, requires_grad=True)}
    params = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    opt = l2o.optim.SGD(lr=h["lr"])
    inner = lambda p, h_, t: 0.5 * (A * p["w"] ** 2).sum()
    g1 = pes(inner, None, params, h, opt, 6, truncate=3, particles=2, generator=torch.Generator().manual_seed(0),
             meta_weights=[1.0] * 6)
    g2 = pes(inner, None, params, h, opt, 6, truncate=3, particles=2, generator=torch.Generator().manual_seed(0),
             meta_weights=[1.0] * 6)
    assert g1.keys() == {"lr"} and torch.equal(g1["lr"], g2["lr"]) and torch.isfinite(g1["lr"])
    assert torch.equal(params["w"], torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive integer"):
        pes(inner, None, params, h, opt, 0, meta_weights=[1.0])
    with pytest.raises(ValueError, match="objective is empty"):
        es(inner, None, params, h, opt, 4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        big = {"lr": torch.tensor(1e3, dtype=torch.float64, requires_grad=True)}
        pes(lambda p, h_, t: (p["w"] ** 4).sum(), None, params, big, l2o.optim.SGD(lr=big["lr"]), 20,
            meta_weights=[1.0] * 20)


def test_forward_mode_stops_where_the_shared_unroll_stops():
    """Forward mode runs the one inner step: the same losses, and the same non-finite stop, as ``unroll``."""
    h = {"lr": torch.tensor(0.4, dtype=torch.float64, requires_grad=True)}
    params = {"w": torch.tensor([1.0, 1.6], dtype=torch.float64)}
    inner = lambda p, h_, t: (p["w"] ** 4).sum()
    ref = unroll(inner, params, h, l2o.optim.SGD(lr=h["lr"]), 20, graph=False)
    fu = l2o.hypergrad.ForwardUnroll(inner, params, h, l2o.optim.SGD(lr=h["lr"]), meta_weights=[1.0] * 20)
    assert not ref.finite and not fu.run(20) and not fu.finite
    assert fu.losses == ref.losses and fu.t == len(ref.losses) - 1  # stopped before the step, as unroll does
    assert torch.equal(fu.params["w"], ref.params["w"])
