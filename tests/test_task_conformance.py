"""One conformance test for every task in ``l2o.tasks.TASKS``: built-ins and registered user tasks alike.

A task registered with ``l2o.tasks.register`` (or reached through an import path) is in
``TASKS`` and so is tested here automatically; this module registers two user tasks of
its own (one from ``from_module``, one family from the examples' task file) so the loop
always covers user code.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import l2o
from l2o.tasks import ModuleTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_FAMILY = os.path.join(ROOT, "examples", "user_tasks.py") + ":TeacherFamily"


def tiny_regression(batch_size: int = 16) -> l2o.tasks.Task:
    """A user task: a 2-layer regression MLP on generated data, mean-squared error written out (forward-mode safe)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    return l2o.tasks.from_module(lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)), (x, y),
                                 loss=lambda out, t: ((out - t) ** 2).mean(), batch_size=batch_size)


l2o.tasks.register("test_user_regression", tiny_regression)
l2o.tasks.check(EXAMPLE_FAMILY)  # registers the import path under itself
SMALL = {"cifar10_conv": {"channels": 3, "hidden": 5, "batch_size": 8}, "mnist_mlp": {"hidden": [6]},
         "fashion_mnist_mlp": {"hidden": [6]}, "quadratic": {"dim": 4}}


def build(name: str, data_dir: str) -> l2o.tasks.Task:
    opts = dict(SMALL.get(name, {}))
    if "data_dir" in l2o.tasks.options(name):
        opts["data_dir"] = data_dir
    return l2o.tasks.get(name, **opts)


def test_user_tasks_are_in_the_loop():
    assert {"test_user_regression", EXAMPLE_FAMILY} <= set(l2o.tasks.TASKS)


@pytest.mark.parametrize("name", sorted(l2o.tasks.TASKS))
def test_task_conformance(tiny_data, name):
    task = build(name, tiny_data)
    rng = torch.get_rng_state()
    problem = task.sample(torch.Generator().manual_seed(1))
    params = problem.init(torch.Generator().manual_seed(2))
    again = task.sample(torch.Generator().manual_seed(1)).init(torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), rng)  # sampling and init leave the global RNG alone
    assert params.keys() == again.keys() and all(torch.equal(params[k], again[k]) for k in params)
    assert all(v.dtype == torch.float64 and not v.requires_grad for v in params.values())
    batch = problem.batch("train", torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="split"):
        problem.batch("val", torch.Generator())

    # the loss: a finite scalar, pure (same value twice, params untouched)
    before = {k: v.clone() for k, v in params.items()}
    loss = problem.loss(params, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.equal(problem.loss(params, batch), loss)
    assert all(torch.equal(params[k], before[k]) for k in params)
    if isinstance(problem, ModuleTask):
        x, y = batch
        ref = problem.criterion(functional_call(problem.module, params, (x,)), y)
        torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)

    # reverse mode against a central finite difference along a random direction (float64)
    gen = torch.Generator().manual_seed(4)
    v = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    p = {k: t.clone().requires_grad_() for k, t in params.items()}
    grads = torch.autograd.grad(problem.loss(p, batch), list(p.values()))
    directional = sum((g * v[k]).sum() for k, g in zip(p, grads))
    h = 1e-6
    plus = problem.loss({k: t + h * v[k] for k, t in params.items()}, batch)
    minus = problem.loss({k: t - h * v[k] for k, t in params.items()}, batch)
    torch.testing.assert_close(directional, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-8)

    # forward mode: the tangent is the same directional derivative
    with fwAD.dual_level():
        out = fwAD.unpack_dual(problem.loss({k: fwAD.make_dual(t, v[k]) for k, t in params.items()}, batch))
        tangent = out.tangent.clone()
    torch.testing.assert_close(tangent, directional, rtol=1e-10, atol=1e-12)

    # evaluation hooks: a whole split, and the options that rebuild an equal task
    full = problem.full_batch("test")
    if full is not None:
        assert torch.isfinite(problem.loss(params, full))
    acc = problem.accuracy(params, batch)
    assert acc is None or 0.0 <= float(acc) <= 1.0
    opts = dict(task.config())
    if "data_dir" in l2o.tasks.options(name):
        opts["data_dir"] = tiny_data
    rebuilt = l2o.tasks.get(name, **opts).sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(rebuilt.loss(params, batch), loss, rtol=0, atol=0)
