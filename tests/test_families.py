"""Registries' conformance (every optimizer in ``optim.NAMES``, every task in ``tasks.TASKS``, every family in
``tasks.FAMILIES``) and task families: deterministic sampling, valid members, a finite normalised objective."""
from __future__ import annotations

import math

import pytest
import torch

import l2o
from l2o import optim, tasks
from l2o.hypergrad import reverse, unroll
from l2o.tasks import BatchStream, seeded

from test_hypergrad import FD_EPS, META_WEIGHTS, MLP0, mlp_inner, mlp_outer

SMALL_TASK_OPTIONS = {"hidden": [4], "batch_size": 8}


def build_task(name: str, data_dir: str) -> tasks.Task:
    """Any registered task, small: options it accepts among a few shared ones (never chosen by task name)."""
    known = tasks.options(name)
    opts = {k: v for k, v in SMALL_TASK_OPTIONS.items() if k in known}
    if "data_dir" in known:
        opts["data_dir"] = data_dir
    if "hidden" in opts and "activation" not in known:  # a conv task's hidden is one width
        opts["hidden"] = opts["hidden"][0]
    return tasks.get(name, **opts)


def members(source: tasks.Task, seeds=range(4)):
    for s in seeds:
        g = seeded(s, 0)
        prob = source.sample(g)
        yield s, prob, prob.init(g), BatchStream(prob, "train", seeded(s, 1))


def normalised_curve(prob, params, stream, steps: int = 4) -> list[float]:
    """``log(loss_t / loss_0)`` along a few Adam steps."""
    losses = unroll(lambda p, h, t: prob.loss(p, stream[t]), params, {}, optim.Adam(lr=1e-2), steps, graph=False).losses
    return [math.log(l / losses[0]) for l in losses]


# ============================================================================= optimizers
@pytest.mark.parametrize("name", list(optim.NAMES))
def test_every_optimizer_is_out_of_place_and_differentiable(name):
    """``optim.make(name)`` with its defaults: pure steps, and reverse-mode hypergradients of its own
    meta-parameters equal central finite differences in float64."""
    torch.manual_seed(0)
    opt = optim.make(name)
    params = {k: v.clone() for k, v in MLP0.items()}
    before = {k: v.clone() for k, v in params.items()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = opt.init(params)
    new, _ = opt.step(params, grads, state)
    assert new.keys() == params.keys() and all(new[k].shape == params[k].shape for k in params)
    assert all(torch.equal(params[k], before[k]) for k in params), "step changed its input"
    h = dict(opt.named_parameters())
    assert h, f"{name} has no meta-parameters"
    g = reverse(mlp_inner, mlp_outer, params, h, opt, steps=4, meta_weights=META_WEIGHTS[:4])
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype) for k, t in h.items()}

    def objective(sign: float) -> float:
        with torch.no_grad():
            for k in h:
                h[k].add_(sign * FD_EPS * v[k])
        res = unroll(mlp_inner, params, {}, opt, 4, graph=False, meta_weights=META_WEIGHTS[:4])
        out = float(res.meta_loss) + float(mlp_outer(res.params, {}))
        with torch.no_grad():
            for k in h:
                h[k].sub_(sign * FD_EPS * v[k])
        return out

    fd = (objective(1.0) - objective(-1.0)) / (2 * FD_EPS)
    ours = float(sum((g[k] * v[k]).sum() for k in h))
    assert ours == pytest.approx(fd, rel=1e-6) and abs(fd) > 1e-8


# ============================================================================= tasks and families
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_samples_deterministically_with_finite_normalised_objective(tiny_data, name):
    task = build_task(name, tiny_data)
    a = list(members(task, range(2)))
    b = list(members(build_task(name, tiny_data), range(2)))
    for (_, pa, xa, sa), (_, pb, xb, sb) in zip(a, b):
        assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)
        assert torch.equal(pa.loss(xa, sa[0]), pb.loss(xb, sb[0]))
        assert all(math.isfinite(v) for v in normalised_curve(pa, xa, sa))


@pytest.mark.parametrize("name", list(tasks.FAMILIES))
def test_every_family_samples_valid_tasks_deterministically(tiny_data, name):
    fam = tasks.family(name, data_dir=tiny_data)
    first = list(members(fam, range(4)))
    again = list(members(tasks.family(name, data_dir=tiny_data), range(4)))
    for (s, p, x, st), (_, p2, x2, st2) in zip(first, again):
        assert p.name == p2.name and p.family in fam.components
        assert x.keys() == x2.keys() and all(torch.equal(x[k], x2[k]) for k in x)
        loss = p.loss(x, st[0])
        assert loss.dim() == 0 and math.isfinite(float(loss)) and torch.equal(loss, p2.loss(x2, st2[0]))
        curve = normalised_curve(p, x, st)
        assert all(math.isfinite(v) for v in curve), (p.name, curve)
    assert len({p.name for _, p, _, _ in first}) > 1, "a family that always samples the same task"


