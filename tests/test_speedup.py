"""Speedup over tuned Adam: the definition on hand-made curves, the per-task plumbing, meta_eval's outputs."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from l2o import checkpoint, optim, report
from l2o.speedup import (add_speedups, comparison_curve, format_speedup, geomean_speedups, reach_step, smooth,
                         speedup)

ADAM = [4.0, 3.0, 2.0, 1.5, 1.0]  # horizon T = 4, final loss 1.0
INF, NAN = math.inf, math.nan


# ---------------------------------------------------------------------------- reaching a loss
def test_reach_step_interpolates_and_ignores_dips_that_are_not_held():
    assert reach_step([4.0, 2.0, 1.0, 1.0, 0.5], 1.0) == 2.0
    assert reach_step([4.0, 3.0, 0.5, 0.5, 0.5], 1.0) == pytest.approx(1.8)  # 1 + (3 - 1) / (3 - 0.5)
    assert reach_step([4.0, 0.5, 3.0, 2.0, 0.9], 1.0) == pytest.approx(3 + 1 / 1.1)  # the dip at step 1 is lost
    assert reach_step([0.5, 0.6, 0.4], 1.0) == 0.0
    assert reach_step([4.0, 3.0, 2.0], 1.0) is None  # ends above
    assert reach_step([4.0, 3.0, 2.0], NAN) is None
    assert reach_step([4.0, INF, 0.5, 0.5], 1.0) == 2.0  # back from a non-finite point: no line to follow
    assert reach_step([4.0, None, NAN, 0.5], 1.0) == 3.0
    assert reach_step([4.0, 3.0, 0.5], 1.0, steps=[0, 10, 20]) == pytest.approx(18.0)


# ---------------------------------------------------------------------------- the speedup
def test_ahead_is_horizon_over_the_steps_to_adams_final_loss():
    assert speedup([4.0, 2.0, 1.0, 1.0, 0.5], ADAM) == pytest.approx(4 / 2)
    assert speedup([4.0, 3.0, 0.5, 0.5, 0.5], ADAM) == pytest.approx(4 / 1.8)
    assert speedup([4.0, 0.5, 3.0, 2.0, 0.9], ADAM) == pytest.approx(4 / (3 + 1 / 1.1))  # a lucky dip gains nothing


def test_behind_is_adams_steps_to_the_learned_final_loss_over_horizon():
    assert speedup([4.0, 3.5, 3.0, 2.5, 2.0], ADAM) == pytest.approx(2 / 4)
    assert speedup([4.0, 3.5, 3.0, 2.8, 2.5], ADAM) == pytest.approx(1.5 / 4)  # Adam passes 2.5 at 1 + 0.5 / 1


def test_equal_curves_give_one_and_exact_ties_are_split_by_who_got_there_first():
    assert speedup(ADAM, ADAM) == 1.0
    assert speedup([4.0, 1.0, 1.0, 1.0, 1.0], [4.0, 1.0, 1.0, 1.0, 1.0]) == 1.0  # a plateau is no head start
    assert speedup([4.0, 0.0, 0.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]) == pytest.approx(4.0)  # both solve it
    assert speedup([4.0, 3.0, 2.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)


def test_steps_are_clamped_to_one_and_the_horizon():
    below_from_the_start = [0.5, 0.5, 0.5, 0.5, 0.5]
    assert speedup(below_from_the_start, ADAM) == 4.0  # at Adam's final loss before its first step: >= T
    assert speedup(ADAM, below_from_the_start) == 0.25
    assert format_speedup(4.0, 4) == "≥ 4x" and format_speedup(0.25, 4) == "≤ 0.25x"
    assert format_speedup(2.0, 4) == "2x" and format_speedup(None, 4) == "—"


def test_non_finite_curves():
    for diverged in ([4.0, 3.0, INF, INF, INF], [4.0, None, NAN, None, None], [4.0, 3.0, 2.0, 1.0, -INF]):
        assert speedup(diverged, ADAM) == 0.25  # never reaches a finite loss: at most 1/T
        assert speedup(ADAM, diverged) == 4.0  # Adam diverged: at least T
    assert speedup([4.0, INF, INF, INF, INF], [4.0, 3.0, NAN, NAN, NAN]) is None  # both: undefined


def test_curves_recorded_every_k_steps():
    steps = [0, 10, 20, 30, 40]
    assert speedup([4.0, 3.0, 0.5, 0.5, 0.5], ADAM, steps) == pytest.approx(40 / 18)
    assert speedup([4.0, 3.5, 3.0, 2.8, 2.5], ADAM, steps) == pytest.approx(15 / 40)
    assert speedup([0.5] * 5, ADAM, steps) == 40.0


def test_speedup_agrees_with_the_final_losses_and_is_antisymmetric():
    rng = np.random.default_rng(0)
    horizon = 30
    for _ in range(300):
        a, b = (np.exp(-np.cumsum(rng.uniform(-0.05, 0.2, horizon + 1)) * rng.uniform(0.2, 2.0)) for _ in range(2))
        s = speedup(a.tolist(), b.tolist())
        assert 1 / horizon <= s <= horizon
        assert (s > 1) == (a[-1] < b[-1]) and (s < 1) == (a[-1] > b[-1])
        assert s * speedup(b.tolist(), a.tolist()) == pytest.approx(1.0, rel=1e-12)


def test_bad_curves_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        speedup([1.0, 0.5], ADAM)
    with pytest.raises(ValueError, match="start at 0"):
        speedup(ADAM, ADAM, steps=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="increase"):
        reach_step([2.0, 1.0, 0.5], 1.0, steps=[0, 2, 2])
    with pytest.raises(ValueError, match="at least 2"):
        speedup([1.0], [1.0])


# ---------------------------------------------------------------------------- from results to speedups
def summary(mean, final, diverged=0):
    """One optimizer's entry of results.json, as much of it as the speedup and the table read."""
    return {"curve": {"mean": mean}, "final_loss": {"mean": final, "std": 0.0}, "diverged": diverged,
            "seeds": [1, 2], "lr": None, "test_loss": None, "test_accuracy": None, "kind": "baseline"}


