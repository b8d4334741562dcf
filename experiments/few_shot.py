"""Few-shot building blocks of the hyper-representation experiment: episodes, representations, heads.

An N-way K-shot episode draws N classes and K + Q images of each; the linear head on its
features starts from zero and is fit on the K support images per class (``head_problem``:
the inner and outer losses of a stack of episodes, each head seeing only its own
gradient); ``interval`` is the mean accuracy with its 95% normal-approximation half-width.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import common


def class_pools(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], rotations: int = 1) -> list[torch.Tensor]:
    """The images of each class; with ``rotations`` > 1 each (class, quarter turn) is a class of its own,
    as Omniglot's rotated characters are (Santoro et al. 2016; Vinyals et al. 2016)."""
    return [torch.rot90(x[y == c], r, dims=(-2, -1)) for c in classes for r in range(rotations)]


class Episodes:
    """N-way K-shot episodes from a list of classes (``pools`` of images); labels are a fresh random order.
    The pools are kept as views of one tensor ``images`` so that an episode can also be a set of indices."""

    def __init__(self, pools: list[torch.Tensor], name: str) -> None:
        self.images = torch.cat(pools)
        self.pools, self.name = list(self.images.split([len(p) for p in pools])), name
        self.offsets = [0] + torch.tensor([len(p) for p in pools]).cumsum(0).tolist()[:-1]

    def check(self, per_class: int) -> None:
        have = min(len(p) for p in self.pools)
        if have < per_class:
            raise common.UsageError(f"{self.name} episodes need {per_class} images per class (shots + queries) "
                                    f"but a class has only {have}; lower --shots, --train-shots or --queries")

    def sample_index(self, n: int, ways: int, shots: int, queries: int, gen: torch.Generator):
        """``n`` stacked episodes as rows of ``images``: support [n, ways*shots], query [n, ways*queries]."""
        picks = []
        for _ in range(n):
            classes = torch.randperm(len(self.pools), generator=gen)[:ways]
            picks.append(torch.stack([self.offsets[c] + torch.randperm(len(self.pools[c]), generator=gen)[
                :shots + queries] for c in classes.tolist()]))
        idx = torch.stack(picks)  # [n, ways, shots + queries]
        return idx[:, :, :shots].reshape(n, -1), idx[:, :, shots:].reshape(n, -1)

    @staticmethod
    def labels(n: int, ways: int, k: int) -> torch.Tensor:
        """Class-major labels of ``k`` examples per class, [n, ways*k]."""
        return torch.arange(ways).repeat_interleave(k).expand(n, -1)

    def sample(self, n: int, ways: int, shots: int, queries: int, gen: torch.Generator):
        """``n`` stacked episodes: support x [n, ways*shots, 1, 28, 28], y [n, ways*shots]; query likewise."""
        si, qi = self.sample_index(n, ways, shots, queries, gen)
        return self.images[si], self.labels(n, ways, shots), self.images[qi], self.labels(n, ways, queries)

    def chunks(self, n: int, ways: int, shots: int, queries: int, seed: int, chunk: int = 1000):
        """The same ``n`` episodes (as indices) for every caller with the same ``seed``, ``chunk`` at a time."""
        gen = torch.Generator().manual_seed(seed)
        for at in range(0, n, chunk):
            yield self.sample_index(min(chunk, n - at), ways, shots, queries, gen)


class UnitNorm(nn.Module):
    """Scales each feature vector to unit length (the head's logits become cosine-like similarities)."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def representation(arch: str, hidden: list[int], norm: bool = False) -> nn.Sequential:
    """``mlp``: Linear+ReLU layers of widths ``hidden``; ``conv``: stride-2 3x3 convolutions + ReLU of
    ``hidden`` channels, then a global mean over positions; ``norm``: then unit length."""
    layers: list[nn.Module] = [nn.Flatten()] if arch == "mlp" else []
    d = 28 * 28 if arch == "mlp" else 1
    for h in hidden:
        layers += [nn.Linear(d, h) if arch == "mlp" else nn.Conv2d(d, h, 3, stride=2, padding=1), nn.ReLU()]
        d = h
    if arch == "conv":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if norm:
        layers.append(UnitNorm())
    return nn.Sequential(*layers)


def head_problem(fs: torch.Tensor, ys: torch.Tensor, fq: torch.Tensor, yq: torch.Tensor, ways: int):
    """Inner loss, outer loss and zero head for stacked episodes of features ``fs`` [B, n, d], ``fq``."""
    def logits(p: dict, f: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(p["b"][:, None], f, p["W"])

    def ce(p: dict, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # one mean loss per episode, [B]
        return -logits(p, f).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1).mean(-1)

    inner = lambda p, h, t: ce(p, fs, ys).sum()  # noqa: E731 - a sum: each episode's head sees its own gradient
    outer = lambda p, h: ce(p, fq, yq).mean()  # noqa: E731
    params0 = {"W": fs.new_zeros(fs.shape[0], fs.shape[-1], ways), "b": fs.new_zeros(fs.shape[0], ways)}
    return inner, outer, params0, logits


def interval(acc: torch.Tensor) -> dict[str, float]:
    """Mean and 95% normal-approximation half-width over episodes."""
    return {"mean": float(acc.mean()), "ci95": 1.96 * float(acc.std()) / math.sqrt(len(acc)), "n": len(acc)}
