"""``AdaptiveScale``: the hypergradient-descent rule by hand, meta-gradients, round trips, the CLI."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import l2o
from l2o import hypergrad, optim

import meta_train

from test_torch_optimizer import adapter_run, batches, functional_run, lstm, make_net


def quadratic(n: int = 6, seed: int = 0):
    """``0.5 (x - x*)^T A (x - x*)`` with eigenvalues 0.5 .. 5: a loss and its exact gradient."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    a = q @ torch.diag(torch.linspace(0.5, 5.0, n)) @ q.T
    target = torch.randn(n, generator=g)

    def loss(p, h=None, t=0):
        d = p["x"] - target
        return 0.5 * d @ a @ d

    return loss, {"x": torch.zeros(n)}, target


def reference(base_lr: float, beta: float, steps: int, loss, x0, shrink: float = 1.0,
              floor: float = -6.0) -> tuple[torch.Tensor, list[float]]:
    """The rule written out for SGD: s += beta * k * cos(-g_t, u_{t-1}) (k = shrink where the cosine is
    negative, else 1), s kept within floor..6; u_t = exp(s) * (-lr g_t)."""
    x, s, u, scales = x0["x"].clone(), 0.0, None, []
    for _ in range(steps):
        xg = x.clone().requires_grad_()
        g = torch.autograd.grad(loss({"x": xg}), xg)[0]
        if u is not None:
            c = float(-(g @ u) / (g.norm() * u.norm()))
            s = min(6.0, max(floor, s + beta * (shrink if c < 0 else 1.0) * c))
        u = torch.exp(torch.tensor(s)) * (-base_lr * g)
        x = x + u
        scales.append(s)
    return x, scales


def run(opt, loss, params, steps):
    state = opt.init(params)
    for t in range(steps):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
        with torch.no_grad():
            params, state = opt.step({k: v.detach() for k, v in p.items()}, grads, state)
    return params, state


def sum_of_losses(opt, loss, x0, steps: int) -> float:
    """The meta-objective the reverse hypergradients differentiate, evaluated without a graph."""
    with torch.no_grad():
        state, p, total = opt.init(x0), dict(x0), 0.0
        for _ in range(steps):
            q = {"x": p["x"].detach().requires_grad_()}
            with torch.enable_grad():
                g = torch.autograd.grad(loss(q), q["x"])[0]
            total += float(loss(q))
            p, state = opt.step({"x": q["x"].detach()}, {"x": g}, state)
        return total


def test_matches_the_rule_written_out():
    loss, x0, _ = quadratic()
    opt = optim.AdaptiveScale(optim.SGD(lr=0.01), beta=0.2)
    params, state = run(opt, loss, x0, 30)
    ref_x, scales = reference(0.01, 0.2, 30, loss, x0)
    # (theta - lr g) - theta loses a few bits per step against the reference's -lr g
    torch.testing.assert_close(params["x"], ref_x, rtol=1e-7, atol=1e-9)
    assert float(state["s"]) == pytest.approx(scales[-1], abs=1e-7) and abs(scales[-1]) > 0.05


@pytest.mark.parametrize("lr", [0.01, 0.39])
def test_shrink_matches_the_rule_written_out(lr):
    """shrink K: negative cosines move s at K times the rate (0.39 oscillates on the largest curvature, so the
    run has both signs); K = 1 is the plain rule and leaves the config as it was."""
    loss, x0, _ = quadratic()
    opt = optim.AdaptiveScale(optim.SGD(lr=lr), beta=0.2, shrink=0.4)
    params, state = run(opt, loss, x0, 30)
    ref_x, scales = reference(lr, 0.2, 30, loss, x0, shrink=0.4)
    torch.testing.assert_close(params["x"], ref_x, rtol=1e-7, atol=1e-9)
    assert float(state["s"]) == pytest.approx(scales[-1], abs=1e-7)
    plain_x, plain_scales = reference(lr, 0.2, 30, loss, x0)
    assert abs(scales[-1] - plain_scales[-1]) > 0.05  # the factor changed the run
    rebuilt = optim.from_config(opt.config())
    assert rebuilt.shrink == 0.4 and rebuilt.config() == opt.config()
    assert "shrink" not in optim.AdaptiveScale(optim.SGD(lr=0.1), shrink=1.0).config()  # old configs unchanged
    for bad in (0.0, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="shrink must be a positive number"):
            optim.AdaptiveScale(optim.SGD(lr=0.1), shrink=bad)


