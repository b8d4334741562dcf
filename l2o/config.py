"""Run configuration, split by concern: task / optimizer / estimator / outer loop / logging.

Each concern is its own dataclass with its own checks; :class:`TrainConfig` inherits
them all, so a run is still one flat record (``cfg.horizon``, ``cfg.to_dict()``) that a
checkpoint stores and a resumed run compares. The estimator's own options (truncation,
Neumann terms, PES population and sigma) are mapped onto its options class by
:func:`l2o.train.build_estimator`; a combination of method, objective and optimizer that
cannot run is refused here, or (when it depends on the meta-parameters) by the
estimator's ``check`` when the trainer is built, always as one :class:`UsageError` line.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .hypergrad import ESTIMATORS
from .optim import NAMES as OPTIMIZERS
from .schedule import Phase, parse as parse_schedule, total as schedule_total
from .tasks import check as check_task, options as task_option_names

METHODS = tuple(ESTIMATORS)
OBJECTIVES = ("sum_train", "final_train", "final_test", "normalised")
# Presets of meta_train.py (explicit flags override them). "quick" is the README's main job:
# within ~10 minutes on 2 CPU cores the LSTM's validation loss is below tuned Adam's
# (benchmarks/RESULTS.md); "paper" is the full recipe (stage 1 of the shipped LSTM).
PRESETS: dict[str, dict[str, Any]] = {"quick": {"meta_steps": 60}, "paper": {"meta_steps": 200}}
SHORT = {"mnist_mlp": "mnist", "fashion_mnist_mlp": "fashion_mnist", "cifar10_conv": "cifar10", "quadratic": "quadratic"}


class UsageError(ValueError):
    """Bad user input; the CLIs print it as one line and exit with code 2."""


SEED_LIMIT = 2 ** 40


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def positive_ints(cfg: Any, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")


@dataclass
class TaskConfig:
    """The optimizee: one task, or a family of tasks (``family``: a name or spec, see :mod:`l2o.tasks.families`)."""

    task: str = "mnist_mlp"
    family: str | None = None
    hidden: list[int] | None = None          # task hidden sizes (mnist/fashion MLP) -> default of the task
    activation: str | None = None
    batch_size: int | None = None
    data_dir: str | None = None

    def task_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device": getattr(self, "device", "cpu")}
        if self.task != "quadratic":
            opts["data_dir"] = self.data_dir  # l2o.tasks.get drops a None data_dir for tasks that take none
        if self.task not in SHORT:  # a user task: pass only the options it takes
            for key in ("hidden", "activation", "batch_size"):
                if getattr(self, key) is not None:
                    if key not in task_option_names(self.task):
                        raise UsageError(f"--{key.replace('_', '-')} does not apply to task {self.task!r}")
                    opts[key] = getattr(self, key)
            return opts
        for key in ("hidden", "activation", "batch_size"):
            if getattr(self, key) is not None:
                if self.task == "quadratic" or (self.task == "cifar10_conv" and key == "activation"):
                    raise UsageError(f"--{key.replace('_', '-')} does not apply to task {self.task!r}")
                value = getattr(self, key)
                if key == "hidden" and self.task == "cifar10_conv":
                    need(len(value) == 1, f"--hidden for cifar10_conv is its one FC width, got {value}")
                    value = value[0]
                opts[key] = value
        return opts

    def validate_task(self) -> None:
        if self.family is not None:
            for key in ("hidden", "activation", "batch_size"):
                need(getattr(self, key) is None, f"--{key.replace('_', '-')} does not apply to a family; "
                                                 f"put it in the spec, e.g. --family mlp:width=20-40")
        else:
            try:
                check_task(self.task)  # a built-in, a registered name or an importable package.module:function
            except ValueError as exc:
                raise UsageError(str(exc)) from None


@dataclass
class OptimizerConfig:
    """The optimizer being meta-trained and which of its meta-parameters learn."""

    optimizer: str = "lstm"
    learn: list[str] | None = None           # hyperparameters to learn (hand-designed optimizers); None = all
    lstm_hidden: int = 20
    lstm_layers: int = 2
    inputs: str = "rich"
    output_scale: float = 0.1
    readout: str = "dir_mag"
    skip_gain: float = 1.0
    lr: float | None = None                  # initial hyperparameter values (hand-designed optimizers)
    momentum: float | None = None
    decay: float | None = None
    weight_decay: float | None = None
    per_parameter: bool = False              # one weight decay per weight
    adaptive_scale: float | None = None      # wrap in AdaptiveScale with this initial beta (learned with the rest)
    adaptive_scale_init: float = 0.0         # AdaptiveScale's log-scale at the start of every inner run
    adaptive_scale_shrink: float = 1.0       # AdaptiveScale's rate factor where the cosine is negative (all wrappers)
    plus: str | None = None                  # "NAME:LR": add a hand-designed optimizer's update (optim.Sum)
    plus_floor: float | None = None          # lowest log-scale of --plus's adapted scale (AdaptiveScale.min_log_scale)

    def plus_part(self) -> tuple[str, float] | None:
        """``--plus NAME:LR`` as ``(name, lr)``, None without it; a bad spec raises :class:`UsageError`."""
        if self.plus is None:
            return None
        name, colon, lr_text = str(self.plus).partition(":")
        try:
            lr = float(lr_text)
        except ValueError:
            lr = math.nan
        hand = [n for n in OPTIMIZERS if n != "lstm"]
        need(bool(colon) and name in hand and math.isfinite(lr) and lr > 0,
             f"--plus {self.plus!r}: give NAME:LR with NAME one of {', '.join(hand)} and LR > 0, e.g. adam:0.003")
        return name, lr

    def validate_optimizer(self) -> None:
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        need(self.adaptive_scale is None or (math.isfinite(self.adaptive_scale) and self.adaptive_scale > 0),
             f"--adaptive-scale must be a positive number (the initial adaptation rate, e.g. 0.3), got {self.adaptive_scale}")
        need(self.adaptive_scale_init == 0.0 or self.adaptive_scale is not None,
             "--adaptive-scale-init needs --adaptive-scale (it sets where that wrapper's step scale starts)")
        need(math.isfinite(self.adaptive_scale_init) and abs(self.adaptive_scale_init) <= 6.0,
             f"--adaptive-scale-init must lie within -6..6 (a log-scale), got {self.adaptive_scale_init}")
        need(self.adaptive_scale_shrink == 1.0 or self.adaptive_scale is not None,
             "--adaptive-scale-shrink needs --adaptive-scale (it sets how fast that rule lets the steps shrink)")
        need(math.isfinite(self.adaptive_scale_shrink) and self.adaptive_scale_shrink > 0,
             f"--adaptive-scale-shrink must be a positive number (e.g. 0.7), got {self.adaptive_scale_shrink}")
        positive_ints(self, "lstm_hidden", "lstm_layers")
        if self.plus is not None:
            self.plus_part()  # raises UsageError on a bad spec
        if self.plus_floor is not None:
            need(self.plus is not None and self.adaptive_scale is not None,
                 "--plus-floor needs --plus and --adaptive-scale (it bounds how far the added optimizer's adapted "
                 "step scale may shrink)")
            need(math.isfinite(self.plus_floor) and -6.0 <= self.plus_floor <= 0.0,
                 f"--plus-floor must lie within -6..0 (a log-scale below the added optimizer's own steps, e.g. "
                 f"-0.5), got {self.plus_floor}")
        if self.optimizer == "lstm":  # refused before any data is read
            wrapped = self.adaptive_scale is not None or self.plus is not None
            need(self.learn is None or list(self.learn) == ["weight_decay"] or wrapped,
                 f"--learn {','.join(self.learn or [])}: the LSTM learns all its weights (--learn selects hyperparameters "
                 f"of a hand-designed optimizer; with the LSTM only --learn weight_decay, or the hyperparameters "
                 f"that --adaptive-scale and --plus add, which keeps its weights fixed)")
        if self.learn and "weight_decay" in self.learn and self.weight_decay is None:
            self.weight_decay = 1e-4


@dataclass
class EstimatorConfig:
    """The meta-gradient: which estimator, over which run, of which objective (with each estimator's options)."""

    method: str = "truncated"
    horizon: int = 100
    truncation: int = 20                     # truncated, pes, es: steps per truncation
    online: int | None = None                # update every K inner steps of ONE long run (RTHO / TRHO / online PES)
    objective: str | None = None             # default: normalised for a family, sum_train for a task
    second_order: bool = False
    meta_batch: int = 1
    member_balance: bool = False             # scale each member's meta-gradient to unit norm before averaging
    implicit_iters: int = 10                 # implicit: Neumann terms
    population: int = 8                      # pes, es: antithetic particle pairs
    sigma: float = 0.01                      # pes, es: perturbation standard deviation

    def validate_estimator(self) -> None:
        need(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.objective is None:
            self.objective = "normalised" if getattr(self, "family", None) is not None else "sum_train"
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        positive_ints(self, "horizon", "truncation", "meta_batch", "implicit_iters", "population")
        need(self.online is None or (isinstance(self.online, int) and self.online >= 1),
             f"--online must be a positive integer, got {self.online}")
        need(isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0,
             f"--sigma must be a positive number, got {self.sigma}")
        if self.method == "implicit":
            need(self.learn == ["weight_decay"], "--method implicit learns only --learn weight_decay (a learning rate, "
                                                 "momentum or the LSTM's weights act only through the update); "
                                                 f"methods for those: {', '.join(m for m in METHODS if m != 'implicit')}")
            need(self.objective in ("final_train", "final_test"),
                 f"--method implicit differentiates a final loss at a stationary point: use --objective final_train "
                 f"or final_test, not {self.objective}")


@dataclass
class OuterConfig:
    """The outer loop: meta-steps and the outer optimizer."""

    meta_steps: int = 200
    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    lr_schedule: str = "cosine"
    clip: float | None = 1.0
    schedule: str | None = None              # phases "TRUNCATION:META_STEPS[@OUTER_LR],..." (l2o.schedule)

    def validate_outer(self) -> None:
        positive_ints(self, "meta_steps")
        need(self.outer_lr > 0, f"--outer-lr must be > 0, got {self.outer_lr}")
        need(self.clip is None or self.clip > 0, f"--clip must be > 0, got {self.clip}")
        need(self.outer_optimizer in ("adam", "sgd", "rmsprop"), "--outer-optimizer must be adam, sgd or rmsprop")
        need(self.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant")

    def phases(self) -> list[Phase]:
        """The run's phases: those of ``--schedule``, or one phase of ``--truncation`` over ``--meta-steps``."""
        if self.schedule is None:
            return [Phase(getattr(self, "truncation", 20), self.meta_steps, None, 0)]
        try:
            return parse_schedule(self.schedule)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def validate_schedule(self) -> None:
        if self.schedule is None:
            return
        phases = self.phases()
        need(self.meta_steps == schedule_total(phases),
             f"--meta-steps {self.meta_steps} disagrees with --schedule {self.schedule!r} "
             f"({schedule_total(phases)} meta-steps); leave --meta-steps out")
        method = getattr(self, "method", None)
        need(method in ("truncated", "pes", "es"),
             f"--schedule sets the truncation of --method truncated, pes or es, not {method}")
        horizon = getattr(self, "horizon", 0)
        for ph in phases:
            need(method != "truncated" or ph.truncation <= horizon,
                 f"--schedule truncation {ph.truncation} is longer than --horizon {horizon}; use <= {horizon} "
                 f"({horizon} backpropagates through the whole unroll)")


@dataclass
class LoggingConfig:
    """Validation, logging, checkpoints, seed and device."""

    val_every: int = 20
    val_seeds: int = 10
    val_horizons: list[int] | None = None    # a family's validation at each of these horizons, averaged; None: --horizon
    save_every: int = 10
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    log_dir: str = "runs"
    checkpoint: str | None = None
    init_from: str | None = None             # start from the (best) weights of another checkpoint
    # torchrun (ignored without it): collective backend (default gloo on CPU, nccl on CUDA), peer timeout
    dist_backend: str | None = None
    dist_timeout: float = 600.0

    def validate_logging(self) -> None:
        positive_ints(self, "val_every", "val_seeds", "save_every")
        if self.val_horizons is not None:
            need(isinstance(self.val_horizons, list) and len(self.val_horizons) > 0 and all(
                 isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in self.val_horizons),
                 f"--val-horizons must be positive step counts such as 100,200, got {self.val_horizons!r}")
            need(getattr(self, "family", None) is not None,
                 "--val-horizons applies to --family runs (their validation is the speedup over tuned Adam per "
                 "member, comparable across horizons); a task's validation is its final loss at --horizon")
        # the optimizees' seeds are seed * 10^6 + ...: a larger seed overflowed torch's 64-bit seeds mid-run
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and abs(self.seed) < SEED_LIMIT,
             f"--seed must be an integer with |seed| < 2**40, got {self.seed!r}")
        need(self.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")


@dataclass
class TrainConfig(TaskConfig, OptimizerConfig, EstimatorConfig, OuterConfig, LoggingConfig):
    """Everything that defines a meta-training run (defaults: the L2L paper's MNIST setup), one flat record."""

    extra: dict[str, Any] = field(default_factory=dict)

    # keys that may differ between an interrupted run and its resumption
    RESUMABLE_CHANGES = ("meta_steps", "val_every", "save_every", "device", "log_dir", "data_dir", "checkpoint", "name",
                          "dist_backend", "dist_timeout")
    CONCERNS = (TaskConfig, OptimizerConfig, EstimatorConfig, OuterConfig, LoggingConfig)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        what = "family_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in self.family) if self.family \
            else SHORT.get(self.task, self.task.rpartition(":")[2])  # an import path is named by its function
        return f"{self.optimizer}_{what}"

    @property
    def run_dir(self) -> str:
        """``<log_dir>/<run name>``: the run's TensorBoard logs and, by default, its checkpoint."""
        return os.path.join(self.log_dir, self.run_name)

    @property
    def checkpoint_path(self) -> str:
        # user runs live under runs/<name>/, never in checkpoints/ (shipped, read-only files)
        return self.checkpoint or os.path.join(self.run_dir, "checkpoint.pt")

    def validate(self) -> "TrainConfig":
        self.validate_task()
        self.validate_optimizer()
        self.validate_estimator()
        self.validate_outer()
        self.validate_schedule()
        self.validate_logging()
        self._validate_floats(need)
        need(self.method != "truncated" or self.schedule is not None or self.truncation <= self.horizon,
             f"--truncation {self.truncation} is longer than --horizon {self.horizon}; pass --truncation <= horizon "
             f"(--truncation {self.horizon} backpropagates through the whole unroll)")
        need(self.online is None or self.online <= self.horizon,
             f"--online {self.online} is longer than --horizon {self.horizon}")
        self._validate_device(need)
        need(not (self.per_parameter and self.meta_batch > 1), "--per-parameter weight decay needs --meta-batch 1")
        if self.learn is not None:  # a name no part has is refused before any folder is made or data read
            from .train import build_optimizer  # late import: the trainer imports this module

            try:
                build_optimizer(dataclasses.replace(self, per_parameter=False), {})  # shapes: per-parameter only
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        return self

    def concern(self, cls: type) -> Any:
        """The part of this config that ``cls`` (one of :attr:`CONCERNS`) describes, as its own dataclass."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    FLOATS = ("adaptive_scale", "adaptive_scale_init", "adaptive_scale_shrink", "plus_floor", "output_scale", "skip_gain", "lr", "momentum", "decay", "weight_decay", "outer_lr", "clip")

    def _validate_floats(self, need) -> None:
        # a nan / inf flag would only surface deep inside a run (or as "done" with every step skipped)
        for key in self.FLOATS:
            value = getattr(self, key)
            need(value is None or (isinstance(value, (int, float)) and math.isfinite(value)),
                 f"--{key.replace('_', '-')} must be a finite number, got {value!r}")
        need(self.output_scale > 0, f"--output-scale must be > 0, got {self.output_scale}")
        need(self.skip_gain > 0, f"--skip-gain must be > 0, got {self.skip_gain}")
        need(self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}")

    def _validate_device(self, need) -> None:
        import torch

        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            need(False, f"bad --device {self.device!r}; use e.g. cpu or cuda")
        need(dev.type in ("cpu", "cuda"), f"--device {self.device!r}: l2o runs on cpu or cuda")
        need(dev.type != "cuda" or torch.cuda.is_available(),
             f"--device {self.device} asked for, but CUDA is not available here; use --device cpu")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: "TrainConfig") -> list[str]:
        """Fields (other than the resumable ones) whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in self.RESUMABLE_CHANGES and a[k] != b.get(k)]
