"""Evaluation: seeded rollouts, learning-rate tuning and its cache, the suite's reports."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from l2o import checkpoint, optim, report, suite, tasks
from l2o.evaluate import log_grid, rollout, split_metrics, tune_lr
from l2o.suite import Entry, TuningCache
from l2o.tasks import Task


def tiny_mlp(data_dir: str) -> Task:
    return tasks.get("mnist_mlp", data_dir=data_dir, hidden=[4], batch_size=8)


class Recording(Task):
    """Delegates to a dataset task and fingerprints every batch and every initialisation it hands out."""

    def __init__(self, inner: Task) -> None:
        self.inner, self.seen = inner, []

    def init(self, generator):
        params = self.inner.init(generator)
        self.seen.append(("init", round(sum(float(p.sum()) for p in params.values()), 12)))
        return params

    def batch(self, split, generator):
        x, y = self.inner.batch(split, generator)
        self.seen.append((split, round(float(x.sum()), 9), tuple(y.tolist())))
        return x, y

    def loss(self, params, batch):
        return self.inner.loss(params, batch)


class Planted(Task):
    """1-d ``h/2 (x - 1)^2`` from ``x = 0``: one SGD step with ``lr = 1/h`` lands on the minimum exactly."""

    def __init__(self, h: float) -> None:
        self.h = h

    def init(self, generator):
        return {"x": torch.zeros(1)}

    def batch(self, split, generator):
        return None

    def loss(self, params, batch):
        return 0.5 * self.h * ((params["x"] - 1.0) ** 2).sum()

    def config(self):
        return {"h": self.h}


# ---------------------------------------------------------------------------- seeded rollouts
def test_same_seed_same_init_and_batches_for_every_optimizer(tiny_data):
    lstm = optim.LSTMOptimizer(hidden=4, layers=1)
    seen = {}
    for name, opt in {"sgd": optim.make("sgd", lr=0.5), "adam": optim.make("adam", lr=0.01), "lstm": lstm}.items():
        task = Recording(tiny_mlp(tiny_data))
        rollout(task, opt, seed=7, steps=5, n_final=3)
        seen[name] = task.seen
    assert len(seen["sgd"]) == 1 + 5 + 3  # init, 5 training batches, 3 final-loss batches
    assert seen["sgd"] == seen["adam"] == seen["lstm"]
    other = Recording(tiny_mlp(tiny_data))
    rollout(other, optim.make("sgd", lr=0.5), seed=8, steps=5, n_final=3)
    assert other.seen[0] != seen["sgd"][0] and other.seen[1:6] != seen["sgd"][1:6]


def test_same_seed_same_curve(tiny_data):
    for task in (tiny_mlp(tiny_data), tasks.get("quadratic", dim=3)):
        a, b = (rollout(task, optim.make("adam", lr=0.05), seed=3, steps=6) for _ in range(2))
        assert a.curve == b.curve and a.final_loss == b.final_loss
        c = rollout(task, optim.make("sgd", lr=0.01), seed=3, steps=6)
        assert c.curve[0] == a.curve[0] and c.curve[1:] != a.curve[1:]  # same problem and init, own updates


def test_rollout_measures_test_split_at_requested_steps(tiny_data):
    task = tiny_mlp(tiny_data)
    r = rollout(task, optim.make("adam", lr=0.05), seed=1, steps=4, eval_at=[0, 2, 4])
    assert sorted(r.extra["test"]) == [0, 2, 4]
    assert r.extra["test"][4] == split_metrics(task, r.params)
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in r.extra["test"].values())
    assert split_metrics(task, r.params, chunk=7) == pytest.approx(split_metrics(task, r.params), rel=1e-12)
    q = tasks.get("quadratic", dim=3)
    rq = rollout(q, optim.make("sgd", lr=0.01), seed=1, steps=3, eval_at=[3])
    assert rq.extra["test"][3]["accuracy"] is None
    assert rq.extra["test"][3]["loss"] == pytest.approx(rq.final_loss)  # deterministic loss: test == train


def test_rollout_divergence_is_reported_not_raised():
    r = rollout(tasks.get("quadratic", dim=5), optim.make("sgd", lr=100.0), seed=0, steps=50, eval_at=[50])
    assert r.diverged and r.final_loss == math.inf and len(r.curve) == 50 and r.curve[-1] == math.inf
    assert 50 not in r.extra["test"]


# ---------------------------------------------------------------------------- tuning
def test_tuner_finds_planted_learning_rate():
    grid = log_grid(1e-3, 1e1, 9)
    best, scores = tune_lr(Planted(1.0 / grid[4]), lambda lr: optim.make("sgd", lr=lr), grid, [0], steps=1)
    assert best == grid[4] and scores[best] == pytest.approx(0.0, abs=1e-20)
    assert all(scores[lr] > 1e-6 for lr in grid if lr != best)


def test_tuner_widens_a_grid_whose_best_rate_is_at_the_edge():
    grid = log_grid(1e-3, 1e-1, 5)  # planted rate 1.0 lies two grid steps above the top
    best, scores = tune_lr(Planted(1.0), lambda lr: optim.make("sgd", lr=lr), grid, [0], steps=1)
    assert best == grid[-1]
    best, scores = tune_lr(Planted(1.0), lambda lr: optim.make("sgd", lr=lr), grid, [0], steps=1, extend=5)
    assert best == pytest.approx(1.0, rel=1e-9)
    assert len(scores) == 5 + 3  # 0.316, 1.0, then 3.16 shows 1.0 is inside: stop


def test_tune_caches_by_task_steps_grid_and_seeds(tmp_path, monkeypatch):
    cache = TuningCache(str(tmp_path))
    grid = log_grid(1e-3, 1e1, 9)
    first = suite.tune(Planted(1.0 / grid[4]), "planted", "sgd", 1, grid, [0, 1], cache)
    assert first["lr"] == grid[4] and not first["cached"] and not first["at_edge"]
    monkeypatch.setattr(suite, "tune_lr", lambda *a, **k: pytest.fail("cache missed"))
    again = suite.tune(Planted(1.0 / grid[4]), "planted", "sgd", 1, grid, [0, 1], cache)
    assert again == {**first, "cached": True}
    for changed in ({"steps": 2}, {"seeds": [0]}, {"grid": grid[:-1]}, {"name": "adam"}):
        args = {"steps": 1, "seeds": [0, 1], "grid": grid, "name": "sgd", **changed}
        with pytest.raises(pytest.fail.Exception, match="cache missed"):
            suite.tune(Planted(1.0 / grid[4]), "planted", args["name"], args["steps"], args["grid"], args["seeds"],
                       cache)
    with pytest.raises(pytest.fail.Exception):  # another task config is another key
        suite.tune(Planted(0.5), "planted", "sgd", 1, grid, [0, 1], cache)
    (tmp_path / "tuning.json").write_text("{not json")  # a damaged cache is only a miss
    assert TuningCache(str(tmp_path)).get("anything") is None


# ---------------------------------------------------------------------------- summaries
def test_summarize_counts_diverged_runs_and_keeps_stats_finite():
    from l2o.evaluate import Rollout

    runs = [Rollout([3.0, 2.0, 1.0], 1.0, {}, extra={"test": {3: {"loss": 1.5, "accuracy": 0.5}}}),
            Rollout([3.0, 1.0, 0.5], 0.4, {}, extra={"test": {3: {"loss": 1.0, "accuracy": 0.7}}}),
            Rollout([3.0, math.inf, math.inf], math.inf, {}, diverged=True, extra={"test": {}})]
    s = report.summarize(runs, [1, 2, 3])
    assert s["diverged"] == 1
    assert s["final_loss"]["mean"] == pytest.approx(0.7) and s["final_loss"]["per_seed"][2] is None
    assert s["test_accuracy"]["mean"] == pytest.approx(0.6)
    assert s["curve"]["mean"] == pytest.approx([3.0, 1.5, 0.75])
    assert s["checkpoints"] == [{"step": 3, "test_loss": pytest.approx(1.25), "test_accuracy": pytest.approx(0.6)}]
    json.dumps(s, allow_nan=False)


# ---------------------------------------------------------------------------- suite plumbing
def test_select_and_optional_tasks(tiny_data, monkeypatch):
    assert [e.name for e in suite.select(None)] == [e.name for e in suite.SUITE]
    assert [e.name for e in suite.select(["quadratic", "mnist_mlp"])] == ["quadratic", "mnist_mlp"]
    with pytest.raises(ValueError, match="unknown task 'nope'.*mnist_mlp"):
        suite.select(["nope"])

    def missing(name, **opts):
        raise tasks.DataNotFoundError(f"{name} data missing")

    monkeypatch.setattr(suite.tasks, "get", missing)
    notes = []
    assert suite.build_tasks([suite.ENTRIES["cifar10_conv"]], tiny_data, log=notes.append) == []
    assert notes == ["note: skipping cifar10_conv: cifar10_conv data missing"]
    with pytest.raises(tasks.DataNotFoundError):
        suite.build_tasks([suite.ENTRIES["mnist_mlp"]], tiny_data)


def save_optimizer(path: str, opt) -> str:
    checkpoint.save(path, {"optimizer": checkpoint.optimizer_payload(opt), "best": None, "config": {}, "meta_step": 0})
    return path


def test_load_learned_names_and_errors(tmp_path):
    lstm = save_optimizer(str(tmp_path / "lstm_mnist.pt"), optim.LSTMOptimizer(hidden=4, layers=1))
    hyper = save_optimizer(str(tmp_path / "adam.pt"), optim.make("adam", lr=0.02))
    learned = suite.load_learned([lstm, hyper])
    assert list(learned) == ["lstm_mnist", "adam_1"]  # a stem never shadows a baseline's name
    assert learned["adam_1"][1].hparams()["lr"] == pytest.approx(0.02)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        suite.load_learned([str(tmp_path / "missing.pt")])


def test_run_writes_reports_that_round_trip(tiny_data, tmp_path):
    built = suite.build_tasks([Entry("tiny_mlp", "mnist_mlp", {"hidden": [4], "batch_size": 8}, 4, "tiny MLP"),
                               Entry("quadratic", "quadratic", {"dim": 3}, 4, "3-d quadratics")], tiny_data)
    learned = suite.load_learned([save_optimizer(str(tmp_path / "lstm.pt"), optim.LSTMOptimizer(hidden=4, layers=1))])
    out = str(tmp_path / "out")
    results = suite.run(built, learned, out, baselines=["sgd", "adam"], seeds=[1000, 1001], tuning_seeds=[0],
                        grids={"sgd": (0.01, 1.0, 3), "adam": (0.01, 0.1, 2)}, cache=TuningCache(str(tmp_path)),
                        n_checkpoints=2, progress=False, log=lambda m: None)
    loaded = report.load_results(os.path.join(out, "results.json"))
    assert loaded == {"format": report.FORMAT, "version": report.VERSION, **report.clean(results)}
    with open(os.path.join(out, "results.md")) as fh:
        assert fh.read() == report.markdown(loaded)
    mlp = loaded["tasks"]["tiny_mlp"]
    assert list(mlp["optimizers"]) == ["sgd", "adam", "lstm"] and mlp["steps"] == 4
    adam = mlp["optimizers"]["adam"]
    assert adam["lr"] in (0.01, 0.1) and adam["kind"] == "baseline" and len(adam["curve"]["mean"]) == 4
    assert [c["step"] for c in adam["checkpoints"]] == [2, 4]
    assert 0.0 <= adam["test_accuracy"]["mean"] <= 1.0
    assert mlp["optimizers"]["lstm"]["kind"] == "learned" and mlp["optimizers"]["lstm"]["lr"] is None
    assert loaded["tasks"]["quadratic"]["optimizers"]["sgd"]["test_accuracy"]["mean"] is None
    for name in ("tiny_mlp", "quadratic"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000
        for opt in ("sgd", "adam", "lstm"):
            assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb", name, opt)))
    assert "| adam |" in report.markdown(loaded) and "tiny MLP" in report.markdown(loaded)
    with pytest.raises(ValueError, match="overlap"):
        suite.run(built, {}, out, seeds=[0], tuning_seeds=[0], progress=False)
