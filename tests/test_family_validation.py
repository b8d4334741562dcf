"""A family run's validation: speedup over Adam tuned per member, components weighed alike; --member-balance."""
from __future__ import annotations

import glob
import math
import os
import sys

import pytest
import torch

from l2o import optim, tasks, validation
from l2o.config import TrainConfig
from l2o.evaluate import rollout
from l2o.speedup import smooth, speedup
from l2o.train import ADAM_GRID, VAL_SEEDS, MetaTrainer, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = "quadratic:dim=2-5+mlp:width=4-8,depth=1,batch_size=8-16,dataset=mnist"


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(family="quadratic:dim=2-6", lstm_hidden=4, lstm_layers=1, horizon=8, truncation=4, meta_steps=3,
                val_every=1, val_seeds=4, save_every=1, outer_lr=1e-2, meta_batch=2, log_dir=str(tmp_path / "runs"),
                checkpoint=str(tmp_path / "ck.pt"))
    base.update(kw)
    return TrainConfig(**base)


def test_balanced_mean_weighs_each_component_alike():
    val, means = validation.balanced_mean({"quadratic": [3.0], "mlp": [0.1, 0.2, 0.3]})
    assert means == {"mlp": pytest.approx(0.2, abs=1e-15), "quadratic": 3.0}
    assert val == pytest.approx((3.0 + 0.2) / 2, abs=1e-15)  # not the mean of the 4 members (0.9)
    assert math.isnan(validation.balanced_mean({})[0])


def test_members_tuned_and_scored_by_hand():
    """Adam's rate per member is the grid's argmin on that member; scores are -log speedup and log loss ratio."""
    fam = tasks.family("quadratic:dim=2-6")
    seeds, steps, grid = [VAL_SEEDS, VAL_SEEDS + 1, VAL_SEEDS + 2], 12, [1e-3, 1e-2, 1e-1]
    ref = validation.tune_members(fam, seeds, steps, grid, extend=0)
    sgd = optim.SGD(lr=0.01)
    groups = validation.relative_scores(fam, sgd, seeds, steps, ref)
    assert list(groups) == ["quadratic"] and len(groups["quadratic"]) == 3
    for s, (neg_log_sp, log_ratio) in zip(seeds, groups["quadratic"]):
        finals = {lr: rollout(fam, optim.Adam(lr=lr), s, steps).final_loss for lr in grid}
        best = min(grid, key=lambda lr: finals[lr])
        assert ref[str(s)]["lr"] == best and ref[str(s)]["final"] == finals[best]
        adam = rollout(fam, optim.Adam(lr=best), s, steps)
        want_adam = smooth(torch.tensor(adam.curve).numpy(), 1).tolist() + [adam.final_loss]  # window 5% of 12 -> 1
        assert ref[str(s)]["curve"] == pytest.approx(want_adam, rel=1e-12)
        mine = rollout(fam, sgd, s, steps)
        assert log_ratio == pytest.approx(math.log(mine.final_loss / finals[best]), rel=1e-12)
        assert neg_log_sp == pytest.approx(-math.log(speedup(list(mine.curve) + [mine.final_loss], want_adam)), rel=1e-12)
    # tuned Adam against itself: speedup exactly 1, loss ratio exactly 1
    for s in seeds:
        own = validation.relative_scores(fam, optim.Adam(lr=ref[str(s)]["lr"]), [s], steps, ref)
        assert own == {"quadratic": [(0.0, 0.0)]}


def test_diverged_member_scores_the_bound():
    fam = tasks.family("quadratic:dim=3-4")
    ref = validation.tune_members(fam, [VAL_SEEDS], 10, [1e-2, 1e-1], extend=0)
    (neg, ratio), = validation.relative_scores(fam, optim.SGD(lr=1e150), [VAL_SEEDS], 10, ref)["quadratic"]
    assert neg == pytest.approx(math.log(10)) and ratio == math.inf


