"""README's main command, ``python meta_train.py && python meta_eval.py``, in a fresh copy of the repository.

The two scripts run as a user runs them (separate processes, from the copy's root, only
size flags added so it takes seconds on tiny data in the real formats): the first
writes its run under runs/lstm_mnist/, the second evaluates that run by default, and
the shipped checkpoints are byte-identical afterwards. A second ``meta_eval.py`` refuses
to replace the results without ``--overwrite``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SIZE = ["--horizon", "4", "--truncation", "2", "--meta-steps", "2", "--val-every", "2", "--val-seeds", "1",
              "--lstm-hidden", "4", "--lstm-layers", "1"]
EVAL_SIZE = ["--tasks", "mnist_mlp", "--steps", "3", "--seeds", "2", "--tuning-seeds", "1", "--baselines", "sgd,adam",
             "--grid", "0.01,1,2", "--test-points", "1"]


def digest(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_readme_main_command_in_a_fresh_copy(tmp_path, tiny_data, monkeypatch, capsys):
    repo = tmp_path / "l2o"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__",
                                                              ".pytest_cache", "*.egg-info"))
    shipped = digest(str(repo / "checkpoints"))
    assert "lstm_mnist.pt" in shipped
    env = {**os.environ, "L2O_DATA_DIR": tiny_data, "L2O_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(repo)}

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *args], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600)

    train = run("meta_train.py", *TRAIN_SIZE)
    assert train.returncode == 0, train.stderr
    run_dir = repo / "runs" / "lstm_mnist"
    assert (run_dir / "checkpoint.pt").is_file()  # the checkpoint next to its TensorBoard logs
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    assert "runs/lstm_mnist/checkpoint.pt" in train.stdout
    assert "meta-train: 2/2" in train.stderr  # plain progress lines when stderr is not a terminal

    evaluate = run("meta_eval.py", *EVAL_SIZE)
    assert evaluate.returncode == 0, evaluate.stderr
    results = json.loads((repo / "runs" / "eval" / "results.json").read_text())
    # your run, and the shipped generalist next to it
    assert results["config"]["checkpoints"] == {"lstm_mnist": os.path.join("runs", "lstm_mnist", "checkpoint.pt"),
                                                "lstm_generalist": str(repo / "checkpoints" / "lstm_generalist.pt")}
    assert list(results["tasks"]["mnist_mlp"]["optimizers"]) == ["sgd", "adam", "lstm_mnist", "lstm_generalist"]
    assert "evaluate: " in evaluate.stderr and "ETA" in evaluate.stderr
    assert oct(os.stat(repo / "runs" / "eval" / "results.json").st_mode & 0o777) == oct(0o666 & ~current_umask())

    # run it again: the results are not replaced (in-process: the exit is the thing tested, not the process)
    monkeypatch.chdir(repo)
    spec = importlib.util.spec_from_file_location("meta_eval_fresh_copy", repo / "meta_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    before = (repo / "runs" / "eval" / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        module.main(EVAL_SIZE)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert (repo / "runs" / "eval" / "results.json").read_bytes() == before
    assert digest(str(repo / "checkpoints")) == shipped
    assert not any(n.startswith(".") for n in os.listdir(repo / "checkpoints"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
