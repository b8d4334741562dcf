"""``Sum``: the updates of several optimizers added; meta-gradients, round trips, ``--plus`` on the CLI."""
from __future__ import annotations

import pytest
import torch

import l2o
from l2o import hypergrad, optim

import meta_train

from test_adaptive_scale import (assert_one_outer_step_apart, check_round_trip_and_adapter, quadratic, run, run_from,
                                 sum_of_losses, tiny_run_args)
from test_torch_optimizer import lstm


def test_two_sgds_add_up_to_one():
    loss, x0, _ = quadratic()
    summed, _ = run(optim.Sum([optim.SGD(lr=0.03), optim.SGD(lr=0.05)]), loss, x0, 7)
    single, _ = run(optim.SGD(lr=0.08), loss, x0, 7)
    torch.testing.assert_close(summed["x"], single["x"], rtol=1e-12, atol=1e-12)


def test_each_part_keeps_its_own_state():
    """Adam + Momentum summed: each part's update is the one it makes alone from the same (params, grads, state)."""
    loss, x0, _ = quadratic(5, seed=3)
    parts = [optim.Adam(lr=0.02), optim.Momentum(lr=0.01, momentum=0.8)]
    opt = optim.Sum(parts)
    params, state = dict(x0), opt.init(x0)
    for _ in range(5):
        p = {"x": params["x"].detach().requires_grad_()}
        grads = {"x": torch.autograd.grad(loss(p), p["x"])[0]}
        alone = [part.step({"x": params["x"]}, grads, s)[0]["x"] for part, s in zip(parts, state["parts"])]
        params, state = opt.step({"x": params["x"]}, grads, state)
        expect = alone[0] + (alone[1] - p["x"].detach())
        torch.testing.assert_close(params["x"], expect, rtol=1e-12, atol=1e-12)


def test_meta_gradient_reaches_every_part_and_matches_finite_differences():
    loss, x0, _ = quadratic()
    opt = optim.Sum([optim.AdaptiveScale(optim.SGD(lr=0.02), beta=0.3),
                     optim.AdaptiveScale(optim.Adam(lr=0.01), beta=0.2)])
    hp = dict(opt.named_parameters())
    assert set(hp) == {"parts.0.log_beta", "parts.0.base.log_lr", "parts.1.log_beta", "parts.1.base.log_lr",
                       "parts.1.base.logit_beta1", "parts.1.base.logit_beta2"}
    grads = hypergrad.reverse(loss, None, x0, hp, opt, 10, meta_weights=[1.0] * 10)

    eps = 1e-4  # fourth-order differences: beta2 = 0.999 sits where its logit's map bends sharply
    for name, param in hp.items():
        f = {}
        with torch.no_grad():
            for k in (-2, -1, 1, 2):
                param += k * eps
                f[k] = sum_of_losses(opt, loss, x0, 10)
                param -= k * eps
        fd = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * eps)
        assert float(grads[name]) != 0.0, name
        assert float(grads[name]) == pytest.approx(fd, rel=1e-6, abs=1e-10), name


def test_config_round_trip_and_torch_optimizer_adapter():
    fopt = optim.Sum([optim.AdaptiveScale(lstm(), beta=0.4, init_log_scale=-0.7),
                      optim.AdaptiveScale(optim.Adam(lr=0.003), beta=0.3)])
    with torch.no_grad():
        fopt.parts[1].base.log_lr += 0.2
    assert set(fopt.hparams()) == {"0.beta", "1.beta", "1.lr", "1.beta1", "1.beta2"}
    check_round_trip_and_adapter(fopt)