def test_family_validation_is_the_balanced_speedup_and_resume_does_not_retune(tmp_path, tiny_data, monkeypatch):
    cfg = small(tmp_path, family=FAMILY, data_dir=tiny_data, val_seeds=6)
    full = fit(cfg, progress=False, tensorboard=False)
    ref = full.extra["adam_members"]
    assert sorted(ref, key=int) == [str(s) for s in range(VAL_SEEDS, VAL_SEEDS + 6)]
    assert all(r["lr"] in ADAM_GRID or r["lr"] not in (None,) for r in ref.values())
    groups = validation.relative_scores(full.task, full.opt, range(VAL_SEEDS, VAL_SEEDS + 6), 8, ref)
    assert set(groups) == {"quadratic", "mlp"}  # both components among the 6 members
    means = {g: sum(v[0] for v in vs) / len(vs) for g, vs in groups.items()}
    assert full.val_groups == pytest.approx(means, rel=1e-12)
    assert full.extra["history"][-1][1] == pytest.approx(sum(means.values()) / 2, rel=1e-12)
    assert full.val_loss_ratios.keys() == means.keys()
    # stop and resume: the same weights, best and history; tuned once (tuning again would raise)
    part = fit(small(tmp_path / "b", family=FAMILY, data_dir=tiny_data, val_seeds=6), stop_after=1,
               progress=False, tensorboard=False)
    assert part.extra["adam_members"] == ref
    monkeypatch.setattr(validation, "tune_members", lambda *a, **k: pytest.fail("re-tuned on --resume"))
    resumed = fit(small(tmp_path / "b", family=FAMILY, data_dir=tiny_data, val_seeds=6), resume=True,
                  progress=False, tensorboard=False)
    assert all(torch.equal(v, resumed.opt.state_dict()[k]) for k, v in full.opt.state_dict().items())
    assert resumed.extra["history"] == full.extra["history"] and resumed.best["meta_step"] == full.best["meta_step"]
    assert resumed.best["val_loss"] == full.best["val_loss"]


def test_checkpoint_from_before_rescores_its_best(tmp_path):
    """A family checkpoint without per-member Adam (the old log(final / initial) figure): tuned on resume, best rescored."""
    cfg = small(tmp_path, meta_steps=4)
    fit(cfg, stop_after=2, progress=False, tensorboard=False)
    ck = torch.load(cfg.checkpoint_path, weights_only=False)
    del ck["extra"]["adam_members"]
    ck["best"]["val_loss"] = -9.0  # an old-figure value no new validation could beat
    trainer = MetaTrainer(small(tmp_path, meta_steps=4))
    trainer.restore(ck)
    trainer.tune_adam()
    assert set(trainer.extra["adam_members"]) == {str(s) for s in range(VAL_SEEDS, VAL_SEEDS + 4)}
    best = MetaTrainer(small(tmp_path, meta_steps=4))
    best.opt.load_state_dict(ck["best"]["state_dict"])
    best.extra["adam_members"] = trainer.extra["adam_members"]
    assert trainer.best["val_loss"] == best.validate() != -9.0


def test_member_balance_averages_unit_meta_gradients(tmp_path):
    """One update per meta-step, outer SGD lr 1, no clipping: the step is minus the mean of g_b / ||g_b||."""
    kw = dict(truncation=8, outer_optimizer="sgd", outer_lr=1.0, clip=None, lr_schedule="constant", meta_batch=3)
    plain, bal = MetaTrainer(small(tmp_path / "p", **kw)), MetaTrainer(small(tmp_path / "b", member_balance=True, **kw))
    before = {k: v.detach().clone() for k, v in bal.meta_params.items()}
    est, seed = bal.estimator, 10_000_000
    per = []
    for m in bal._members(0):
        state = est.init(bal.problem([m]), bal.meta_params, tasks.seeded(seed, 4))
        g, _, _ = est.estimate(bal.meta_params, state)
        per.append(g)
    norms = [math.sqrt(sum(float((v ** 2).sum()) for v in g.values())) for g in per]
    assert max(norms) / min(norms) > 1.2  # members of different sizes: unequal norms, so balancing changes the step
    fig = bal.meta_step_once()
    assert fig["member_grad_norms"]["quadratic"] == pytest.approx(sum(norms) / 3, rel=1e-12)
    for k, p in bal.meta_params.items():
        want = before[k] - sum(g[k] / n for g, n in zip(per, norms)) / 3
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    plain.meta_step_once()  # without the flag: minus the plain mean
    for k, p in plain.meta_params.items():
        torch.testing.assert_close(p.detach(), before[k] - sum(g[k] for g in per) / 3, rtol=1e-12, atol=1e-14)