def test_floor_matches_the_rule_written_out():
    """min_log_scale stops the rule's shrinking there: at lr 0.5 (above 2 / the largest curvature, 5) the plain
    rule shrinks s to about -1.4; floored at -0.4 the run sits on the floor and follows the rule written out."""
    loss, x0, _ = quadratic()
    plain_x, plain_scales = reference(0.5, 0.3, 30, loss, x0)
    assert min(plain_scales) < -1.0
    opt = optim.AdaptiveScale(optim.SGD(lr=0.5), beta=0.3, min_log_scale=-0.4)
    params, state = run(opt, loss, x0, 30)
    ref_x, scales = reference(0.5, 0.3, 30, loss, x0, floor=-0.4)
    torch.testing.assert_close(params["x"], ref_x, rtol=1e-6, atol=1e-8)
    assert min(scales) == -0.4 and float(state["s"]) == pytest.approx(scales[-1], abs=1e-7)
    rebuilt = optim.from_config(opt.config())
    assert rebuilt.min_log_scale == -0.4 and rebuilt.config() == opt.config()
    assert "min_log_scale" not in optim.AdaptiveScale(optim.SGD(lr=0.1)).config()  # old configs unchanged
    assert optim.AdaptiveScale(optim.SGD(lr=0.1)).min_log_scale == -6.0
    for bad, init in ((0.5, 0.0), (-1.0, -1.5), (-7.0, 0.0), (math.nan, 0.0)):
        with pytest.raises(ValueError, match="min_log_scale must lie within"):
            optim.AdaptiveScale(optim.SGD(lr=0.1), init_log_scale=init, min_log_scale=bad)


def test_first_step_is_the_base_step():
    loss, x0, _ = quadratic()
    for base in (optim.SGD(lr=0.05), optim.Adam(lr=0.1), lstm()):
        mine, _ = run(optim.AdaptiveScale(copy.deepcopy(base), beta=0.5), loss, x0, 1)
        ref, _ = run(copy.deepcopy(base), loss, x0, 1)
        torch.testing.assert_close(mine["x"], ref["x"], rtol=1e-14, atol=1e-14)


def test_start_below_the_base_scale():
    """init_log_scale s0: the first step is the base step times exp(s0), then the written-out rule from s0."""
    loss, x0, _ = quadratic()
    mine, _ = run(optim.AdaptiveScale(optim.SGD(lr=0.05), beta=0.5, init_log_scale=-1.5), loss, x0, 1)
    ref, _ = run(optim.SGD(lr=0.05 * math.exp(-1.5)), loss, x0, 1)
    torch.testing.assert_close(mine["x"], ref["x"], rtol=1e-12, atol=1e-14)
    opt = optim.AdaptiveScale(optim.SGD(lr=0.01), beta=0.2, init_log_scale=-1.0)
    params, state = run(opt, loss, x0, 30)
    x, s, u = x0["x"].clone(), -1.0, None
    for _ in range(30):
        xg = x.clone().requires_grad_()
        g = torch.autograd.grad(loss({"x": xg}), xg)[0]
        if u is not None:
            s = min(6.0, max(-6.0, s + 0.2 * float(-(g @ u) / (g.norm() * u.norm()))))
        u = math.exp(s) * (-0.01 * g)
        x = x + u
    torch.testing.assert_close(params["x"], x, rtol=1e-7, atol=1e-9)
    assert float(state["s"]) == pytest.approx(s, abs=1e-7)
    rebuilt = optim.from_config(opt.config())
    assert rebuilt.init_log_scale == -1.0 and rebuilt.config() == opt.config()
    assert "init_log_scale" not in optim.AdaptiveScale(optim.SGD(lr=0.1)).config()  # old configs unchanged
    with pytest.raises(ValueError, match="init_log_scale must lie within"):
        optim.AdaptiveScale(optim.SGD(lr=0.1), init_log_scale=-7.0)


@pytest.mark.parametrize("lr, grows", [(1e-3, True), (0.39, False)])
def test_scale_moves_toward_a_working_step(lr, grows):
    """Too short steps (SGD 1e-3 on curvature 0.5..5) grow the scale; oscillating ones (lr 0.39 -> 1.95 on the
    largest eigenvalue) shrink it, and either way the run ends closer to the optimum than the base alone."""
    loss, x0, target = quadratic()
    adapted, state = run(optim.AdaptiveScale(optim.SGD(lr=lr), beta=0.3), loss, x0, 60)
    plain, _ = run(optim.SGD(lr=lr), loss, x0, 60)
    assert (float(state["s"]) > 1.0) if grows else (float(state["s"]) < -0.1)
    assert float(loss(adapted)) < 0.5 * float(loss(plain))


