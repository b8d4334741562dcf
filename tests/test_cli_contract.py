"""The CLI contract: every bad input is one line ``prog: error: ...``, exit 2, no traceback, nothing changed.

One table of bad inputs across meta_train.py, meta_eval.py and the experiments, each
run in-process through ``main(argv)`` from a sandbox folder that holds files a user
might have (a checkpoint, a foreign .pt file, earlier evaluation results, a plain file
where a folder is expected). Every file in the sandbox and the repository's shipped
checkpoints are hashed before and after each call.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys

import pytest
import torch

from l2o import checkpoint, optim

from conftest import write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints")

T, E = "meta_train", "meta_eval"
QUAD = ["--task", "quadratic"]          # no data needed: failures must come from the flag under test
BASE = ["--baselines-only", "--tasks", "quadratic"]

CASES = [
    # meta_train.py: argparse
    (T, ["--bogus"], "unrecognized arguments"),
    (T, ["--horizon", "0"], "--horizon"),
    (T, ["--horizon", "-3"], "--horizon"),
    (T, ["--horizon", "abc"], "--horizon"),
    (T, ["--meta-steps", "0"], "--meta-steps"),
    (T, ["--val-seeds", "0"], "--val-seeds"),
    (T, ["--val-horizons", "0"], "--val-horizons"),
    (T, ["--val-horizons", "100,x"], "--val-horizons"),
    (T, ["--stop-after", "0"], "--stop-after"),
    (T, ["--stop-after", "-2"], "--stop-after"),
    (T, ["--outer-lr", "inf"], "--outer-lr"),
    (T, ["--outer-lr", "nan"], "--outer-lr"),
    (T, ["--output-scale", "nan"], "--output-scale"),
    (T, ["--skip-gain", "nan"], "--skip-gain"),
    (T, ["--optimizer", "sgd", "--learn", "lr", "--lr", "nan"], "--lr"),
    (T, ["--clip", "inf"], "--clip"),
    (T, ["--hidden", "x"], "--hidden"),
    (T, ["--preset", "huge"], "--preset"),
    (T, ["--threads", "0"], "--threads"),
    # meta_train.py: configuration
    (T, ["--truncation", "50", "--horizon", "10"], "--truncation 50 is longer than --horizon 10"),
    (T, ["--schedule", "20:60,x:5"], "--schedule phase 'x:5': the truncation must be a positive integer"),
    (T, ["--schedule", "20:60,100:5@-3e-4"], "the outer learning rate must be a positive number"),
    (T, ["--schedule", ""], "--schedule is empty"),
    (T, ["--schedule", "20:60", "--truncation", "10"], "--truncation and --schedule both given"),
    (T, ["--schedule", "20:60,100:5", "--meta-steps", "10"], "--meta-steps 10 disagrees with --schedule"),
    (T, ["--schedule", "5:2,20:2", "--horizon", "10"], "--schedule truncation 20 is longer than --horizon 10"),
    (T, ["--schedule", "5:2", "--method", "reverse"], "--schedule sets the truncation of --method truncated, pes or es"),
    (T, ["--optimizer", "sgd", "--learn", "lr", "--online", "50", "--horizon", "10", "--truncation", "5"], "--online"),
    (T, ["--outer-lr", "-1"], "--outer-lr must be > 0"),
    (T, ["--val-horizons", "100,200"], "--val-horizons applies to --family runs"),
    (T, ["--device", "banana"], "--device"),
    (T, ["--task", "nope"], "unknown task 'nope'"),
    (T, ["--optimizer", "nope"], "unknown optimizer 'nope'"),
    (T, ["--method", "nope"], "unknown method 'nope'"),
    (T, ["--objective", "nope"], "unknown objective 'nope'"),
    (T, ["--learn", "lr"], "the LSTM learns all its weights"),
    (T, ["--task", "quadratic", "--method", "forward"], "methods that can: truncated, reverse, pes, es"),
    (T, ["--optimizer", "sgd", "--learn", "lr", "--method", "implicit"], "--learn weight_decay"),
    (T, ["--optimizer", "sgd", "--learn", "weight_decay", "--per-parameter", "--meta-batch", "2"], "--meta-batch 1"),
    (T, [*QUAD, "--hidden", "20"], "does not apply"),
    (T, [*QUAD, "--optimizer", "adam", "--learn", "bogus"], "bogus"),
    # meta_train.py: paths
    (T, [*QUAD, "--checkpoint", "{sb}/a_folder"], "is a folder"),
    (T, [*QUAD, "--checkpoint", "{sb}/run/checkpoint.pt"], "exists; pass --resume"),
    (T, [*QUAD, "--checkpoint", "{sb}/garbage.pt", "--resume"], "unreadable"),
    (T, [*QUAD, "--checkpoint", "{sb}/nothing.pt", "--resume"], "no checkpoint at"),
    (T, [*QUAD, "--checkpoint", "{sb}/a_file/ck.pt"], "is a file, not a folder"),
    (T, [*QUAD, "--log-dir", "{sb}/a_file"], "is a file, not a folder"),
    (T, [*QUAD, "--init-from", "{sb}/garbage.pt", "--checkpoint", "{sb}/new.pt"], "unreadable"),
    (T, ["--data-dir", "{sb}/short_data", "--checkpoint", "{sb}/new.pt"], "truncated"),
    # meta_train.py: an empty path or name (an unset shell variable) is not the default
    (T, [*QUAD, "--name", ""], "argument --name: expected a path or name, got ''"),
    (T, [*QUAD, "--log-dir", ""], "argument --log-dir: expected a path or name"),
    (T, [*QUAD, "--checkpoint", ""], "argument --checkpoint: expected a path or name"),
    (T, [*QUAD, "--init-from", "", "--checkpoint", "{sb}/new.pt"], "argument --init-from: expected a path or name"),
    (T, [*QUAD, "--data-dir", "", "--checkpoint", "{sb}/new.pt"], "argument --data-dir: expected a path or name"),
    # a seed whose derived optimizee seeds overflow torch's 64 bits (a traceback at the first unroll)
    (T, [*QUAD, "--seed", "10000000000000", "--checkpoint", "{sb}/new.pt"], "argument --seed: expected an integer with"),
    ("short_horizon", ["--seed", "-99999999999999999999"], "argument --seed: expected an integer with"),
    # cifar10_conv has one FC width: a second --hidden value was silently dropped
    (T, ["--task", "cifar10_conv", "--hidden", "32,64", "--checkpoint", "{sb}/new.pt"],
     "--hidden for cifar10_conv is its one FC width, got [32, 64]"),
    # meta_train.py: --task is not silently dropped for --family; --init-from takes a shipped name
    (T, [*QUAD, "--family", "quadratic", "--checkpoint", "{sb}/new.pt"], "--task quadratic and --family quadratic both given"),
    (T, [*QUAD, "--init-from", "lstm_mnist", "--lstm-hidden", "8", "--checkpoint", "{sb}/new.pt"],
     "--init-from 'lstm_mnist' holds a {'type': 'LSTMOptimizer', 'hidden': 20"),
    # meta_eval.py: argparse
    (E, ["--bogus"], "unrecognized arguments"),
    (E, ["--steps", "0"], "--steps"),
    (E, ["--seeds", "abc"], "--seeds"),
    (E, ["--grid", "1e-3,inf,3"], "--grid"),
    (E, ["--grid", "1,0.1,5"], "--grid"),
    (E, ["--tasks", ""], "--tasks"),
    (E, ["--which", "bogus"], "--which"),
    (E, ["--threads", "0"], "--threads"),
    # meta_eval.py: checks before work
    (E, ["--baselines-only", "--tasks", "quadratic,nope"], "unknown task 'nope'"),
    (E, [*BASE, "--baselines", "adam,lbfgs"], "unknown baseline 'lbfgs'"),
    (E, [*BASE, "--baselines", "none"], "nothing to evaluate"),
    (E, [*BASE, "--device", "banana"], "--device"),
    (E, [*BASE, "--tuning-seeds", "2000"], "--tuning-seeds"),
    (E, [*BASE, "--checkpoint", "{sb}/garbage.pt"], "exclude each other"),
    (E, ["--checkpoint", "{sb}/missing.pt"], "does not exist"),
    (E, ["--checkpoint", "{sb}/garbage.pt"], "unreadable"),
    (E, [*BASE, "--out", "{sb}/a_file"], "is a file, not a folder"),
    (E, [*BASE, "--out", "{sb}/eval"], "already holds results"),
    (E, [*BASE, "--cache-dir", "{sb}/a_file"], "is a file, not a folder"),
    (E, ["--baselines-only", "--tasks", "mnist_mlp", "--data-dir", "{sb}/short_data"], "truncated"),
    (E, [*BASE, "--out", ""], "argument --out: expected a path or name"),
    (E, ["--checkpoint", "{sb}/per_weight.pt", "--tasks", "quadratic"],
     "learned one weight decay per weight of a task with parameters w [10]; task 'quadratic' has x [10]"),
    (E, [*BASE, "--cache-dir", ""], "argument --cache-dir: expected a path or name"),
    (E, [*BASE, "--data-dir", ""], "argument --data-dir: expected a path or name"),
    (E, ["--checkpoint", ""], "argument --checkpoint: expected a path or name"),
    # experiments
    ("hyper_cleaning", ["--bogus"], "unrecognized arguments"),
    ("hyper_cleaning", ["--corrupt", "1.5"], "--corrupt"),
    ("hyper_cleaning", ["--lr", "nan"], "--lr"),
    ("hyper_cleaning", ["--n-train", "0"], "--n-train"),
    ("hyper_cleaning", ["--out", "{sb}/a_file"], "is a file, not a folder"),
    ("hyper_cleaning", ["--out", ""], "argument --out: expected a path or name"),
    ("hyper_cleaning", ["--data-dir", ""], "argument --data-dir: expected a path or name"),
    ("implicit_weight_decay", ["--hyper-lr", "inf"], "--hyper-lr"),
    ("implicit_weight_decay", ["--threads", "0"], "--threads"),
    ("short_horizon", ["--momentum", "nan"], "--momentum"),
    ("short_horizon", ["--lr-range", "1", "nan"], "--lr-range"),
    ("short_horizon", ["--init", "nan", "0.5"], "--init"),
    ("short_horizon", ["--horizons", "0"], "--horizons"),
]
if not torch.cuda.is_available():
    CASES.append((T, [*QUAD, "--device", "cuda"], "CUDA is not available"))


def tree_hashes(*folders: str) -> dict[str, str]:
    out = {}
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as fh:
                    out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> str:
    """A folder of things a user might have: a checkpoint, a foreign .pt, results, a file, a damaged dataset."""
    sb = tmp_path_factory.mktemp("sandbox")
    opt = optim.LSTMOptimizer(hidden=4, layers=1)
    checkpoint.save(str(sb / "run" / "checkpoint.pt"),
                    {"optimizer": checkpoint.optimizer_payload(opt), "best": None, "config": {}, "meta_step": 0})
    (sb / "garbage.pt").write_bytes(b"not a checkpoint")
    per_weight = optim.WeightDecay(optim.SGD(lr=0.1), 1e-3, shapes={"w": [10]})  # another task's parameter names
    checkpoint.save(str(sb / "per_weight.pt"),
                    {"optimizer": checkpoint.optimizer_payload(per_weight), "best": None, "config": {}, "meta_step": 0})
    (sb / "a_file").write_text("a plain file\n")
    (sb / "a_folder").mkdir()
    (sb / "eval").mkdir()
    (sb / "eval" / "results.json").write_text("{}\n")
    (sb / "eval" / "quadratic.png").write_bytes(b"png")
    raw = sb / "short_data" / "MNIST" / "raw"
    write_idx(str(raw), n_train=8, n_test=4)
    with open(raw / "train-images-idx3-ubyte", "r+b") as fh:  # a download cut short
        fh.truncate(1000)
    return str(sb)


def load_main(name: str, monkeypatch):
    if name in (T, E):
        spec = importlib.util.spec_from_file_location(f"{name}_under_contract", os.path.join(ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main, f"{name}.py"
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    return importlib.import_module(name).main, f"{name}.py"


@pytest.mark.parametrize("prog, argv, fragment", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(prog, argv, fragment, sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)  # default outputs (runs/...) would land here, never in the repository
    monkeypatch.setenv("L2O_CACHE_DIR", os.path.join(sandbox, "cache"))
    monkeypatch.setenv("L2O_DATA_DIR", os.path.join(sandbox, "no_data"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's thread count
    main, name = load_main(prog, monkeypatch)
    before = tree_hashes(sandbox, SHIPPED)
    capsys.readouterr()
    try:
        code = main([a.format(sb=sandbox) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{name}: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert tree_hashes(sandbox, SHIPPED) == before


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and {c[0] for c in CASES} >= {T, E, "hyper_cleaning", "implicit_weight_decay",
                                                            "short_horizon"}


def test_a_tilde_path_is_the_home_folder_not_a_folder_named_tilde(tmp_path, monkeypatch, capsys):
    """``--out=~/x`` reaches the program unexpanded (the shell expands ``~`` only at a word's start)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    main, _ = load_main(T, monkeypatch)
    tiny = ["--task", "quadratic", "--lstm-hidden", "3", "--meta-steps", "1", "--horizon", "2", "--truncation", "2",
            "--val-seeds", "1", "--no-progress"]
    assert main([*tiny, "--log-dir=~/runs", "--checkpoint=~/ck.pt"]) == 0, capsys.readouterr().err
    assert (home / "ck.pt").is_file() and (home / "runs").is_dir() and not (work / "~").exists()
    main, _ = load_main(E, monkeypatch)
    assert main(["--baselines-only", "--tasks", "quadratic", "--seeds", "1", "--steps", "3", "--tuning-seeds", "1",
                 "--grid", "0.1,1,2", "--no-progress", "--out=~/eval", "--cache-dir=~/cache"]) == 0
    assert (home / "eval" / "results.json").is_file() and not (work / "~").exists()


def test_a_diverging_run_ends_with_its_message_not_a_tensorboard_traceback(tmp_path, monkeypatch, capsys):
    """Validation of a diverged optimizer gave TensorBoard a histogram of inf update sizes: it raised
    ValueError('The histogram is empty') in the middle of the run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    torch.set_default_dtype(torch.float32)  # the command line's dtype (the float64 fixture restores its own)
    main, _ = load_main(T, monkeypatch)
    code = main(["--task", "quadratic", "--optimizer", "sgd", "--learn", "lr", "--lr", "1e300", "--meta-steps", "1",
                 "--horizon", "2", "--truncation", "2", "--val-seeds", "1", "--no-progress",
                 "--checkpoint", str(tmp_path / "ck.pt")])
    err = capsys.readouterr().err
    assert code == 1 and "all 1 meta-steps were skipped" in err and "Traceback" not in err