def test_learn_selects_in_the_parts_that_have_the_name():
    opt = optim.Sum([optim.Momentum(lr=0.1, momentum=0.5), optim.Adam(lr=0.01)])
    opt.learn(["momentum"])
    assert [n for n, p in opt.named_parameters() if p.requires_grad] == ["parts.0.logit_momentum"]
    opt.learn(["lr"])
    assert sorted(n for n, p in opt.named_parameters() if p.requires_grad) == ["parts.0.log_lr", "parts.1.log_lr"]
    opt.learn(None)
    assert all(p.requires_grad for p in opt.parameters())
    with pytest.raises(ValueError, match="no hyperparameter 'beta3'"):
        opt.learn(["beta3"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="two or more"):
        optim.Sum([optim.SGD(lr=0.1)])
    with pytest.raises(TypeError, match="DifferentiableOptimizers"):
        optim.Sum([optim.SGD(lr=0.1), "adam"])


def test_meta_train_plus_starts_its_first_part_from_a_checkpoint(tmp_path, capsys):
    common = tiny_run_args(tmp_path, meta_steps=1)
    assert meta_train.main(common + ["--name", "plain"]) == 0
    src = l2o.load_optimizer(str(tmp_path / "plain" / "checkpoint.pt"), which="current")
    out = run_from(tmp_path, common + ["--adaptive-scale", "0.25", "--plus", "adam:0.003"], "mix", "plain")
    assert isinstance(out, optim.Sum) and [type(p).__name__ for p in out.parts] == ["AdaptiveScale", "AdaptiveScale"]
    lstm_part, adam_part = out.parts[0].base, out.parts[1].base
    assert isinstance(lstm_part, optim.LSTMOptimizer) and isinstance(adam_part, optim.Adam)
    assert_one_outer_step_apart(src, lstm_part)  # started from the source's weights
    assert 0.002 < adam_part.hparams()["lr"] < 0.0045 and 0.2 < out.parts[1].hparams()["beta"] < 0.3
    # a sum starts from a sum whatever either one's starting scale
    again = run_from(tmp_path, common + ["--adaptive-scale", "0.25", "--adaptive-scale-init", "-1.4", "--plus",
                                         "adam:0.003"], "mix2", "mix")
    assert again.parts[0].init_log_scale == -1.4
    assert_one_outer_step_apart(out, again)
    # without --adaptive-scale the added part is the plain optimizer
    assert meta_train.main(common + ["--name", "plain_plus", "--plus", "sgd:0.01"]) == 0
    plain = l2o.load_optimizer(str(tmp_path / "plain_plus" / "checkpoint.pt"), which="current")
    assert [type(p).__name__ for p in plain.parts] == ["LSTMOptimizer", "SGD"]
    capsys.readouterr()
    for bad in ("adam", "adam:0", "adam:x", "lstm:0.1", "foo:1"):
        assert meta_train.main(common + ["--name", "bad", "--plus", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--plus" in err[0] and "NAME:LR" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_meta_train_learns_only_the_wrappers_hyperparameters_of_a_fixed_lstm(tmp_path, capsys):
    common = tiny_run_args(tmp_path, meta_steps=1)
    assert meta_train.main(common + ["--name", "plain"]) == 0
    src = l2o.load_optimizer(str(tmp_path / "plain" / "checkpoint.pt"), which="current")
    wrap = ["--adaptive-scale", "0.25", "--plus", "adam:0.003"]
    out = run_from(tmp_path, common + wrap + ["--learn", "beta,lr", "--outer-lr", "0.05"], "fixed", "plain")
    for (k, a), (_, b) in zip(src.state_dict().items(), out.parts[0].base.state_dict().items()):
        assert torch.equal(a, b), k  # the LSTM's weights are exactly the source's
    h = out.hparams()
    assert h["0.beta"] != 0.25 and h["1.beta"] != 0.25 and h["1.lr"] != 0.003  # the named ones moved
    assert h["1.beta1"] == pytest.approx(0.9) and h["1.beta2"] == pytest.approx(0.999)  # the others did not
    capsys.readouterr()
    assert meta_train.main(common + ["--name", "bad", "--learn", "beta"]) == 2  # nothing wraps the LSTM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adaptive-scale and --plus" in err[0], err
    assert meta_train.main(common + wrap + ["--name", "bad", "--learn", "momentum"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "momentum" in err[0], err
    assert not (tmp_path / "bad").exists()