@pytest.mark.parametrize("lr, shrink", [(0.02, 1.0), (0.39, 0.5)])
def test_meta_gradient_matches_finite_differences(lr, shrink):
    loss, x0, _ = quadratic()
    opt = optim.AdaptiveScale(optim.SGD(lr=lr), beta=0.3, shrink=shrink)
    hp = {"log_beta": opt.log_beta, "log_lr": opt.base.log_lr}
    grads = hypergrad.reverse(loss, None, x0, hp, opt, 12, meta_weights=[1.0] * 12)

    eps = 1e-6
    for name, param in hp.items():
        with torch.no_grad():
            param += eps
            up = sum_of_losses(opt, loss, x0, 12)
            param -= 2 * eps
            down = sum_of_losses(opt, loss, x0, 12)
            param += eps
        assert float(grads[name]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_config_round_trip_and_torch_optimizer_adapter(tmp_path):
    fopt = optim.AdaptiveScale(lstm(), beta=0.4)
    with torch.no_grad():
        fopt.log_beta += 0.1
    check_round_trip_and_adapter(fopt)


def check_round_trip_and_adapter(fopt) -> None:
    """``fopt`` rebuilt from its config and weights is the same optimizer, and the torch.optim adapter
    around it trains a network as the functional steps do."""
    rebuilt = optim.from_config(fopt.config())
    rebuilt.load_state_dict(fopt.state_dict())
    assert rebuilt.config() == fopt.config() and rebuilt.hparams() == pytest.approx(fopt.hparams())
    net, data = make_net(), batches(15)
    ref_params, ref_losses = functional_run(copy.deepcopy(net), rebuilt, data)
    losses = adapter_run(net, l2o.LearnedOptimizer(net.parameters(), fopt), data)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-9)
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), ref_params[k], rtol=1e-9, atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta must be > 0"):
        optim.AdaptiveScale(optim.SGD(lr=0.1), beta=0.0)
    with pytest.raises(TypeError, match="wraps a DifferentiableOptimizer"):
        optim.AdaptiveScale("adam")
    with pytest.raises(ValueError, match="no hyperparameter 'momentum'"):
        optim.AdaptiveScale(optim.SGD(lr=0.1)).learn(["momentum"])


def tiny_run_args(tmp_path, meta_steps: int) -> list[str]:
    """meta_train.py flags for a run of seconds: a 4-unit LSTM on quadratics, validated at its last meta-step."""
    return ["--task", "quadratic", "--lstm-hidden", "4", "--horizon", "6", "--truncation", "3", "--meta-steps",
            str(meta_steps), "--val-every", str(meta_steps), "--val-seeds", "2", "--log-dir", str(tmp_path),
            "--no-progress"]


def run_from(tmp_path, argv: list[str], name: str, source: str):
    """Run meta_train.py ``argv`` as ``name`` from run ``source``'s weights; the run's current optimizer."""
    assert meta_train.main(argv + ["--name", name, "--init-from", str(tmp_path / source / "checkpoint.pt")]) == 0
    return l2o.load_optimizer(str(tmp_path / name / "checkpoint.pt"), which="current")


def assert_one_outer_step_apart(src, out) -> None:
    """One meta-step of outer Adam moved every weight by at most ~lr from the source's."""
    for (k, a), (_, b) in zip(src.state_dict().items(), out.state_dict().items()):
        assert (a - b).abs().max() < 5e-3, k


