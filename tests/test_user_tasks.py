"""User tasks: from_module on tensors and datasets, register, import paths in the CLIs, the examples."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import l2o
from l2o.tasks import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TASK_FILE = os.path.join(EXAMPLES, "user_tasks.py")


def load_script(name: str):
    """A script at the repository root or in examples/, imported in-process."""
    path = os.path.join(ROOT, name)
    spec = importlib.util.spec_from_file_location(f"under_test_{os.path.basename(name)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys, prog: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


class Pairs(Dataset):
    """A map-style dataset of (x, y) pairs, as a user would write one."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].numpy(), int(self.y[i])


def data(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float32)
    return x, (x[:, 0] > 0).long()


def test_from_module_reads_tensors_tensordatasets_and_datasets_alike():
    x, y = data()
    build = lambda: nn.Linear(6, 2)  # noqa: E731
    tasks = [l2o.tasks.from_module(build, (x, y), batch_size=5), l2o.tasks.from_module(build, TensorDataset(x, y)),
             l2o.tasks.from_module(build, Pairs(x, y), test_data=Pairs(*data(8, 1)))]
    for t in tasks:
        tx, ty = t.full_batch("train")
        assert tx.dtype == torch.float64 and ty.dtype == torch.int64  # floats cast to the default dtype
        torch.testing.assert_close(tx, x.double(), rtol=0, atol=0)
        assert torch.equal(ty, y)
    assert tasks[0].full_batch("test")[0].shape == (30, 6) and tasks[2].full_batch("test")[0].shape == (8, 6)
    xb, yb = tasks[0].batch("train", torch.Generator().manual_seed(0))
    assert xb.shape == (5, 6) and yb.shape == (5,)
    params = tasks[0].init(torch.Generator().manual_seed(0))
    assert 0.0 <= float(tasks[0].accuracy(params, (xb, yb))) <= 1.0
    regression = l2o.tasks.from_module(build, (x, x[:, :2]), loss=lambda o, t: ((o - t) ** 2).mean())
    assert regression.accuracy(params, regression.full_batch("train")) is None


def test_from_module_bad_inputs():
    x, y = data()
    with pytest.raises(TypeError, match="function that builds the model"):
        l2o.tasks.from_module(nn.Linear(6, 2), (x, y))
    with pytest.raises(ValueError, match="same, positive number"):
        l2o.tasks.from_module(lambda: nn.Linear(6, 2), (x, y[:3]))
    with pytest.raises(TypeError, match="map-style Dataset"):
        l2o.tasks.from_module(lambda: nn.Linear(6, 2), 42)
    with pytest.raises(ValueError, match="batch_size"):
        l2o.tasks.from_module(lambda: nn.Linear(6, 2), (x, y), batch_size=0)


def test_register_and_resolve(monkeypatch):
    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))
    monkeypatch.setattr(registry, "_SIGNATURES", dict(registry._SIGNATURES))
    x, y = data()
    fixed = l2o.tasks.from_module(lambda: nn.Linear(6, 2), (x, y))
    l2o.tasks.register("fixed_task", fixed)
    l2o.tasks.register("fixed_task", fixed)  # the same task again: fine
    assert l2o.tasks.get("fixed_task") is fixed and l2o.tasks.options("fixed_task") == []

    def make(width: int = 3, batch_size: int = 4):
        return l2o.tasks.from_module(lambda: nn.Sequential(nn.Linear(6, width), nn.Linear(width, 2)), (x, y),
                                     batch_size=batch_size)

    l2o.tasks.register("made", make)
    assert l2o.tasks.options("made") == ["width", "batch_size"]
    task = l2o.tasks.get("made", width=5, device="cpu", data_dir=None)  # device/data_dir handled for every task
    assert task.name == "made" and task.config() == {"width": 5}
    assert task.init(torch.Generator())["0.weight"].shape == (5, 6)
    with pytest.raises(ValueError, match="no option 'depth'.*width, batch_size"):
        l2o.tasks.get("made", depth=2)
    with pytest.raises(ValueError, match="already registered"):
        l2o.tasks.register("made", fixed)
    with pytest.raises(ValueError, match="already registered"):
        l2o.tasks.register("quadratic", make)
    with pytest.raises(TypeError, match="register a Task"):
        l2o.tasks.register("bad", 3)
    l2o.tasks.register("bad", lambda: "not a task")
    with pytest.raises(ValueError, match="not an l2o Task"):
        l2o.tasks.get("bad")
    # resolve: what a task family holds (Task, name, import path or factory) becomes a Task
    assert l2o.tasks.resolve(fixed) is fixed
    assert l2o.tasks.resolve("made", width=2).init(torch.Generator())["0.weight"].shape == (2, 6)
    assert l2o.tasks.resolve(make, width=4).init(torch.Generator())["0.weight"].shape == (4, 6)
    assert isinstance(l2o.tasks.resolve(f"{TASK_FILE}:wide_task"), l2o.tasks.UserTask)


