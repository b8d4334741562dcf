"""Distributed meta-training across real processes (torchrun, gloo on CPU).

The process boundary is the thing tested, so these tests launch ``torchrun`` in a
subprocess; the reference runs are in-process :func:`l2o.train.fit` calls in float64.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from l2o.config import TrainConfig
from l2o.train import fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "torchrun_worker.py")
FLAGS = ["--task", "quadratic", "--lstm-hidden", "6", "--horizon", "8", "--truncation", "4", "--val-every", "2",
         "--val-seeds", "2", "--save-every", "1", "--outer-lr", "1e-2", "--meta-batch", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks run one torch thread each (``OMP_NUM_THREADS=1`` below); the in-process reference runs must too,
    or their float32 sums are taken in another order than the ranks' (a 6e-8 difference with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(tmp_path, *args, nproc: int = 2, background: bool = False, dtype: str = "float64",
             env: dict | None = None):
    flags = FLAGS[2:] if "--family" in args else FLAGS  # a family samples its own tasks: no --task with it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER,
           *flags, "--log-dir", str(tmp_path / "runs"), "--checkpoint", str(tmp_path / "ck.pt"), *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", L2O_TEST_DTYPE=dtype, **(env or {}))
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)  # a hang guard: slow on a loaded machine


def reference(tmp_path, **kw) -> TrainConfig:
    """The in-process twin of ``FLAGS`` (one process, the whole meta-batch)."""
    base = dict(task="quadratic", lstm_hidden=6, horizon=8, truncation=4, val_every=2, val_seeds=2, save_every=1,
                outer_lr=1e-2, meta_batch=2, meta_steps=4, log_dir=str(tmp_path / "runs"),
                checkpoint=str(tmp_path / "ck.pt"))
    return TrainConfig(**{**base, **kw})


def assert_close(a: dict, b: dict, exact: bool = True, rtol: float = 0.0) -> None:
    """Equal bits (``exact``), else equal to ``rtol``."""
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.allclose(a[k], b[k], rtol=rtol, atol=0.0), (k, (a[k] - b[k]).abs().max())


def weights(path: str) -> dict:
    return torch.load(path, weights_only=True)["optimizer"]["state_dict"]


def test_two_processes_equal_one_and_resume_with_one(tmp_path):
    """2 ranks x meta-batch 1 == 1 process x meta-batch 2 for 3 meta-steps, to the bit; it resumes in 1 process."""
    d = tmp_path / "dist"
    d.mkdir()
    r = torchrun(d, "--meta-steps", "4", "--stop-after", "3", "--threads", "1", env={"L2O_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done: 3 meta-steps") == 1  # rank 0 alone reports
    assert sorted(line for line in r.stdout.splitlines() if "torch threads" in line) == \
        ["rank 0: 1 torch threads", "rank 1: 1 torch threads"]  # an explicit --threads wins over the defaults
    one = fit(reference(tmp_path / "one"), stop_after=3, progress=False)
    ck = torch.load(str(d / "ck.pt"), weights_only=True)
    assert ck["meta_step"] == 3 and ck["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert_close(ck["optimizer"]["state_dict"], weights(str(tmp_path / "one" / "ck.pt")))
    assert_close(ck["outer_optimizer"]["state"][0], one.outer.state_dict()["state"][0])  # Adam's moments too
    # the Adam reference was tuned and scored with rollouts spread over the ranks: the same numbers exactly
    assert (ck["extra"]["adam_lr"], ck["extra"]["adam_val"]) == (one.extra["adam_lr"], one.extra["adam_val"])
    assert ck["extra"]["history"] == one.extra["history"] and ck["best"]["meta_step"] == one.best["meta_step"]
    # rank 0 alone wrote: one checkpoint, one TensorBoard writer (its pid in every event file name)
    assert sorted(os.listdir(d)) == ["ck.pt", "runs"]
    events = os.listdir(d / "runs" / "lstm_quadratic")
    assert events and len({name.split(".")[-2] for name in events}) == 1
    # a 2-process checkpoint resumed by 1 process ends where the 1-process run ends
    resumed = fit(reference(d), resume=True, progress=False)
    done = fit(reference(tmp_path / "one"), resume=True, progress=False)
    assert resumed.meta_step == done.meta_step == 4
    assert_close(resumed.opt.state_dict(), done.opt.state_dict())
    assert any(not torch.equal(v, ck["optimizer"]["state_dict"][k]) for k, v in resumed.opt.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("dtype, counts", [("float64", (2, 4)), ("float32", (2,))])
def test_any_process_count_gives_the_weights_of_one(tmp_path, dtype, counts):
    """Meta-batch 4 in 1, 2 and 4 processes: equal bits in float64; float32 to 1e-6 (the issue's bound)."""
    torch.set_default_dtype(getattr(torch, dtype))  # the conftest fixture restores float64
    fit(reference(tmp_path / "one", meta_batch=4), stop_after=3, progress=False)
    want = weights(str(tmp_path / "one" / "ck.pt"))
    assert next(iter(want.values())).dtype == getattr(torch, dtype)
    for n in counts:
        (tmp_path / str(n)).mkdir()
        r = torchrun(tmp_path / str(n), "--meta-steps", "4", "--stop-after", "3", "--meta-batch", "4", nproc=n,
                     dtype=dtype)
        assert r.returncode == 0, r.stderr
        assert_close(weights(str(tmp_path / str(n) / "ck.pt")), want, exact=dtype == "float64", rtol=1e-6)


@pytest.mark.slow
def test_resume_with_more_processes_and_exactly_with_the_same(tmp_path):
    for sub in ("full", "part", "one"):
        (tmp_path / sub).mkdir()
    assert torchrun(tmp_path / "full", "--meta-steps", "4").returncode == 0
    r = torchrun(tmp_path / "part", "--meta-steps", "4", "--stop-after", "2")
    assert r.returncode == 0, r.stderr
    r = torchrun(tmp_path / "part", "--meta-steps", "4", "--resume")
    assert r.returncode == 0, r.stderr
    assert_close(weights(str(tmp_path / "full" / "ck.pt")), weights(str(tmp_path / "part" / "ck.pt")))
    fit(reference(tmp_path / "one"), stop_after=2, progress=False)  # 1 process, then 2 ranks
    r = torchrun(tmp_path / "one", "--meta-steps", "4", "--resume")
    assert r.returncode == 0, r.stderr
    assert_close(weights(str(tmp_path / "one" / "ck.pt")), weights(str(tmp_path / "full" / "ck.pt")))


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--meta-batch", "3"], "not a multiple of the 2 processes"),
    (["--dist-backend", "nccl"], "needs CUDA"),
    (["--resume"], "no checkpoint at"),
])
def test_bad_input_one_line_from_rank_0_exit_2_everywhere(tmp_path, args, needle):
    r = torchrun(tmp_path, "--meta-steps", "2", *args)
    ours = [line for line in r.stderr.splitlines() if line.startswith("meta_train.py")]
    assert len(ours) == 1 and "error" in ours[0] and needle in ours[0], r.stderr
    # torchrun's failure summary lists every rank's exit status
    codes = [line.split(":")[1].split()[0] for line in r.stderr.splitlines() if line.strip().startswith("exitcode")]
    assert codes == ["2", "2"], r.stderr
    assert "Traceback" not in "\n".join(ours) and not os.path.exists(tmp_path / "ck.pt")


