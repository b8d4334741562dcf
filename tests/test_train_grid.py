"""The trainer over the estimator registry: every method x objective x optimizer runs or is refused in one line;
PES on a family resumes bit-exactly; meta-batches mix tasks of different sizes; bad input exits 2."""
from __future__ import annotations

import math

import pytest
import torch

import meta_train
from l2o import optim
from l2o.config import METHODS, OBJECTIVES, TrainConfig, UsageError
from l2o.train import MetaTrainer, fit


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(task="quadratic", lstm_hidden=4, lstm_layers=1, horizon=4, truncation=2, meta_steps=2, val_every=2,
                val_seeds=1, save_every=1, outer_lr=1e-2, population=2, log_dir=str(tmp_path / "runs"),
                checkpoint=str(tmp_path / "ck.pt"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("learn", [None, ["weight_decay"]])
@pytest.mark.parametrize("optimizer", list(optim.NAMES))
def test_every_method_objective_optimizer_combination_runs_or_is_refused_in_one_line(tmp_path, optimizer, learn):
    ran, refused = [], []
    for method in METHODS:
        for objective in OBJECTIVES:
            cfg = small(tmp_path, optimizer=optimizer, method=method, objective=objective, learn=learn)
            try:
                trainer = MetaTrainer(cfg)
            except UsageError as exc:
                msg = str(exc)
                assert "\n" not in msg and len(msg) < 400, msg
                assert any(m in msg for m in METHODS) or any(o in msg for o in OBJECTIVES), msg
                refused.append((method, objective))
                continue
            before = {k: v.detach().clone() for k, v in trainer.meta_params.items()}
            fig = trainer.meta_step_once()
            assert fig["skipped"] == 0 and math.isfinite(fig["meta_loss"]), (method, objective, fig)
            assert any(not torch.equal(v, before[k]) for k, v in trainer.meta_params.items()), (method, objective)
            ran.append((method, objective))
    print(f"{optimizer} learn={learn}: ran {len(ran)}, refused {sorted(refused)}")
    # what must run: every stochastic and reverse-mode method on every objective; implicit where it applies
    for method in ("truncated", "reverse", "pes", "es"):
        assert all((method, o) in ran for o in OBJECTIVES), (method, refused)
    if learn == ["weight_decay"]:
        assert ("implicit", "final_train") in ran and ("implicit", "final_test") in ran
    assert ("implicit", "sum_train") in refused


def test_pes_on_a_family_resumes_bit_exactly(tmp_path, tiny_data):
    """Truncations longer than a batch stream's default memory: the particles replay them."""
    kw = dict(family="quadratic:dim=3-6+mlp:width=4-8,depth=1,batch_size=8-16,dataset=mnist", data_dir=tiny_data,
              method="pes", meta_batch=2, meta_steps=4, horizon=12, truncation=6, lstm_hidden=3)
    full = fit(small(tmp_path / "a", **kw), progress=False, tensorboard=False)
    part = fit(small(tmp_path / "b", **kw), stop_after=2, progress=False, tensorboard=False)
    assert part.meta_step == 2
    resumed = fit(small(tmp_path / "b", **kw), resume=True, progress=False, tensorboard=False)
    wa, wb = full.opt.state_dict(), resumed.opt.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.outer.state_dict()["state"].keys() == resumed.outer.state_dict()["state"].keys()
    fresh = MetaTrainer(small(tmp_path / "c", **kw))
    assert any(not torch.equal(v, fresh.opt.state_dict()[k]) for k, v in wa.items())
    assert full.cfg.objective == "normalised"  # the family's default objective
    assert set(full.val_groups) <= {"quadratic", "mlp"} and full.val_groups


def test_meta_batch_mixes_tasks_of_different_sizes(tmp_path, tiny_data):
    cfg = small(tmp_path, family="quadratic:dim=2-9", meta_batch=4, method="truncated", objective="normalised")
    trainer = MetaTrainer(cfg)
    members = trainer._members(0)
    sizes = {sum(p.numel() for p in m[1].values()) for m in members}
    assert len(sizes) > 1
    problem = trainer.problem(members)
    loss, term = problem.inner_loss(problem.params, {}, 0)
    assert float(term) == pytest.approx(0.0, abs=1e-12)  # log(loss_0 / loss_0)
    assert float(loss) == pytest.approx(sum(float(m[0].loss(m[1], m[2][0])) for m in members))
    fig = trainer.meta_step_once()
    assert math.isfinite(fig["meta_loss"]) and fig["meta_loss"] < 0  # the losses fell below their start


def _cli(capsys, tmp_path, *args) -> tuple[int, str]:
    try:  # flags refused by argparse exit through SystemExit(2), the others return 2
        task = [] if "--family" in args else ["--task", "quadratic"]  # a family samples its own tasks
        code = meta_train.main(["--no-progress", *task, "--log-dir", str(tmp_path / "runs"),
                                "--checkpoint", str(tmp_path / "ck.pt"), *args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--family", "nope"], "unknown family component 'nope'; choose one of"),
    (["--family", "mlp:width"], "malformed family spec"),
    (["--family", "quadratic", "--hidden", "4"], "--hidden does not apply to a family"),
    (["--method", "pes", "--population", "0"], "--population: expected a positive integer"),
    (["--method", "es", "--population", "-2"], "--population: expected a positive integer"),
    (["--method", "pes", "--sigma", "0"], "--sigma must be a positive number"),
    (["--method", "pes", "--sigma", "nan"], "--sigma: expected a finite number"),
    (["--method", "forward"], "--method forward cannot learn the meta-parameters of lstm"),
    (["--method", "implicit"], "--method implicit learns only --learn weight_decay"),
    (["--method", "bogus"], "unknown method 'bogus'; choose one of truncated, reverse, forward, implicit, pes, es"),
    (["--optimizer", "sgd", "--learn", "weight_decay", "--method", "implicit"], "use --objective final_train or final_test"),
])
def test_cli_bad_estimator_and_family_input_exits_2_in_one_line(capsys, tmp_path, args, needle):
    code, err = _cli(capsys, tmp_path, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert err.startswith("meta_train.py: error: ") and not (tmp_path / "ck.pt").exists()


def test_cli_forward_refusal_names_the_methods_that_can(capsys, tmp_path):
    code, err = _cli(capsys, tmp_path, "--method", "forward", "--horizon", "4", "--meta-steps", "1")
    assert code == 2 and "methods that can: truncated, reverse, pes, es" in err


def test_cli_pes_and_the_fixed_combinations_run(capsys, tmp_path):
    common = ["--horizon", "4", "--truncation", "2", "--meta-steps", "1", "--val-seeds", "1", "--lstm-hidden", "3"]
    for i, extra in enumerate([["--method", "pes", "--population", "2"], ["--objective", "final_train"],
                               ["--optimizer", "sgd", "--learn", "weight_decay", "--method", "implicit",
                                "--objective", "final_test"]]):
        code, err = _cli(capsys, tmp_path / str(i), *common, *extra)
        assert code == 0, err


def test_config_is_split_by_concern_and_reads_old_checkpoints():
    from dataclasses import fields

    from l2o.config import EstimatorConfig, OptimizerConfig

    cfg = TrainConfig(method="pes", population=3, sigma=0.2).validate()
    est = cfg.concern(EstimatorConfig)
    assert isinstance(est, EstimatorConfig) and (est.method, est.population, est.sigma) == ("pes", 3, 0.2)
    assert {f.name for f in fields(OptimizerConfig)}.isdisjoint(f.name for f in fields(EstimatorConfig))
    assert sum(len(fields(c)) for c in TrainConfig.CONCERNS) + 1 == len(fields(TrainConfig))  # + extra
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("family", "population", "sigma")}
    old.update(method="truncated", objective="sum_train")
    again = TrainConfig.from_dict(old).validate()
    assert again.differences(TrainConfig(objective="sum_train").validate()) == []