def test_comparison_curve_is_the_smoothed_mean_then_the_final_loss():
    s = summary([5.0, 1.0, 5.0, 2.0, 2.0], 1.5)
    assert comparison_curve(s, window=3) == pytest.approx([3.0, 11 / 3, 8 / 3, 3.0, 2.0, 1.5])
    assert comparison_curve(s, window=1) == [5.0, 1.0, 5.0, 2.0, 2.0, 1.5]
    assert comparison_curve(summary([5.0, 1.0, 5.0, 2.0, 2.0], 1.5, diverged=1), window=1)[-1] == INF
    assert comparison_curve(summary([5.0, None], None), window=1)[-1] == INF
    ramp = list(np.linspace(2.0, 1.0, 100))
    assert comparison_curve(summary(ramp, 0.9))[:-1] == pytest.approx(smooth(np.array(ramp), 5).tolist())  # 5%


def hand_made_results() -> dict:
    """Three tasks of horizon 4 (smoothing window 1) with known speedups, and one task without Adam."""
    def task(**opts):
        return {"task": "hand-made", "steps": 4, "optimizers": opts}

    adam = [4.0, 3.0, 2.0, 1.5]  # comparison curve: ADAM
    tasks = {
        "a": task(adam=summary(adam, 1.0), lstm=summary([4.0, 2.0, 1.0, 1.0], 0.5), sgd=summary([4.0] * 4, 2.5)),
        "b": task(adam=summary(adam, 1.0), lstm=summary([4.0, 3.5, 3.0, 2.5], 2.0), sgd=summary([4.0] * 4, 2.5)),
        "c": task(adam=summary(adam, 1.0), lstm=summary([0.5] * 4, 0.5), sgd=summary([4.0] * 4, None, diverged=2)),
        "no_adam": task(lstm=summary([4.0] * 4, 1.0)),
    }
    for t in tasks.values():
        add_speedups(t)
    return {"tasks": tasks, "speedup_vs_adam": geomean_speedups(tasks)}


