"""Meta-training: exact resume, checkpoints, skipped non-finite steps, CLI errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import l2o
from l2o import checkpoint as ckpt_io
from l2o.config import TrainConfig, UsageError
from l2o.train import AllSkipped, MetaTrainer, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(task="quadratic", lstm_hidden=6, horizon=8, truncation=4, meta_steps=4, val_every=2, val_seeds=2,
                save_every=1, outer_lr=1e-2, log_dir=str(tmp_path / "runs"), checkpoint=str(tmp_path / "ck.pt"))
    base.update(kw)
    return TrainConfig(**base)


def weights(opt) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in opt.state_dict().items()}


def test_resume_is_exact(tmp_path):
    full = fit(small(tmp_path / "a", meta_batch=2), progress=False)
    part = fit(small(tmp_path / "b", meta_batch=2), stop_after=2, progress=False)
    assert part.meta_step == 2
    resumed = fit(small(tmp_path / "b", meta_batch=2), resume=True, progress=False)
    assert resumed.meta_step == 4
    wa, wb = weights(full.opt), weights(resumed.opt)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # training moved the weights at all (the test could otherwise pass vacuously)
    fresh = MetaTrainer(small(tmp_path / "c"))
    assert any(not torch.equal(v, fresh.opt.state_dict()[k]) for k, v in wa.items())


def test_checkpoint_weights_only_and_loader(tmp_path):
    cfg = small(tmp_path, meta_steps=2)
    trainer = fit(cfg, progress=False)
    raw = torch.load(cfg.checkpoint_path, weights_only=True)
    assert raw["meta_step"] == 2 and raw["format"] == "l2o-checkpoint"
    opt = l2o.load_optimizer(cfg.checkpoint_path, which="current") if False else ckpt_io.load_optimizer(
        cfg.checkpoint_path, which="current")
    assert isinstance(opt, l2o.optim.LSTMOptimizer)
    p = {"x": torch.randn(10)}
    g = {"x": torch.randn(10)}
    a, _ = opt.step(p, g, opt.init(p))
    b, _ = trainer.opt.step(p, g, trainer.opt.init(p))
    assert torch.allclose(a["x"], b["x"])
    assert l2o.load_optimizer(cfg.checkpoint_path) is not None  # best-by-validation variant


def test_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    ckpt_io.save(path, {"meta_step": 1})

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save(path, {"meta_step": 2})
    monkeypatch.undo()
    assert ckpt_io.load(path)["meta_step"] == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


def test_nonfinite_meta_step_is_skipped(tmp_path):
    cfg = small(tmp_path, optimizer="sgd", learn=["lr"], lr=1e40, method="reverse", meta_steps=2, val_every=2)
    with pytest.raises(AllSkipped, match="all 2 meta-steps were skipped"):  # reported, not "done"
        fit(cfg, progress=False)
    ckpt = ckpt_io.load(cfg.checkpoint_path)
    assert ckpt["extra"]["skipped"] == 2 and ckpt["meta_step"] == 2
    opt = ckpt_io.build_optimizer(ckpt, "current")
    assert torch.isfinite(opt.log_lr.detach()) and float(opt.hparam("lr").detach()) == pytest.approx(1e40)


def test_hyperparameter_methods_agree(tmp_path):
    """One outer SGD step on lr with forward and with reverse mode moves lr identically."""
    moved = {}
    for method in ("forward", "reverse"):
        cfg = small(tmp_path / method, optimizer="momentum", learn=["lr", "momentum"], lr=0.01, momentum=0.5,
                    method=method, objective="final_train", meta_steps=1, clip=None, outer_optimizer="sgd",
                    outer_lr=1e-4, lr_schedule="constant")
        trainer = MetaTrainer(cfg)
        trainer.meta_step_once()
        moved[method] = (float(trainer.opt.log_lr.detach()), float(trainer.opt.logit_momentum.detach()))
    assert moved["forward"] == pytest.approx(moved["reverse"], rel=1e-9, abs=1e-12)
    assert moved["reverse"][0] != pytest.approx(torch.log(torch.tensor(0.01)).item(), abs=1e-9)


def test_online_truncated_updates_every_k(tmp_path):
    cfg = small(tmp_path, optimizer="sgd", learn=["lr"], lr=0.01, method="truncated", online=2, truncation=2,
                objective="final_train", meta_steps=1, lr_schedule="constant")
    trainer = MetaTrainer(cfg)
    assert trainer.updates_per_step == 4
    trainer.meta_step_once()
    assert trainer.outer.state[trainer.opt.log_lr]["step"] == 4


def test_cifar_conv_meta_trains_on_tiny_files(tmp_path, tiny_data):
    cfg = small(tmp_path, task="cifar10_conv", data_dir=tiny_data, batch_size=4, hidden=[8], meta_steps=1,
                horizon=4, truncation=2, val_every=1, val_seeds=1)
    trainer = fit(cfg, progress=False)
    assert trainer.meta_step == 1 and trainer.best is not None
    assert torch.isfinite(torch.tensor(trainer.best["val_loss"]))


def test_config_errors():
    with pytest.raises(UsageError, match="unknown task"):
        TrainConfig(task="nope").validate()
    with pytest.raises(UsageError, match="positive integer"):
        TrainConfig(horizon=0).validate()
    with pytest.raises(UsageError, match="LSTM"):
        TrainConfig(method="implicit").validate()
    with pytest.raises(UsageError, match="weight_decay"):
        TrainConfig(optimizer="sgd", learn=["lr"], method="implicit").validate()


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "meta_train.py"), "--no-progress", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_bad_input_exits_2_with_one_line(tmp_path, tiny_data):
    ck = str(tmp_path / "ck.pt")
    common = ["--log-dir", str(tmp_path / "runs"), "--checkpoint", ck]
    for args, needle in [
        (["--task", "nope"], "unknown task"),
        (["--horizon", "-3"], "--horizon"),
        (["--data-dir", str(tmp_path / "empty")], "MNIST not found"),
        (["--optimizer", "adam", "--learn", "bogus", "--task", "quadratic"], "bogus"),
    ]:
        r = run_cli(*args, *common)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], r.stderr
    # a foreign file at the checkpoint path with --resume
    with open(ck, "wb") as fh:
        fh.write(b"not a checkpoint")
    r = run_cli("--task", "quadratic", "--resume", *common)
    assert r.returncode == 2 and "unreadable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_never_overwrites_and_checks_resume_config(tmp_path):
    ck = str(tmp_path / "ck.pt")
    common = ["--task", "quadratic", "--lstm-hidden", "4", "--horizon", "4", "--truncation", "2", "--meta-steps", "2",
              "--val-every", "2", "--val-seeds", "1", "--log-dir", str(tmp_path / "runs"), "--checkpoint", ck]
    r = run_cli(*common)
    assert r.returncode == 0, r.stderr
    before = open(ck, "rb").read()
    r = run_cli(*common)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli(*common[:-2], "--checkpoint", ck, "--resume", "--meta-steps", "3", "--outer-lr", "0.5")
    assert r.returncode == 2 and "outer_lr" in r.stderr
    assert open(ck, "rb").read() == before
    r = run_cli(*[a if a != "2" or i != common.index("--meta-steps") + 1 else "3" for i, a in enumerate(common)],
                "--resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(ck, weights_only=True)["meta_step"] == 3