def test_mlp_family_ranges_and_init_scale(tiny_data):
    fam = tasks.family("mlp:dataset=fashion_mnist,width=10-12,depth=2,activation=elu,init_scale=3,batch_size=40-50",
                       data_dir=tiny_data)
    for _, prob, params, stream in members(fam, range(5)):
        inner = prob.task
        assert inner.dataset == "fashion_mnist" and inner.activation == "elu" and len(inner.hidden) == 2
        assert all(10 <= h <= 12 for h in inner.hidden) and 40 <= inner.batch_size <= 50
        assert stream[0][0].shape[0] == inner.batch_size
        plain, scaled = inner.init(seeded(0, 0)), prob.init(seeded(0, 0))
        assert prob.init_scale == 3.0 and all(torch.allclose(scaled[k], 3.0 * plain[k]) for k in plain)


def test_default_family_mixes_components_and_holds_cifar_when_present(tiny_data, tmp_path):
    fam = tasks.family("default", data_dir=tiny_data)
    assert fam.components == ("mlp", "conv", "quadratic")
    seen = {p.family for _, p, _, _ in members(fam, range(24))}
    assert seen == {"mlp", "conv", "quadratic"}
    no_cifar = tmp_path / "no_cifar"
    import shutil

    shutil.copytree(f"{tiny_data}/MNIST", no_cifar / "MNIST")
    shutil.copytree(f"{tiny_data}/FashionMNIST", no_cifar / "FashionMNIST")
    assert tasks.family("default", data_dir=str(no_cifar)).components == ("mlp", "quadratic")


def test_user_tasks_and_families(tiny_data):
    """A registered task is a family component; a registered family is a name like the built-in ones."""
    fam = tasks.family("quadratic:dim=3+mnist_mlp:hidden=5", data_dir=tiny_data)
    kinds = {p.family: p for _, p, _, _ in members(fam, range(12))}
    assert set(kinds) == {"quadratic", "mnist_mlp"}
    assert kinds["mnist_mlp"].task.hidden == [5]
    tasks.register_family("tiny_quads", lambda data_dir=None, device="cpu": tasks.Mixture(
        [tasks.families.QuadraticFamily(dim=(2, 3), device=device)], name="tiny_quads"))
    try:
        fam = tasks.family("tiny_quads")
        assert all(p.dim in (2, 3) for _, p, _, _ in ((s, m.task, x, st) for s, m, x, st in members(fam)))
    finally:
        del tasks.FAMILIES["tiny_quads"]


@pytest.mark.parametrize("spec,needle", [
    ("nope", "unknown family component 'nope'; choose one of conv, default, mlp, quadratic or a task: quadratic"),
    ("mlp:width", "malformed family spec 'mlp:width': expected key=value"),
    ("quadratic+my_tasks.py:make", "family component 'my_tasks.py:make' is an import path; components are named"),
    ("pkg.tasks:make", "goes in whole by import path instead: --task file.py:function returning it"),
    ("mlp:colour=red", "family 'mlp' has no option 'colour'; options: dataset, width"),
    ("mlp:width=9-3", "width range must satisfy"),
    ("mlp:activation=swish", "unknown activation 'swish'; choose from elu|relu|sigmoid|tanh"),
    ("quadratic:dim=1-2-3", "malformed range"),
    ("", "empty family spec"),
])
def test_bad_family_specs_name_the_choices(spec, needle):
    with pytest.raises(ValueError) as err:
        tasks.family(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_family_is_not_itself_an_optimizee():
    with pytest.raises(RuntimeError, match="sample a member first"):
        tasks.family("quadratic").init(seeded(0, 0))


def test_mixture_takes_a_users_family_and_a_single_task():
    """Beside l2o's families, a mixture takes any object whose sample(generator) gives a task (a user's family)
    and a single task (from_module); each member names its component, as validation reports per component."""
    from torch import nn

    class Widths:  # a user's family, duck-typed as in examples/user_tasks.py
        name = "widths"

        def sample(self, generator):
            w = int(torch.randint(2, 5, (), generator=generator))
            x = torch.randn(16, 3, generator=generator)
            return tasks.from_module(lambda: nn.Sequential(nn.Linear(3, w), nn.Tanh(), nn.Linear(w, 1)),
                                     (x, x[:, :1]), loss=lambda p, y: ((p - y) ** 2).mean(), batch_size=4)

    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    single = tasks.from_module(lambda: nn.Linear(3, 2), (x, (x[:, 0] > 0).long()), batch_size=4, name="lin")
    mix = tasks.Mixture([tasks.family("quadratic:dim=2-3"), Widths(), single], name="mine")
    assert mix.components == ("quadratic", "widths", "lin")
    seen = set()
    for seed in range(40):
        m = mix.sample(seeded(seed, 0))
        assert isinstance(m, tasks.families.Member)
        params = m.init(seeded(seed, 1))
        assert torch.isfinite(m.loss(params, m.batch("train", seeded(seed, 2))))
        seen.add(m.family)
    assert seen == {"quadratic", "widths", "lin"}
    with pytest.raises(TypeError, match="components are families or tasks"):
        tasks.Mixture([tasks.family("quadratic"), "mnist_mlp"])
