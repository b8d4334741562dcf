"""User-defined tasks, written with plain PyTorch: a task family and a single task.

Nothing here is part of l2o; it is the kind of file a user writes and points the CLIs at:

    python meta_train.py --task examples/user_tasks.py:TeacherFamily ...
    python meta_eval.py --tasks examples/user_tasks.py:wide_task ...

(``my_package.my_tasks:TeacherFamily`` works the same for an importable module.)

The problems: classify ``dim``-dimensional Gaussian inputs into ``classes`` classes by
the labels of a random *teacher* MLP; the optimizee is a *student* MLP of its own width
and depth. Data are generated, so the file runs anywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import l2o

DIM, CLASSES = 16, 4


def student(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    prev = DIM
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.Tanh()]
        prev = width
    return nn.Sequential(*layers, nn.Linear(prev, CLASSES))


def teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs and the labels a random teacher network (fixed by ``seed``) gives them."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(DIM, 32, generator=gen) / DIM ** 0.5
    w2 = torch.randn(32, CLASSES, generator=gen) / 32 ** 0.5
    x = torch.randn(n, DIM, generator=gen)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def make_task(width: int = 32, depth: int = 1, seed: int = 0, n_train: int = 1024, batch_size: int = 64,
              device: str = "cpu") -> l2o.tasks.Task:
    """One teacher problem as an l2o task, built with ``l2o.tasks.from_module``."""
    x, y = teacher_data(n_train + 512, seed)
    return l2o.tasks.from_module(lambda: student(width, depth), (x[:n_train], y[:n_train]),
                                 (x[n_train:], y[n_train:]), loss=F.cross_entropy, batch_size=batch_size,
                                 name=f"teacher_w{width}_d{depth}", device=device)


def wide_task(device: str = "cpu") -> l2o.tasks.Task:
    """A held-out task: a wider, deeper student than any the family samples, on an unseen teacher."""
    return make_task(width=96, depth=2, seed=12345, device=device)


class TeacherFamily(l2o.tasks.Task):
    """A task family: every ``sample`` is a new teacher and a student of random width 8-64 and depth 1-2.

    l2o's meta-trainer calls ``sample(generator)`` for every member of a meta-batch (and for
    validation and evaluation seeds), so a meta-batch mixes students of different sizes.
    """

    name = "teacher_family"

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size, self.device = int(batch_size), device

    def sample(self, generator: torch.Generator) -> l2o.tasks.Task:
        width = int(torch.randint(8, 65, (), generator=generator))
        depth = int(torch.randint(1, 3, (), generator=generator))
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        return make_task(width, depth, seed, batch_size=self.batch_size, device=self.device)

    def config(self) -> dict:
        return {"batch_size": self.batch_size}

    def to(self, device):
        self.device = str(device)
        return self
