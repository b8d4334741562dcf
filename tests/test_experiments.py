"""Smoke tests: each experiment's --quick mode on the tiny data writes a figure, TensorBoard and sane JSON."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def experiments(monkeypatch):
    """Import the experiment scripts by name; restore the torch thread count they set."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.delitem(sys.modules, "common", raising=False)  # the scripts' own helpers, not another "common"
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)


def run_quick(experiments, name: str, data: str, out: str) -> dict:
    result = experiments(name).main(["--quick", "--data-dir", data, "--out", out])
    assert os.path.isfile(os.path.join(out, f"{name}.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    with open(os.path.join(out, "results.json")) as fh:
        saved = json.load(fh)
    assert saved["experiment"] == name and saved["runtime_s"] >= 0 and "--quick" in saved["command"]
    assert saved == json.loads(json.dumps(result))
    return saved


def is_finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_short_horizon_quick(experiments, tiny_data, tmp_path):
    r = run_quick(experiments, "short_horizon", tiny_data, str(tmp_path))
    assert r["horizons"] == [4, 8, 16] and len(r["points"]) == 3
    for h in ("4", "8", "16"):
        b = r["best"][h]
        assert 0.03 <= b["lr0"] <= 1.0 and 0.0 <= b["decay"] <= 1.5 and is_finite(b["loss_at_h"], b["loss_long"])
        assert b["loss_at_h"] == min(p["loss"][h] for p in r["points"] if p["loss"][h] is not None)
        assert 0.0 <= b["test_acc_long"] <= 1.0
    fwd, onl = r["forward"], r["online"]
    assert fwd["horizon"] == 4 and len(fwd["trajectory"]) <= 3 and is_finite(fwd["lr0"], fwd["decay"], fwd["loss_long"])
    assert fwd["decay"] >= 0.0 and onl["decay"] >= 0.0  # the projection keeps decay >= 0
    assert onl["steps"] == 12 and len(onl["trajectory"]) == 4 and is_finite(onl["final_loss"])
    assert set(r["shows_bias"]) == {"short_best_decays_faster", "short_best_ends_worse", "forward_mode_ends_worse"}


def test_implicit_weight_decay_quick(experiments, tiny_data, tmp_path):
    r = run_quick(experiments, "implicit_weight_decay", tiny_data, str(tmp_path))
    assert r["n_hyperparameters"] == 784 * 16 + 16 + 16 * 10 + 10
    for name in ("learned", "baseline"):
        f = r["final"][name]
        assert is_finite(f["val_loss"], f["train_loss"], f["test_loss"]) and 0.0 <= f["test_acc"] <= 1.0
        assert f["min_val_loss"] <= f["val_loss"]
    c = r["cost"]
    assert is_finite(c["training_step_ms"], c["hypergradient_ms"], c["ratio"]) and c["ratio"] > 0
    assert 0 < c["neumann_alpha"] and len(r["decay_trajectory"]) == 3
    assert all(d[1] > 0 for d in r["decay_trajectory"])  # softplus keeps every decay positive


def test_hyper_cleaning_quick(experiments, tiny_data, tmp_path):
    r = run_quick(experiments, "hyper_cleaning", tiny_data, str(tmp_path))
    assert r["n_train"] == 60 and 10 <= r["corrupted"] <= 50
    for key in ("all_data", "clean_only", "hyper_cleaned", "joint"):
        assert 0.0 <= r[key]["test_acc"] <= 1.0 and is_finite(r[key]["val_loss"])
    for key in ("hyper_cleaned", "joint"):
        run = r[key]
        assert all(0.0 <= run[m] <= 1.0 for m in ("precision", "recall", "f1"))
        assert len(run["history"]) >= 1 and is_finite(run["lr"])
    assert r["hyper_cleaned"]["lr"] == 0.5  # only the joint run learns the learning rate
    h = r["hyper_cleaned"]["history"]
    assert h[-1]["w_clean"] > h[-1]["w_corrupt"]  # even a few steps push corrupted examples down


@pytest.mark.parametrize("name, argv, message", [
    ("hyper_cleaning", ["--n-train", "100000"], "asked for"),
    ("implicit_weight_decay", ["--n-val", "0"], "positive integer"),
    ("short_horizon", ["--lr-range", "1", "0.1"], "0 < LO < HI"),
    ("short_horizon", ["--horizons", "10,x"], "comma-separated"),
])
def test_bad_input_exits_2_with_one_line(experiments, tiny_data, tmp_path, capsys, name, argv, message):
    with pytest.raises(SystemExit) as exc:
        experiments(name).main(["--quick", "--data-dir", tiny_data, "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}.py: error:" in err[0] and message in err[0]


def test_implicit_cost_benchmark_smoke(experiments, tmp_path):  # the fixture restores the thread count
    spec = importlib.util.spec_from_file_location("implicit_cost", os.path.join(ROOT, "benchmarks", "implicit_cost.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--hidden", "8", "--examples", "5", "--reps", "1", "--steps", "1", "--iters", "1",
                      "--out", str(tmp_path / "cost.json")])
    assert set(out["neumann"]) == {1, 5} and out["n_hyperparameters"] == 784 * 8 + 8 + 8 * 10 + 10
    assert all(r["ratio_to_training_step"] > 0 for r in out["neumann"].values())
    assert os.path.isfile(tmp_path / "cost.json")


def test_hyper_cleaning_without_corrupted_examples_finishes(experiments, tiny_data, tmp_path):
    """--corrupt 0 ran every meta-step, then lost the results to a histogram of no corrupted weights."""
    out = str(tmp_path)
    r = experiments("hyper_cleaning").main(["--quick", "--corrupt", "0", "--data-dir", tiny_data, "--out", out])
    assert r["corrupted"] == 0 and os.path.isfile(os.path.join(out, "results.json"))