def test_member_balance_resumes_bit_exactly_and_logs_per_component(tmp_path, tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = dict(family=FAMILY, data_dir=tiny_data, member_balance=True, meta_batch=3)
    full = fit(small(tmp_path / "a", **kw), progress=False)
    fit(small(tmp_path / "b", **kw), stop_after=1, progress=False, tensorboard=False)
    resumed = fit(small(tmp_path / "b", **kw), resume=True, progress=False, tensorboard=False)
    assert all(torch.equal(v, resumed.opt.state_dict()[k]) for k, v in full.opt.state_dict().items())
    acc = EventAccumulator(glob.glob(str(tmp_path / "a" / "runs" / "*"))[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    comps = {t.split("/")[1] for t in tags if t.startswith("val_family/")}
    assert comps and comps <= {"quadratic", "mlp"}
    assert {f"val_family_log_loss_ratio/{c}" for c in comps} <= tags
    assert any(t.startswith("meta_member_grad_norm/") for t in tags)


def test_cli_member_balance_and_resume_refuses_a_change(tmp_path, capsys, tiny_data):
    sys.path.insert(0, ROOT)
    import meta_train

    args = ["--family", "quadratic:dim=2-4", "--lstm-hidden", "3", "--lstm-layers", "1", "--horizon", "4",
            "--truncation", "2", "--meta-steps", "2", "--val-seeds", "2", "--val-every", "1", "--no-progress",
            "--log-dir", str(tmp_path / "runs"), "--name", "r"]
    assert meta_train.main(args + ["--member-balance", "--stop-after", "1"]) == 0
    ck = torch.load(str(tmp_path / "runs" / "r" / "checkpoint.pt"), weights_only=False)
    assert ck["config"]["member_balance"] is True and len(ck["extra"]["adam_members"]) == 2
    assert "speedup over tuned Adam per component: quadratic" in capsys.readouterr().out
    assert meta_train.main(args + ["--resume"]) == 2  # the flag left out: a different run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meta_train.py: error: --resume") and "member_balance" in err[0]
    assert meta_train.main(args + ["--member-balance", "--resume"]) == 0


def test_init_from_validates_the_start_so_best_is_never_worse(tmp_path):
    from l2o import checkpoint

    fit(small(tmp_path / "src"), progress=False, tensorboard=False)
    src = checkpoint.load_optimizer(str(tmp_path / "src" / "ck.pt"))  # its best weights, what --init-from loads
    run = fit(small(tmp_path / "ft", init_from=str(tmp_path / "src" / "ck.pt"), outer_lr=3.0, clip=None,
                    meta_steps=2), progress=False, tensorboard=False)
    assert run.extra["history"][0][0] == 0 and [h[0] for h in run.extra["history"]] == [0, 1, 2]
    assert run.best["val_loss"] == min(h[1] for h in run.extra["history"])
    assert run.best["meta_step"] == 0  # outer steps of 3 ruin the weights: the start is kept as best
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in run.best["state_dict"].items())


def test_validation_at_several_horizons_averages_each_horizons_speedups(tmp_path, monkeypatch):
    """--val-horizons: Adam tuned per member at each horizon once (not again on --resume), the score the mean."""
    cfg = small(tmp_path, val_horizons=[8, 12], meta_steps=2)
    run = fit(cfg, stop_after=1, progress=False, tensorboard=False)
    refs = run.extra["adam_members"]
    assert sorted(refs) == ["12", "8"] and all(sorted(r, key=int) == [str(s) for s in range(VAL_SEEDS, VAL_SEEDS + 4)]
                                               for r in refs.values())
    assert refs["8"] != refs["12"]  # each horizon's own tuned runs
    seeds = range(VAL_SEEDS, VAL_SEEDS + 4)
    each = [validation.balanced_mean({g: [v[0] for v in vs] for g, vs in
                                      validation.relative_scores(run.task, run.opt, seeds, h, refs[str(h)]).items()})[0]
            for h in (8, 12)]
    assert run.validate() == pytest.approx(sum(each) / 2, rel=1e-12)
    # one horizon is the run's own, stored as before the option
    one = fit(small(tmp_path / "one", meta_steps=1), progress=False, tensorboard=False)
    assert sorted(one.extra["adam_members"], key=int) == [str(s) for s in seeds]
    assert one.extra["history"][-1][1] == pytest.approx(validation.balanced_mean({g: [v[0] for v in vs] for g, vs in
        validation.relative_scores(one.task, one.opt, seeds, 8, one.extra["adam_members"]).items()})[0], rel=1e-12)
    monkeypatch.setattr(validation, "tune_members", lambda *a, **k: pytest.fail("re-tuned on --resume"))
    resumed = fit(small(tmp_path, val_horizons=[8, 12], meta_steps=2), resume=True, progress=False, tensorboard=False)
    assert resumed.extra["adam_members"] == refs and len(resumed.extra["history"]) == 2

