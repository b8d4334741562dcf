"""``python meta_eval.py``: one-line errors with exit code 2, and a tiny run end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from l2o import checkpoint, optim, suite, tasks

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meta_eval.py")


@pytest.fixture
def cli(tmp_path):
    """Run a copy of meta_eval.py from an empty folder (so no shipped checkpoint is found)."""
    script = tmp_path / "meta_eval.py"
    shutil.copy(SCRIPT, script)
    env = {**os.environ, "L2O_CACHE_DIR": str(tmp_path / "cache"), "L2O_DATA_DIR": str(tmp_path / "no-data")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    return run


def save_lstm(path) -> str:
    opt = optim.LSTMOptimizer(hidden=4, layers=1)
    checkpoint.save(str(path), {"optimizer": checkpoint.optimizer_payload(opt), "best": None, "config": {},
                                "meta_step": 0})
    return str(path)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meta_eval.py: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def load_cli(monkeypatch, tmp_path):
    """The CLI module, imported in-process (fast), its shipped-checkpoint path pointed at an empty folder."""
    spec = importlib.util.spec_from_file_location("meta_eval_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SHIPPED_CHECKPOINT", str(tmp_path / "checkpoints" / "lstm_mnist.pt"))
    monkeypatch.setattr(module, "SHIPPED_GENERALIST", str(tmp_path / "checkpoints" / "lstm_generalist.pt"))
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) land in the test's folder
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main() must not change this process's threads
    return module


def test_no_arguments_without_shipped_checkpoint_exits_2(cli):
    assert_one_line_error(cli(), "no optimizer to evaluate", "checkpoints/lstm_mnist.pt", "--checkpoint")


def test_help_lists_the_suite(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_cli(monkeypatch, tmp_path).main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(e.name in text for e in suite.SUITE) and "--checkpoint" in text and "--data-dir" in text


@pytest.mark.parametrize("args, fragments", [
    ((), ("no optimizer to evaluate", "--checkpoint")),
    (("--checkpoint", "{tmp}/missing.pt"), ("missing.pt' does not exist",)),
    (("--checkpoint", "{tmp}/garbage.pt"), ("unreadable",)),
    (("--baselines-only", "--tasks", "mnist_mlp,nope"), ("unknown task 'nope'", "quadratic")),
    (("--baselines-only", "--steps", "0"), ("--steps", "positive integer")),
    (("--baselines-only", "--grid", "1,0.1,5"), ("--grid", "0 < LO <= HI")),
    (("--baselines-only", "--baselines", "adam,lbfgs"), ("unknown baseline 'lbfgs'",)),
    (("--baselines-only", "--device", "nonsense"), ("bad --device",)),
    (("--baselines-only", "--checkpoint", "{tmp}/garbage.pt"), ("exclude each other",)),
    (("--baselines-only", "--tasks", "mnist_mlp"), ("MNIST files missing",)),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, args, fragments):
    cli_module = load_cli(monkeypatch, tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")

    def no_data(name, **opts):  # what a missing data root raises, without trying a download
        raise tasks.DataNotFoundError("MNIST files missing under DATA; pass --data-dir")

    monkeypatch.setattr(suite.tasks, "get", no_data)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meta_eval.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]


def test_tiny_end_to_end_run(cli, tmp_path, tiny_data):
    ckpt = save_lstm(tmp_path / "my_lstm.pt")
    out = tmp_path / "out"
    proc = cli("--checkpoint", ckpt, "--tasks", "mnist_mlp,quadratic", "--steps", "3", "--seeds", "2",
               "--tuning-seeds", "1", "--baselines", "sgd,adam", "--grid", "0.01,1,2", "--test-points", "1",
               "--data-dir", tiny_data, "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "| my_lstm |" in proc.stdout and "## quadratic" in proc.stdout  # the table is printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["mnist_mlp", "quadratic"]
    for task in results["tasks"].values():
        assert list(task["optimizers"]) == ["sgd", "adam", "my_lstm"] and task["steps"] == 3
        assert task["optimizers"]["adam"]["lr"] in (0.01, 1.0, 0.1, 10.0)  # the grid, possibly widened
    assert (out / "results.md").read_text().startswith("# Evaluation results")
    assert (out / "mnist_mlp.png").stat().st_size > 1000 and (out / "quadratic.png").stat().st_size > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb" / "mnist_mlp" / "my_lstm"))
    assert (tmp_path / "cache" / "tuning.json").exists()  # $L2O_CACHE_DIR
