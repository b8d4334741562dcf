"""Task families: distributions over optimizees, so a learned optimizer meets many tasks.

A family is a :class:`~l2o.tasks.Task` whose :meth:`sample` draws a *new task* per call
(dataset, architecture, activation, initialisation scale, batch size), deterministically
from the generator; the trainer samples one per member of a meta-batch, so a meta-batch
mixes tasks of different sizes. Each sampled member carries ``member.family`` (the
component it came from), used to report validation per family.

Components (options; ``lo-hi`` ranges are sampled log-uniformly, ``a|b`` uniformly):

* ``mlp``: ``dataset`` mnist|fashion_mnist, ``width`` 10-128, ``depth`` 1-3,
  ``activation`` sigmoid|relu|tanh|elu, ``init_scale`` 0.5-2, ``batch_size`` 32-256;
* ``conv``: small CIFAR-10 convnets, ``channels`` 4-16, ``hidden`` 16-64, ``batch_size`` 32-256;
* ``quadratic``: ``||W x - y||^2``, ``dim`` 5-20;
* any task name of :data:`l2o.tasks.TASKS` (a user's registered task too), with its options.

Named families (:data:`FAMILIES`): ``default`` (mlp + quadratic, + conv when a CIFAR-10
folder is present under the data root), ``mlp``, ``conv``, ``quadratic``. Give one's own
as a spec string, components joined by ``+``::

    --family "mlp:dataset=fashion_mnist,width=16-64,activation=relu|elu+quadratic:dim=5-10+mnist_mlp"

or in Python: ``Mixture([MLPFamily(...), TaskFamily("my_task"), MyFamily(), from_module(...)])``
(a user's family is any object whose ``sample(generator)`` returns a task), or
``register_family("mine", lambda **kw: Mixture([...]))`` then ``--family mine``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .base import Batch, Params, Task
from .conv import ConvTask
from .mlp import ACTIVATIONS, MLPTask
from .quadratic import QuadraticTask

Range = tuple[float, float]


def _log_uniform(lo: float, hi: float, g: torch.Generator) -> float:
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    return lo * (hi / lo) ** u


def _int(r: Range, g: torch.Generator) -> int:
    lo, hi = r
    return min(int(hi), max(int(lo), int(round(_log_uniform(lo, hi, g)))))


def _choice(seq: Sequence, g: torch.Generator):
    return seq[int(torch.randint(len(seq), (), generator=g))]


def _check_range(name: str, r: Range, low: float) -> Range:
    lo, hi = float(r[0]), float(r[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi):
        raise ValueError(f"{name} range must satisfy {low:g} <= lo <= hi, got {r[0]}-{r[1]}")
    return lo, hi


def _check_choices(name: str, given: Sequence[str], valid: Sequence[str]) -> list[str]:
    given = [given] if isinstance(given, str) else list(given)
    bad = [x for x in given if x not in valid]
    if not given or bad:
        raise ValueError(f"unknown {name} {bad[0] if bad else ''!r}; choose from {'|'.join(valid)}")
    return given


class Member(Task):
    """One sampled task of a family: delegates to ``task``, scales the initial weights by ``init_scale``."""

    def __init__(self, task: Task, family: str, init_scale: float = 1.0, description: str = "") -> None:
        self.task, self.family, self.init_scale = task, family, float(init_scale)
        self.name = description or getattr(task, "name", family)

    def init(self, generator: torch.Generator) -> Params:
        params = self.task.init(generator)
        return params if self.init_scale == 1.0 else {k: v * self.init_scale for k, v in params.items()}

    def batch(self, split: str, generator: torch.Generator) -> Batch:
        return self.task.batch(split, generator)

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        return self.task.loss(params, batch)

    def accuracy(self, params: Params, batch: Batch):
        return self.task.accuracy(params, batch)

    def full_batch(self, split: str):
        return self.task.full_batch(split)

    def config(self) -> dict:
        return {"family": self.family, "init_scale": self.init_scale, **self.task.config()}


class Family(Task):
    """Base class: a distribution over tasks. Subclasses implement :meth:`sample`."""

    name = "family"
    components: tuple[str, ...] = ()

    def sample(self, generator: torch.Generator) -> Member:
        raise NotImplementedError

    def init(self, generator):
        raise RuntimeError(f"{self.name} is a task family: sample a member first (family.sample(generator))")

    batch = loss = init


class MLPFamily(Family):
    """MLP classifiers on MNIST-like images with random width, depth, activation, init scale and batch size."""

    name = "mlp"

    def __init__(self, dataset: Sequence[str] = ("mnist", "fashion_mnist"), width: Range = (10, 128),
                 depth: Range = (1, 3), activation: Sequence[str] = ("sigmoid", "relu", "tanh", "elu"),
                 init_scale: Range = (0.5, 2.0), batch_size: Range = (32, 256), data_dir: str | None = None,
                 device: str = "cpu") -> None:
        self.dataset = _check_choices("dataset", dataset, ("mnist", "fashion_mnist"))
        self.activation = _check_choices("activation", activation, sorted(ACTIVATIONS))
        self.width, self.depth = _check_range("width", width, 1), _check_range("depth", depth, 1)
        self.init_scale = _check_range("init_scale", init_scale, 1e-6)
        self.batch_size = _check_range("batch_size", batch_size, 1)
        self.data_dir, self.device = data_dir, device
        self.components = ("mlp",)

    def sample(self, generator: torch.Generator) -> Member:
        ds, depth = _choice(self.dataset, generator), int(torch.randint(int(self.depth[0]), int(self.depth[1]) + 1,
                                                                        (), generator=generator))
        hidden = [_int(self.width, generator) for _ in range(depth)]
        act, scale = _choice(self.activation, generator), _log_uniform(*self.init_scale, generator)
        bs = _int(self.batch_size, generator)
        task = MLPTask(ds, hidden, act, bs, self.data_dir, self.device)
        return Member(task, "mlp", scale, f"mlp {ds} {'x'.join(map(str, hidden))} {act} init*{scale:.2g} b{bs}")


class ConvFamily(Family):
    """Small CIFAR-10 convnets (three conv layers) with random channels, hidden width and batch size."""

    name = "conv"

    def __init__(self, channels: Range = (4, 16), hidden: Range = (16, 64), batch_size: Range = (32, 256),
                 data_dir: str | None = None, device: str = "cpu") -> None:
        self.channels, self.hidden = _check_range("channels", channels, 1), _check_range("hidden", hidden, 1)
        self.batch_size = _check_range("batch_size", batch_size, 1)
        self.data_dir, self.device = data_dir, device
        self.components = ("conv",)

    def sample(self, generator: torch.Generator) -> Member:
        c, h, bs = _int(self.channels, generator), _int(self.hidden, generator), _int(self.batch_size, generator)
        return Member(ConvTask(c, h, bs, self.data_dir, self.device), "conv", 1.0, f"conv c{c} h{h} b{bs}")


class QuadraticFamily(Family):
    """The L2L quadratics ``||W x - y||^2`` with a random dimension."""

    name = "quadratic"

    def __init__(self, dim: Range = (5, 20), device: str = "cpu", data_dir: str | None = None) -> None:
        self.dim, self.device = _check_range("dim", dim, 1), device
        self.components = ("quadratic",)

    def sample(self, generator: torch.Generator) -> Member:
        d = _int(self.dim, generator)
        return Member(QuadraticTask(d, device=self.device).sample(generator), "quadratic", 1.0, f"quadratic d{d}")


class TaskFamily(Family):
    """A registered task (built-in or a user's) as a family component: each member is ``task.sample(g)``."""

    def __init__(self, name: str, **options: Any) -> None:
        from .registry import get

        self.task = get(name, **options)
        self.name, self.components = name, (name,)

    def sample(self, generator: torch.Generator) -> Member:
        return Member(self.task.sample(generator), self.name, 1.0, self.name)


class _Component(Family):
    """A user's family or task (anything with ``sample(generator) -> Task``) as a component of a mixture."""

    def __init__(self, part: Any) -> None:
        self.part = part
        self.name = str(getattr(part, "name", "") or type(part).__name__)
        self.components = (self.name,)

    def sample(self, generator: torch.Generator) -> Member:
        task = self.part.sample(generator)
        return task if isinstance(task, Member) else Member(task, self.name, 1.0, getattr(task, "name", self.name))


class Mixture(Family):
    """Each member comes from one component, chosen uniformly (or by ``weights``).

    Components are families (``family("quadratic")``, ``MLPFamily(...)``), a user's own
    family (any object whose ``sample(generator)`` returns a task) or a single task
    (``from_module(...)``)."""

    def __init__(self, parts: Sequence[Family], weights: Sequence[float] | None = None, name: str = "mixture") -> None:
        if not parts:
            raise ValueError("a family mixture needs at least one component")
        bad = [p for p in parts if not callable(getattr(p, "sample", None))]
        if bad:
            raise TypeError(f"a mixture's components are families or tasks (with sample(generator)), got "
                            f"{type(bad[0]).__name__}")
        parts = [p if isinstance(p, Family) else _Component(p) for p in parts]
        w = [1.0] * len(parts) if weights is None else [float(x) for x in weights]
        if len(w) != len(parts) or min(w) <= 0:
            raise ValueError("mixture weights must be positive, one per component")
        self.parts, self.name = list(parts), name
        self.cum = torch.tensor(w, dtype=torch.float64).cumsum(0) / sum(w)
        self.components = tuple(c for p in self.parts for c in p.components)

    def sample(self, generator: torch.Generator) -> Member:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        i = min(int((self.cum < u).sum()), len(self.parts) - 1)
        return self.parts[i].sample(generator)


KINDS: dict[str, type[Family]] = {"mlp": MLPFamily, "conv": ConvFamily, "quadratic": QuadraticFamily}


def _default(data_dir: str | None = None, device: str = "cpu") -> Family:
    from .data import cifar10_folder, data_root

    parts: list[Family] = [MLPFamily(data_dir=data_dir, device=device), QuadraticFamily(device=device)]
    if cifar10_folder(data_root(data_dir)):
        parts.insert(1, ConvFamily(data_dir=data_dir, device=device))
    return Mixture(parts, name="default")


FAMILIES: dict[str, Callable[..., Family]] = {
    "default": _default,
    "mlp": MLPFamily,
    "conv": ConvFamily,
    "quadratic": QuadraticFamily,
}


def register_family(name: str, factory: Callable[..., Family]) -> None:
    """Make ``factory(data_dir=..., device=...) -> Family`` available as ``--family name``."""
    if not name or any(c in name for c in ":+,="):
        raise ValueError(f"family name {name!r} must be non-empty without ':', '+', ',' or '='")
    FAMILIES[name] = factory


def _value(text: str) -> Any:
    """``a|b`` -> list of str; ``lo-hi`` -> (lo, hi); a number -> (x, x); else the string."""
    if "|" in text:
        return [t for t in text.split("|")]
    parts = text.split("-")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        return text
    if len(nums) == 1:
        return (nums[0], nums[0])
    if len(nums) == 2:
        return (nums[0], nums[1])
    raise ValueError(f"malformed range {text!r}; write lo-hi")


def parse(spec: str, data_dir: str | None = None, device: str = "cpu") -> Family:
    """Build a family from a name or a spec ``component[:key=value,...][+component...]``.

    Raises:
        ValueError: unknown family or component, malformed spec or bad option, naming the valid choices.
    """
    from .registry import TASKS

    if not isinstance(spec, str):
        raise TypeError(f"a family spec must be a str such as 'mlp+quadratic', got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError(f"empty family spec; choose one of {', '.join(FAMILIES)} or write component:key=value+...")
    if spec in FAMILIES:
        return _named(spec, FAMILIES[spec], {}, data_dir, device)
    parts = []
    for comp in spec.split("+"):
        name, _, opts_text = comp.strip().partition(":")
        if opts_text and "=" not in opts_text and ("/" in name or name.endswith(".py") or "." in name):
            raise ValueError(f"family component {comp.strip()!r} is an import path; components are named (see "
                             f"--help); a family with one's own tasks goes in whole by import path instead: --task "
                             f"file.py:function returning it, e.g. l2o.tasks.Mixture([l2o.tasks.family('quadratic'), "
                             f"MyFamily()])")
        opts: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in opts_text.split(","))):
            key, eq, val = item.partition("=")
            if not eq or not key or not val:
                raise ValueError(f"malformed family spec {spec!r}: expected key=value, got {item!r}")
            opts[key.strip()] = _value(val.strip())
        if name in KINDS:
            parts.append(_named(name, KINDS[name], opts, data_dir, device))
        elif name in FAMILIES and not opts:
            parts.append(_named(name, FAMILIES[name], {}, data_dir, device))
        elif name in TASKS:
            from .registry import options as task_options

            known = task_options(name)
            kw = {k: (v[0] if isinstance(v, tuple) and v[0] == v[1] else v) for k, v in opts.items()}
            kw = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in kw.items()}
            for k, v in (("data_dir", data_dir), ("device", device)):
                if k in known:
                    kw.setdefault(k, v)
            parts.append(TaskFamily(name, **kw))
        else:
            raise ValueError(f"unknown family component {name!r}; choose one of {', '.join(sorted(set(KINDS) | set(FAMILIES)))} "
                             f"or a task: {', '.join(TASKS)}")
    return parts[0] if len(parts) == 1 else Mixture(parts, name=spec)


def _named(name: str, factory: Callable[..., Family], opts: dict, data_dir: str | None, device: str) -> Family:
    import inspect

    try:
        sig = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        sig = {}
    known = [k for k in sig if k not in ("self", "data_dir", "device")]
    bad = [k for k in opts if k not in known]
    if bad:
        raise ValueError(f"family {name!r} has no option {bad[0]!r}; options: {', '.join(known) or 'none'}")
    kw = {k: v for k, v in (("data_dir", data_dir), ("device", device)) if k in sig or not sig}
    fam = factory(**kw, **opts)
    fam.name = name if fam.name in ("family", "mixture") else fam.name
    return fam
