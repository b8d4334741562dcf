"""Regression tasks of a user's kind, for ``meta_eval.py --tasks`` (none is in the suite or the family).

A 16-64-64-1 tanh MLP fits ``y = a * (tanh(x.w / 4) + 0.3 sin(2 x_1) + 0.05 noise)`` on 2,048
fixed synthetic points by mean squared error; ``a`` sets the loss scale (1, 100, 0.01), which
tuned Adam does not care about (beyond its epsilon) and a learned optimizer trained on
cross-entropy losses of order 1 may. A variant with BatchNorm and ReLU is added. Nothing is
downloaded::

    python meta_eval.py --tasks benchmarks/regression_tasks.py:targets_x1,benchmarks/regression_tasks.py:targets_x100 \\
        --checkpoint lstm_generalist --baselines adam --steps 200 --seeds 10 --out runs/eval_regression
"""
from __future__ import annotations

import torch
from torch import nn

import l2o


def _data(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12345)
    x = torch.randn(2048, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = scale * (torch.tanh(x @ w / 4) + 0.3 * torch.sin(2 * x[:, :1]) + 0.05 * torch.randn(2048, 1, generator=g))
    return x, y


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()  # not F.mse_loss: forward-mode AD fails through it in torch 2.14


def _tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def _bn_relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64),
                         nn.ReLU(), nn.Linear(64, 1))


def _task(build, scale: float, name: str) -> l2o.tasks.Task:
    return l2o.tasks.from_module(build, _data(scale), loss=_mse, batch_size=64, name=name)


def targets_x1() -> l2o.tasks.Task:
    return _task(_tanh_mlp, 1.0, "regression_x1")


def targets_x100() -> l2o.tasks.Task:
    return _task(_tanh_mlp, 100.0, "regression_x100")


def targets_x001() -> l2o.tasks.Task:
    return _task(_tanh_mlp, 0.01, "regression_x0.01")


def batchnorm_x1() -> l2o.tasks.Task:
    return _task(_bn_relu_mlp, 1.0, "regression_bn_x1")
