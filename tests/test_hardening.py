"""What a newcomer's run turned up: stale temporaries, honest messages, shipped tuned rates, plain progress."""
from __future__ import annotations

import io
import json
import os
import time

import pytest
import torch

import l2o
from l2o import checkpoint, optim, suite
from l2o.config import TrainConfig
from l2o.progress import PlainProgress
from l2o.tasks import DataNotFoundError, data
from l2o.train import MetaTrainer, fit

from conftest import write_idx


def lstm_payload() -> dict:
    opt = optim.LSTMOptimizer(hidden=4, layers=1)
    return {"optimizer": checkpoint.optimizer_payload(opt), "best": None, "config": {}, "meta_step": 0}


def test_save_removes_temporaries_a_killed_save_left(tmp_path):
    target = tmp_path / "ck.pt"
    stale = tmp_path / ".ck.pt.tmp-abc123.pt"       # same target: removed
    other = tmp_path / ".other.pt.tmp-def456.pt"    # another target's (maybe in progress): kept
    old_style = tmp_path / ".tmp-xyz.pt"            # written by an older l2o, hours ago: removed
    for f in (stale, other, old_style):
        f.write_bytes(b"partial")
    os.utime(old_style, (time.time() - 7200, time.time() - 7200))
    checkpoint.save(str(target), lstm_payload())
    assert sorted(os.listdir(tmp_path)) == sorted(["ck.pt", other.name])
    assert checkpoint.load(str(target))["meta_step"] == 0


def test_which_is_validated_and_shipped_names_load_from_anywhere(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save(str(path), lstm_payload())
    for load in (checkpoint.load_optimizer, l2o.load_optimizer):
        with pytest.raises(ValueError, match="which must be one of 'best', 'current', got 'bogus'"):
            load(str(path), which="bogus")
    assert isinstance(l2o.load_optimizer(str(path), which="current"), optim.LSTMOptimizer)
    monkeypatch.chdir(tmp_path)  # not the repository root
    shipped = l2o.load_optimizer("lstm_mnist")
    direct = checkpoint.load_optimizer(os.path.join(l2o.SHIPPED, "lstm_mnist.pt"))
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), direct.state_dict().values()))


def test_tuning_cache_reads_the_shipped_file_and_retune_ignores_it(tmp_path):
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"k": {"lr": 0.1, "scores": [], "at_edge": False}}))
    cache = suite.TuningCache(str(tmp_path / "user"), shipped=str(shipped))
    assert cache.get("k")["lr"] == 0.1 and cache.get("other") is None
    cache.put("k", {"lr": 0.3, "scores": [], "at_edge": False})  # the user's own result wins over the shipped one
    assert cache.get("k")["lr"] == 0.3
    assert json.loads(shipped.read_text())["k"]["lr"] == 0.1  # the shipped file is never written
    assert suite.TuningCache(str(tmp_path / "user"), shipped=str(shipped), read=False).get("k") is None


def test_shipped_rates_are_keyed_by_the_data_not_its_path(tmp_path, tiny_data):
    """A tiny dataset must not hit the rates tuned on the real one; the same data elsewhere gets the same key."""
    with open(suite.SHIPPED_TUNING) as fh:
        shipped = json.load(fh)
    datas = [json.loads(k)["data"] for k in shipped if json.loads(k)["task"] == "mnist_mlp"]
    assert datas and all(d["train"] == 60000 and d["test"] == 10000 for d in datas)
    task = l2o.tasks.get("mnist_mlp", data_dir=tiny_data)
    assert suite.data_fingerprint(task)["train"] == 256
    copy = tmp_path / "copy"
    write_idx(str(copy / "MNIST" / "raw"), seed=0)
    assert suite.data_fingerprint(l2o.tasks.get("mnist_mlp", data_dir=str(copy))) == suite.data_fingerprint(task)


def test_truncated_idx_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(str(raw), n_train=8, n_test=4)
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(DataNotFoundError, match=r"t10k-labels-idx1-ubyte' is truncated \(10 bytes, its header says 12\)"):
        data.load("mnist", "test", str(tmp_path))


def test_plain_progress_prints_lines_with_an_eta():
    out = io.StringIO()
    bar = PlainProgress(4, "evaluate", every=0.0, file=out)
    bar.set_postfix_str("mnist_mlp/adam")
    for _ in range(4):
        bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("evaluate: 4/4 (100%) elapsed ")
    assert "ETA 00:00" in lines[-1] and lines[-1].endswith("mnist_mlp/adam")


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(task="quadratic", lstm_hidden=4, lstm_layers=1, horizon=4, truncation=2, meta_steps=4, val_every=4,
                val_seeds=1, save_every=2, log_dir=str(tmp_path / "runs"))
    return TrainConfig(**{**base, **kw})


def test_ctrl_c_message_says_what_the_checkpoint_holds(tmp_path, monkeypatch):
    real = MetaTrainer.meta_step_once

    def interrupt_at(n):
        def step(self, *a, **k):
            if self.meta_step == n:
                raise KeyboardInterrupt
            return real(self, *a, **k)
        return step

    cfg = small(tmp_path)
    monkeypatch.setattr(MetaTrainer, "meta_step_once", interrupt_at(1))
    with pytest.raises(KeyboardInterrupt, match="nothing was saved"):
        fit(cfg, progress=False)
    assert not os.path.exists(cfg.checkpoint_path)
    monkeypatch.setattr(MetaTrainer, "meta_step_once", interrupt_at(3))
    with pytest.raises(KeyboardInterrupt, match="holds meta-step 2: continue with --resume"):
        fit(cfg, progress=False)
    assert checkpoint.load(cfg.checkpoint_path)["meta_step"] == 2
    assert cfg.checkpoint_path == os.path.join(str(tmp_path / "runs"), "lstm_quadratic", "checkpoint.pt")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_under_torchrun_only_rank_0_reports(tmp_path, monkeypatch, capsys, rank):
    import meta_train

    from l2o import train

    def interrupted(*a, **k):
        raise KeyboardInterrupt("interrupted at meta-step 30; the checkpoint 'ck.pt' holds meta-step 25")

    monkeypatch.setattr(train, "fit", interrupted)
    monkeypatch.setenv("RANK", rank)
    code = meta_train.main(["--task", "quadratic", "--no-progress", "--log-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 130
    # every rank sees the Ctrl-C, but only rank 0 writes the checkpoint and may say what it holds
    assert (err == "meta_train.py: interrupted at meta-step 30; the checkpoint 'ck.pt' holds meta-step 25") \
        if rank == "0" else err == "", err