def test_add_speedups_and_geometric_mean():
    results = hand_made_results()
    tasks, geo = results["tasks"], results["speedup_vs_adam"]
    for name in "abc":
        assert tasks[name]["optimizers"]["adam"]["speedup_vs_adam"] == 1.0
    assert [tasks[n]["optimizers"]["lstm"]["speedup_vs_adam"] for n in "abc"] == pytest.approx([2.0, 0.5, 4.0])
    assert [tasks[n]["optimizers"]["lstm"]["steps_to_adam"] for n in "abc"] == [2.0, None, 0.0]
    assert [tasks[n]["optimizers"]["sgd"]["speedup_vs_adam"] for n in "abc"] == pytest.approx([1.5 / 4, 1.5 / 4, 0.25])
    assert tasks["no_adam"]["optimizers"]["lstm"]["speedup_vs_adam"] is None
    assert list(geo) == ["lstm", "sgd"]  # Adam itself is left out; a task without Adam counts for nobody
    assert geo["lstm"] == {"geomean": pytest.approx(4.0 ** (1 / 3)), "tasks": 3, "undefined": 0, "ahead": 2,
                           "bounds": 1}
    assert geo["sgd"]["geomean"] == pytest.approx((0.375 * 0.375 * 0.25) ** (1 / 3)) and geo["sgd"]["bounds"] == 1
    del tasks["no_adam"]
    text = report.markdown(results)
    assert "speedup vs Adam" in text and "| 2x |" in text and "| ≥ 4x |" in text and "| ≤ 0.25x |" in text
    assert "geometric mean over tasks" in text and f"| lstm | {4.0 ** (1 / 3):.3g}x | 3 | 2/3 | 1 |" in text


def test_speedup_plot(tmp_path):
    report.plot_speedups(str(tmp_path / "speedup.png"), hand_made_results())
    assert (tmp_path / "speedup.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- meta_eval end to end
def test_meta_eval_reports_speedups_and_their_geometric_mean(monkeypatch, tmp_path, tiny_data, capsys):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meta_eval.py")
    spec = importlib.util.spec_from_file_location("meta_eval_speedup_test", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    ckpt = str(tmp_path / "my_lstm.pt")
    checkpoint.save(ckpt, {"optimizer": checkpoint.optimizer_payload(optim.LSTMOptimizer(hidden=4, layers=1)),
                           "best": None, "config": {}, "meta_step": 0})
    out = tmp_path / "out"
    assert cli.main(["--checkpoint", ckpt, "--tasks", "mnist_mlp,quadratic", "--steps", "3", "--seeds", "2",
                     "--tuning-seeds", "1", "--baselines", "sgd,adam", "--grid", "0.01,1,2", "--test-points", "1",
                     "--data-dir", tiny_data, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    logs = {"sgd": [], "my_lstm": []}
    for t in results["tasks"].values():
        adam = t["optimizers"]["adam"]
        assert adam["speedup_vs_adam"] == 1.0
        for name in logs:
            o = t["optimizers"][name]
            s = o["speedup_vs_adam"]
            assert 1 / 3 <= s <= 3
            assert s == pytest.approx(speedup(comparison_curve(o), comparison_curve(adam)), rel=1e-12)
            if not o["diverged"] and not adam["diverged"]:  # the sign agrees with the table's final losses
                assert (s > 1) == (o["final_loss"]["mean"] < adam["final_loss"]["mean"])
            logs[name].append(math.log(s))
    geo = results["speedup_vs_adam"]
    assert list(geo) == ["sgd", "my_lstm"]
    for name, values in logs.items():
        assert geo[name]["tasks"] == 2 and geo[name]["geomean"] == pytest.approx(math.exp(np.mean(values)))
        assert f"| {name} | {geo[name]['geomean']:.3g}x | 2 |" in printed
    assert "speedup vs Adam" in (out / "results.md").read_text()
    assert (out / "speedup.png").stat().st_size > 1000