def rank_pid(launcher: int, rank: int) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process through /proc")
def test_killed_rank_stops_the_others_and_resume_continues(tmp_path):
    proc = torchrun(tmp_path, "--meta-steps", "400", "--horizon", "20", "--val-every", "100", "--save-every", "5",
                    background=True)
    ck = tmp_path / "ck.pt"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline:
        time.sleep(0.2)
    victim = rank_pid(proc.pid, 1)
    assert ck.exists() and victim is not None
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode != 0 and took < 60, (took, err)
    ours = [line for line in err.splitlines() if line.startswith("meta_train.py")]
    assert len(ours) == 1 and "lost contact" in ours[0] and "--resume" in ours[0], err
    saved = torch.load(str(ck), weights_only=True)["meta_step"]  # intact and readable
    assert 5 <= saved < 400
    r = torchrun(tmp_path, "--meta-steps", str(saved + 2), "--horizon", "20", "--val-every", "100",
                 "--save-every", "5", "--resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(str(ck), weights_only=True)["meta_step"] == saved + 2


def _numbers(x, path=""):
    """Every leaf of a results dict except run times (the one thing more processes should change)."""
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() if k != "runtime_s" for k2, v2 in _numbers(v, f"{path}/{k}").items()}
    if isinstance(x, list):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in _numbers(v, f"{path}/{i}").items()}
    return {path: x}