def test_meta_train_wraps_and_starts_from_a_plain_checkpoint(tmp_path, capsys):
    common = tiny_run_args(tmp_path, meta_steps=2)
    assert meta_train.main(common + ["--name", "plain"]) == 0
    src = l2o.load_optimizer(str(tmp_path / "plain" / "checkpoint.pt"), which="current")
    out = run_from(tmp_path, common + ["--adaptive-scale", "0.25", "--meta-steps", "1"], "wrapped", "plain")
    assert isinstance(out, optim.AdaptiveScale) and isinstance(out.base, optim.LSTMOptimizer)
    assert_one_outer_step_apart(src, out.base)
    assert 0.2 < out.hparams()["beta"] < 0.3
    capsys.readouterr()
    assert meta_train.main(common + ["--name", "bad", "--adaptive-scale", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adaptive-scale must be a positive number" in err[0]


def test_meta_train_adaptive_scale_init(tmp_path, capsys):
    """--adaptive-scale-init S0 reaches the wrapper (and its saved config); a wrapper run starts from another
    wrapper's weights whatever that one's start; S0 without the wrapper or out of range is one line, exit 2."""
    common = tiny_run_args(tmp_path, meta_steps=1) + ["--adaptive-scale", "0.25"]
    assert meta_train.main(common + ["--name", "a", "--adaptive-scale-init", "-0.7"]) == 0
    first = l2o.load_optimizer(str(tmp_path / "a" / "checkpoint.pt"), which="current")
    assert first.init_log_scale == -0.7 and first.config()["init_log_scale"] == -0.7
    assert float(first.init({"x": torch.zeros(3)})["s"]) == pytest.approx(-0.7)
    assert meta_train.main(common + ["--name", "b", "--init-from", str(tmp_path / "a" / "checkpoint.pt")]) == 0
    second = l2o.load_optimizer(str(tmp_path / "b" / "checkpoint.pt"), which="current")
    assert second.init_log_scale == 0.0 and "init_log_scale" not in second.config()
    capsys.readouterr()
    for argv, needle in ((["--task", "quadratic", "--adaptive-scale-init", "-1"], "needs --adaptive-scale"),
                         (common + ["--adaptive-scale-init", "7"], "must lie within -6..6")):
        assert meta_train.main(argv + ["--log-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_meta_train_plus_floor(tmp_path, capsys):
    """--plus-floor S bounds the added optimizer's adapted scale only (the LSTM's stays unbounded) and is
    saved; without --plus / --adaptive-scale, or outside -6..0, it is one line and exit 2, no run folder."""
    common = tiny_run_args(tmp_path, meta_steps=1) + ["--adaptive-scale", "0.25"]
    assert meta_train.main(common + ["--name", "f", "--plus", "adam:0.01", "--plus-floor", "-0.5"]) == 0
    out = l2o.load_optimizer(str(tmp_path / "f" / "checkpoint.pt"), which="current")
    assert [p.min_log_scale for p in out.parts] == [-6.0, -0.5]
    assert out.parts[1].config()["min_log_scale"] == -0.5 and "min_log_scale" not in out.parts[0].config()
    # --init-from such a run with other rule settings (no floor, shrink 0.7): the weights carry over, the
    # run's own settings win, as for the starting scale
    assert meta_train.main(common + ["--name", "g", "--plus", "adam:0.01", "--adaptive-scale-shrink", "0.7",
                                     "--init-from", str(tmp_path / "f" / "checkpoint.pt")]) == 0
    again = l2o.load_optimizer(str(tmp_path / "g" / "checkpoint.pt"), which="best")
    assert [p.min_log_scale for p in again.parts] == [-6.0, -6.0] and [p.shrink for p in again.parts] == [0.7, 0.7]
    capsys.readouterr()
    for argv, needle in ((common + ["--plus-floor", "-0.5"], "needs --plus and --adaptive-scale"),
                         (["--task", "quadratic", "--plus", "adam:0.01", "--plus-floor", "-0.5"],
                          "needs --plus and --adaptive-scale"),
                         (common + ["--plus", "adam:0.01", "--plus-floor", "0.5"], "must lie within -6..0"),
                         (common + ["--plus", "adam:0.01", "--plus-floor", "-7"], "must lie within -6..0")):
        code = meta_train.main(argv + ["--log-dir", str(tmp_path / "bad"), "--name", "x"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad" / "x").exists()


def test_meta_train_adaptive_scale_shrink(tmp_path, capsys):
    """--adaptive-scale-shrink K reaches every adapted scale (--plus's too) and the saved config; without
    --adaptive-scale, or not a positive number, it is one line and exit 2 with no run folder made."""
    common = tiny_run_args(tmp_path, meta_steps=1) + ["--adaptive-scale", "0.25"]
    assert meta_train.main(common + ["--name", "k", "--adaptive-scale-shrink", "0.7", "--plus", "adam:0.01"]) == 0
    out = l2o.load_optimizer(str(tmp_path / "k" / "checkpoint.pt"), which="current")
    assert isinstance(out, optim.Sum) and [p.shrink for p in out.parts] == [0.7, 0.7]
    assert all(p.config()["shrink"] == 0.7 for p in out.parts)
    capsys.readouterr()
    for argv, needle in ((["--task", "quadratic", "--adaptive-scale-shrink", "0.5"], "needs --adaptive-scale"),
                         (common + ["--adaptive-scale-shrink", "0"], "must be a positive number"),
                         (common + ["--adaptive-scale-shrink", "nan"], "finite")):
        try:  # argparse refuses 'nan' itself (SystemExit 2); the config refuses the rest (returns 2)
            code = meta_train.main(argv + ["--log-dir", str(tmp_path / "bad"), "--name", "x"])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad" / "x").exists()
