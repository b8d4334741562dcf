"""Held-out variants for ``meta_eval.py --tasks``: tasks in neither the default suite nor the family's ranges.

They check a learned optimizer (the shipped generalist above all) beyond what it was made and
chosen on; each takes ``data_dir`` as the built-in tasks do, so ``--data-dir`` reaches it::

    python meta_eval.py --data-dir DATA --tasks benchmarks/heldout_tasks.py:conv_c32_h64_b64 --steps 150 \\
        --checkpoint lstm_generalist --baselines adam --seeds 10

``--steps`` sets the horizon (the suite's entries carry their own; these run 100 steps unless given).
"""
from __future__ import annotations

from torch import nn

import l2o
from l2o.tasks.conv import ConvTask
from l2o.tasks.data import load
from l2o.tasks.mlp import MLPTask
from l2o.tasks.quadratic import QuadraticTask


def conv_c32_h64_b64(data_dir: str | None = None) -> ConvTask:
    """CIFAR-10 convnet with 32 channels (the family's widest has 16), 64 hidden units, batch 64."""
    return ConvTask(channels=32, hidden=64, batch_size=64, data_dir=data_dir)


def mnist_b512(data_dir: str | None = None) -> MLPTask:
    """The training task's MLP (1x20 sigmoid) with minibatches of 512 (the family's largest: 256)."""
    return MLPTask("mnist", (20,), "sigmoid", batch_size=512, data_dir=data_dir)


def mnist_2x64_relu_b64(data_dir: str | None = None) -> MLPTask:
    """MNIST MLP 2x64 ReLU, batch 64."""
    return MLPTask("mnist", (64, 64), "relu", batch_size=64, data_dir=data_dir)


def fashion_3x32_tanh(data_dir: str | None = None) -> MLPTask:
    """Fashion-MNIST MLP 3x32 tanh, batch 128."""
    return MLPTask("fashion_mnist", (32, 32, 32), "tanh", batch_size=128, data_dir=data_dir)


def quadratic_5d() -> QuadraticTask:
    """The L2L quadratics in 5 dimensions (run them over 300 steps)."""
    return QuadraticTask(dim=5)


def cifar10_mlp_relu(data_dir: str | None = None) -> l2o.tasks.Task:
    """An MLP on CIFAR-10's flattened colour images (3072-64-64-10, ReLU), a task kind the family has not."""
    train, test = load("cifar10", "train", data_dir), load("cifar10", "test", data_dir)
    build = lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                  nn.Linear(64, 10))
    return l2o.tasks.from_module(build, (train.x, train.y), (test.x, test.y), batch_size=128, name="cifar10_mlp_relu")