def test_meta_eval_workers_give_the_results_of_one_process(tmp_path, tiny_data):
    import json

    opt = __import__("l2o").optim.LSTMOptimizer(hidden=4, layers=1)
    from l2o import checkpoint

    ckpt = str(tmp_path / "my_lstm.pt")
    checkpoint.save(ckpt, {"optimizer": checkpoint.optimizer_payload(opt), "best": None, "config": {}, "meta_step": 0})
    common = ["--checkpoint", ckpt, "--tasks", "mnist_mlp,quadratic", "--steps", "4", "--seeds", "3",
              "--tuning-seeds", "2", "--baselines", "sgd,adam", "--grid", "0.01,1,3", "--test-points", "2",
              "--data-dir", tiny_data, "--no-progress", "--no-cache"]
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "meta_eval.py"), *common, "--out", str(out),
                            "--workers", str(n)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("## quadratic") == 1  # rank 0 alone prints
        outs[n] = json.loads((out / "results.json").read_text())
        assert sorted(os.listdir(out)) == ["mnist_mlp.png", "quadratic.png", "results.json", "results.md", "speedup.png", "tb"]
    one, two = _numbers(outs[1]), _numbers(outs[2])
    assert one == two and len(one) > 100


def test_backend_must_fit_the_device_even_in_one_process(tmp_path, capsys):
    import meta_train

    from l2o import distributed

    assert distributed.choose_backend("cpu") == "gloo" and distributed.choose_backend("cuda") == "nccl"
    assert distributed.choose_backend("cuda", "gloo") == "gloo"
    for backend, needle in (("nccl", "needs CUDA"), ("mpi", "unknown --dist-backend")):
        code = meta_train.main(["--task", "quadratic", "--dist-backend", backend, "--no-progress",
                                "--log-dir", str(tmp_path / "runs"), "--checkpoint", str(tmp_path / "ck.pt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "ck.pt") and not os.path.exists(tmp_path / "runs")


def test_nccl_needs_a_gpu_per_process_on_the_node():
    from l2o import distributed

    distributed.check_gpus("nccl", 1, 1)
    distributed.check_gpus("nccl", 4, 8)
    distributed.check_gpus("gloo", 4, 1)  # gloo shares one GPU among processes
    with pytest.raises(distributed.UsageError, match="2 processes on this node, 1 GPU"):
        distributed.check_gpus("nccl", 2, 1)


def test_one_process_context_is_the_identity():
    from l2o import distributed

    ctx = distributed.LOCAL
    assert not ctx.active and ctx.is_main and ctx.shard(3) == range(3)
    assert ctx.map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9] and ctx.decide(lambda: 7) == 7
    rows = torch.ones(2, 3)
    assert ctx.all_gather(rows) is rows
    two = distributed.Context(rank=1, world_size=2)
    assert two.shard(4) == range(2, 4)
    with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
        two.shard(3)


def test_threads_explicit_flag_wins_default_shares_the_cores(monkeypatch):
    from l2o import cli, distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "L2O_THREADS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(distributed, "default_threads", lambda local: 8 // local)  # an 8-core machine
    assert distributed.threads_for(None) == 1 and distributed.threads_for(3) == 3  # one process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: as one process
    assert distributed.threads_for(None, one_process=1) == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.threads_for(None) == 4  # cores / this machine's ranks
    assert distributed.threads_for(3) == 3  # an explicit --threads wins (it was overridden by cores / ranks)
    monkeypatch.setenv("L2O_THREADS", "2")
    assert distributed.threads_for(None) == 2 and distributed.threads_for(5) == 5
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert cli.set_threads(None) == 2 and cli.set_threads(7) == 7 and set_to == [2, 7]
    import meta_train

    assert meta_train.parser().parse_args([]).threads is None  # so an explicit --threads 1 can be told apart
    assert meta_train.parser().parse_args(["--threads", "1"]).threads == 1


def test_member_balance_on_a_family_two_processes_equal_one(tmp_path):
    """--member-balance scales each member before the gather: 2 ranks == 1 process to the bit, per-member Adam too."""
    fam = ["--family", "quadratic:dim=2-5", "--member-balance", "--meta-steps", "2"]
    d = tmp_path / "dist"
    d.mkdir()
    r = torchrun(d, *fam, "--threads", "1")
    assert r.returncode == 0, r.stderr
    one = fit(reference(tmp_path / "one", family="quadratic:dim=2-5", member_balance=True, meta_steps=2), progress=False)
    ck = torch.load(str(d / "ck.pt"), weights_only=True)
    assert_close(ck["optimizer"]["state_dict"], weights(str(tmp_path / "one" / "ck.pt")))
    assert ck["extra"]["adam_members"] == one.extra["adam_members"] and ck["extra"]["history"] == one.extra["history"]