@pytest.mark.parametrize("path, fragment", [
    ("no_such_package.tasks:make", "cannot import task 'no_such_package.tasks:make': ModuleNotFoundError"),
    ("os.path:no_such_function", "has no attribute 'no_such_function'"),
    ("os:sep", "is a str, not a Task"),
    ("missing/file.py:make", "task file 'missing/file.py'"),
    (":make", "bad task import path"),
    ("nope", "or give an import path package.module:function"),
])
def test_bad_import_paths_are_one_line(path, fragment):
    with pytest.raises(ValueError) as info:
        l2o.tasks.get(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_import_path_from_the_working_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "my_package"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(
        "import torch, l2o\nfrom torch import nn\n"
        "def make_task(batch_size=8):\n"
        "    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))\n"
        "    return l2o.tasks.from_module(lambda: nn.Linear(3, 2), (x, (x[:, 0] > 0).long()), batch_size=batch_size)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    task = l2o.tasks.get("my_package.tasks:make_task", batch_size=3)
    assert task.batch("train", torch.Generator())[0].shape == (3, 3)
    assert str(tmp_path) not in sys.path  # the cwd is put on the path only for the import


# ----------------------------------------------------------------------------- the CLIs
def test_meta_train_on_a_user_family_by_import_path(tmp_path, capsys):
    cli = load_script("meta_train.py")
    ck = tmp_path / "ck.pt"
    argv = ["--task", f"{TASK_FILE}:TeacherFamily", "--lstm-hidden", "4", "--horizon", "4", "--truncation", "2",
            "--meta-steps", "2", "--meta-batch", "2", "--val-every", "2", "--val-seeds", "1", "--batch-size", "16",
            "--log-dir", str(tmp_path / "runs"), "--checkpoint", str(ck), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    saved = torch.load(ck, weights_only=True)
    assert saved["meta_step"] == 2 and saved["config"]["task"] == f"{TASK_FILE}:TeacherFamily"
    assert cli.main(argv[:-3] + ["--checkpoint", str(ck), "--resume", "--meta-steps", "3", "--no-progress"]) == 0
    assert torch.load(ck, weights_only=True)["meta_step"] == 3  # resuming re-imports the task


@pytest.mark.parametrize("task, fragment", [
    ("no_such_package.tasks:make", "cannot import task"),
    (f"{TASK_FILE}:nothing_here", "has no attribute 'nothing_here'"),
])
def test_meta_train_bad_import_path_exits_2(tmp_path, capsys, task, fragment):
    ck = tmp_path / "ck.pt"
    code = load_script("meta_train.py").main(["--task", task, "--checkpoint", str(ck), "--no-progress",
                                              "--log-dir", str(tmp_path / "runs")])
    assert code == 2 and fragment in one_error_line(capsys, "meta_train.py")
    assert not ck.exists() and not (tmp_path / "runs").exists()


def test_meta_train_rejects_options_a_user_task_lacks(tmp_path, capsys):
    code = load_script("meta_train.py").main(["--task", f"{TASK_FILE}:wide_task", "--hidden", "5",
                                              "--checkpoint", str(tmp_path / "ck.pt"), "--no-progress"])
    assert code == 2 and "--hidden does not apply" in one_error_line(capsys, "meta_train.py")


def test_meta_eval_on_a_user_task_by_import_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cli = load_script("meta_eval.py")
    out = tmp_path / "out"
    argv = ["--baselines-only", "--tasks", f"{TASK_FILE}:wide_task,quadratic", "--steps", "3", "--seeds", "1",
            "--tuning-seeds", "1", "--baselines", "adam", "--grid", "0.01,0.1,2", "--test-points", "1", "--no-cache",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["wide_task", "quadratic"]
    user = results["tasks"]["wide_task"]
    assert user["task"] == f"{TASK_FILE}:wide_task" and user["optimizers"]["adam"]["test_accuracy"]["mean"] > 0
    assert (out / "wide_task.png").exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["--baselines-only", "--tasks", "no_such_package.tasks:make", "--out", str(tmp_path / "o2")])
    assert info.value.code == 2 and "cannot import task" in one_error_line(capsys, "meta_eval.py")
    assert not (tmp_path / "o2").exists()


def test_meta_eval_on_a_regression_task_reports_test_loss_without_accuracy(tmp_path, monkeypatch):
    """A user's regression model (float targets, MSE) through meta_eval's test-split evaluation: the test loss
    is measured in chunks as for images and the accuracy is absent (it used to fail on float(None))."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cli = load_script("meta_eval.py")
    out = tmp_path / "out"
    task = os.path.join(ROOT, "benchmarks", "regression_tasks.py") + ":targets_x001"
    argv = ["--baselines-only", "--tasks", task, "--steps", "4", "--seeds", "2", "--tuning-seeds", "1",
            "--baselines", "adam", "--grid", "0.001,0.01,2", "--test-points", "2", "--no-cache", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    adam = json.loads((out / "results.json").read_text())["tasks"]["targets_x001"]["optimizers"]["adam"]
    assert adam["test_loss"]["mean"] > 0 and adam["test_accuracy"]["mean"] is None
    x = data()[0]
    small = l2o.tasks.from_module(lambda: nn.Linear(6, 1), (x, x[:, :1]), loss=lambda p, t: ((p - t) ** 2).mean())
    params = small.init(torch.Generator().manual_seed(0))
    whole = l2o.evaluate.split_metrics(small, params)
    chunked = l2o.evaluate.split_metrics(small, params, chunk=7)  # 30 points: chunks of 7, 7, 7, 7, 2
    assert whole["accuracy"] is None and chunked["accuracy"] is None
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_heldout_tasks_take_the_data_dir_and_run_in_meta_eval(tiny_data, tmp_path, monkeypatch):
    """benchmarks/heldout_tasks.py: each variant builds on the tiny data files from --data-dir (not ./data) with
    the settings it names, and meta_eval evaluates them as user tasks."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.delenv("L2O_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here: only --data-dir can find the files
    module = load_script("benchmarks/heldout_tasks.py")
    conv = module.conv_c32_h64_b64(data_dir=tiny_data)
    assert (conv.channels, conv.hidden, conv.batch_size) == (32, 64, 64)
    assert module.mnist_b512(data_dir=tiny_data).batch_size == 512
    assert module.fashion_3x32_tanh(data_dir=tiny_data).hidden == [32, 32, 32]
    assert module.quadratic_5d().init(torch.Generator().manual_seed(0))["x"].numel() == 5
    cli = load_script("meta_eval.py")
    path = os.path.join(ROOT, "benchmarks", "heldout_tasks.py")
    tasks = ",".join(f"{path}:{name}" for name in ("mnist_2x64_relu_b64", "conv_c32_h64_b64", "quadratic_5d",
                                                     "cifar10_mlp_relu"))
    argv = ["--data-dir", tiny_data, "--baselines-only", "--tasks", tasks, "--steps", "3", "--seeds", "1",
            "--tuning-seeds", "1", "--baselines", "adam", "--grid", "0.001,0.01,2", "--test-points", "1",
            "--no-cache", "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert sorted(results) == ["cifar10_mlp_relu", "conv_c32_h64_b64", "mnist_2x64_relu_b64", "quadratic_5d"]
    assert results["cifar10_mlp_relu"]["optimizers"]["adam"]["test_accuracy"]["mean"] is not None  # labels: accuracy


# ----------------------------------------------------------------------------- the examples, tiny
def test_example_cifar10_training_loop(tiny_data, tmp_path, capsys):
    plot = tmp_path / "curves.png"
    code = load_script("examples/train_cifar10.py").main(
        ["--data-dir", tiny_data, "--steps", "4", "--batch-size", "8", "--log-every", "2", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0 and plot.stat().st_size > 1000
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["2", "4"] and all(float(v) > 0 for r in rows for v in r[1:])
    assert "l2o: test loss" in out and "adam: test loss" in out
    code = load_script("examples/train_cifar10.py").main(["--data-dir", str(tmp_path / "none"), "--steps", "1"])
    assert code == 2


@pytest.mark.parametrize("script,argv", [("examples/train_cifar10.py", ["--steps", "0"]),
                                         ("examples/train_cifar10.py", ["--batch-size", "x"]),
                                         ("examples/meta_train_user_tasks.py", ["--seeds", "-1"])])
def test_examples_refuse_bad_input_in_one_line(script, argv, capsys):
    """The examples answer bad flags as the CLIs do: one line, exit 2, no usage block."""
    with pytest.raises(SystemExit) as info:
        load_script(script).main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "expected a positive integer" in err


def test_example_meta_train_on_user_tasks(tmp_path, capsys):
    code = load_script("examples/meta_train_user_tasks.py").main(["--quick", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "$ python meta_train.py --task" in out and "| lstm_teacher |" in out
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["tasks"]["wide_task"]["optimizers"]) == {"sgd", "adam", "lstm_teacher"}
