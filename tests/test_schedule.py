"""--schedule: parsing, phase transitions from the best weights, bit-exact resume mid-schedule, records."""
from __future__ import annotations

import glob

import pytest
import torch

from l2o import checkpoint as ckpt_io
from l2o.config import TrainConfig, UsageError
from l2o.schedule import Phase, parse, phase_at, total
from l2o.train import MetaTrainer, fit

SPEC = "2:3,4:3@3e-3"  # phase 1: truncation 2 for 3 meta-steps; phase 2: truncation 4 (the whole unroll)


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(task="quadratic", lstm_hidden=6, horizon=4, schedule=SPEC, meta_steps=6, val_every=2, val_seeds=2,
                save_every=1, outer_lr=1e-2, log_dir=str(tmp_path / "runs"), checkpoint=str(tmp_path / "ck.pt"))
    base.update(kw)
    return TrainConfig(**base)


def test_parse_phases():
    assert parse("20:60,100:200@3e-4") == [Phase(20, 60, None, 0), Phase(100, 200, 3e-4, 60)]
    assert parse(" 5:1 ") == [Phase(5, 1, None, 0)]
    phases = parse("2:3,4:3@1e-2,8:1")
    assert total(phases) == 7
    assert [phase_at(phases, i) for i in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("spec,words", [
    ("", "empty"), ("20", "is not"), ("20:", "meta-steps must be a positive integer"),
    (":5", "truncation must be a positive integer"), ("0:5", "truncation"), ("2.5:5", "truncation"),
    ("20:60,", "is not"), ("20:-1", "meta-steps"), ("20:5@", "is not"), ("20:5@x", "outer learning rate"),
    ("20:5@0", "outer learning rate"), ("20:5@nan", "outer learning rate"), ("20:5@inf", "outer learning rate"),
])
def test_parse_refuses_bad_specs_in_one_line(spec, words):
    with pytest.raises(ValueError, match=words) as info:
        parse(spec)
    assert "\n" not in str(info.value)


def test_config_checks_the_schedule_against_the_run():
    with pytest.raises(UsageError, match="disagrees with --schedule"):
        TrainConfig(task="quadratic", horizon=4, schedule=SPEC, meta_steps=5).validate()
    with pytest.raises(UsageError, match="truncation 8 is longer than --horizon 4"):
        TrainConfig(task="quadratic", horizon=4, schedule="2:3,8:3", meta_steps=6).validate()
    with pytest.raises(UsageError, match="--method truncated, pes or es"):
        TrainConfig(task="quadratic", horizon=4, schedule=SPEC, meta_steps=6, method="reverse").validate()
    TrainConfig(task="quadratic", horizon=4, schedule=SPEC, meta_steps=6).validate()


def test_phases_switch_truncation_lr_and_are_recorded(tmp_path):
    trainer = fit(small(tmp_path), progress=False)
    assert (trainer.phase, trainer.truncation, trainer.meta_step) == (1, 4, 6)
    assert trainer.update_every == 4 and trainer.sched.base_lrs == [3e-3]
    ck = ckpt_io.load(str(tmp_path / "ck.pt"))
    assert ck["config"]["schedule"] == SPEC and ck["phase"] == 1
    assert [s for s, _ in ck["extra"]["history"]] == [2, 3, 4, 6]  # the end of phase 1 is validated
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "*"))[0])
    acc.Reload()
    assert [int(e.value) for e in acc.Scalars("meta/truncation")] == [2, 2, 2, 4, 4, 4]
    assert [int(e.value) for e in acc.Scalars("meta/phase")] == [1, 1, 1, 2, 2, 2]
    assert any(SPEC in str(e.tensor_proto.string_val) for e in acc.Tensors("config/text_summary"))


def test_next_phase_starts_from_the_best_weights(tmp_path):
    fit(small(tmp_path), stop_after=3, progress=False)  # exactly the end of phase 1
    ck = ckpt_io.load(str(tmp_path / "ck.pt"))
    # make the stored best distinguishable from the current weights, so the test can fail
    ck["best"]["state_dict"] = {k: v * 0.5 + 0.25 for k, v in ck["best"]["state_dict"].items()}
    trainer = MetaTrainer(small(tmp_path))
    trainer.restore(ck)
    assert trainer.phase == 0
    trainer._enter_phase()
    assert trainer.phase == 1 and trainer.truncation == 4
    for k, v in trainer.opt.state_dict().items():
        assert torch.equal(v, ck["best"]["state_dict"][k]), k
    assert not trainer.outer.state  # a fresh outer optimizer for the new phase
    assert trainer.outer.param_groups[0]["lr"] == pytest.approx(3e-3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    old = torch.get_default_dtype()  # the tests run in float64 (conftest), which a module fixture precedes
    torch.set_default_dtype(torch.float64)
    try:
        return fit(small(tmp_path_factory.mktemp("full")), progress=False, tensorboard=False)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("stop", [2, 4])  # inside phase 1 (resumed across the boundary), inside phase 2
def test_resume_mid_schedule_is_bit_exact(tmp_path, stop, uninterrupted):
    full = uninterrupted
    part = fit(small(tmp_path), stop_after=stop, progress=False, tensorboard=False)
    assert part.meta_step == stop
    resumed = fit(small(tmp_path), resume=True, progress=False, tensorboard=False)
    assert resumed.meta_step == 6 and resumed.phase == 1
    for a, b in ((full.opt.state_dict(), resumed.opt.state_dict()), (full.best["state_dict"], resumed.best["state_dict"])):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert full.extra["history"] == resumed.extra["history"]
    sa, sb = full.outer.state_dict()["state"], resumed.outer.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    # training moved the weights (the comparison is not vacuous)
    fresh = MetaTrainer(small(tmp_path / "fresh"))
    assert any(not torch.equal(v, fresh.opt.state_dict()[k]) for k, v in full.opt.state_dict().items())


def test_resume_refuses_another_schedule(tmp_path):
    fit(small(tmp_path), stop_after=4, progress=False, tensorboard=False)
    with pytest.raises(UsageError, match="schedule="):
        fit(small(tmp_path, schedule="2:3,4:3@1e-3"), resume=True, progress=False, tensorboard=False)


def test_cli_schedule_sets_meta_steps(tmp_path, monkeypatch):
    import meta_train

    monkeypatch.chdir(tmp_path)
    args = meta_train.parser().parse_args(["--task", "quadratic", "--horizon", "4", "--schedule", SPEC])
    cfg = meta_train.config_from_args(args)
    assert cfg.meta_steps == 6 and cfg.schedule == SPEC
    args = meta_train.parser().parse_args(["--task", "quadratic", "--horizon", "4", "--schedule", SPEC, "--preset", "paper"])
    assert meta_train.config_from_args(args).meta_steps == 6  # the schedule's length, not the preset's
    assert meta_train.main(["--task", "quadratic", "--horizon", "4", "--lstm-hidden", "4", "--schedule", "2:1,4:1",
                            "--val-seeds", "1", "--no-progress"]) == 0
    ck = ckpt_io.load(str(tmp_path / "runs" / "lstm_quadratic" / "checkpoint.pt"))
    assert ck["meta_step"] == 2 and ck["phase"] == 1
