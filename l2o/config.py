"""Meta-training configuration: one flat dataclass, validated, stored in every checkpoint."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .optim import NAMES as OPTIMIZERS
from .tasks import TASKS

METHODS = ("truncated", "reverse", "forward", "implicit")
OBJECTIVES = ("sum_train", "final_train", "final_test")
# Presets of meta_train.py (explicit flags override them). "quick" is the README's main job:
# within ~10 minutes on 2 CPU cores the LSTM's validation loss is below tuned Adam's
# (benchmarks/RESULTS.md); "paper" is the full recipe (stage 1 of the shipped LSTM).
PRESETS: dict[str, dict[str, Any]] = {"quick": {"meta_steps": 60}, "paper": {"meta_steps": 200}}
SHORT = {"mnist_mlp": "mnist", "fashion_mnist_mlp": "fashion_mnist", "cifar10_conv": "cifar10", "quadratic": "quadratic"}


class UsageError(ValueError):
    """Bad user input; the CLIs print it as one line and exit with code 2."""


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (defaults: the L2L paper's MNIST setup)."""

    # optimizee
    task: str = "mnist_mlp"
    hidden: list[int] | None = None          # task hidden sizes (mnist/fashion MLP) -> default of the task
    activation: str | None = None
    batch_size: int | None = None
    data_dir: str | None = None
    # optimizer being meta-trained
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
    # meta-gradient
    method: str = "truncated"
    horizon: int = 100
    truncation: int = 20
    online: int | None = None                # update every K inner steps of ONE long run (RTHO / TRHO)
    objective: str = "sum_train"
    second_order: bool = False
    meta_batch: int = 1
    implicit_iters: int = 10
    # outer loop
    meta_steps: int = 200
    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    lr_schedule: str = "cosine"
    clip: float | None = 1.0
    # validation, logging, checkpoints
    val_every: int = 20
    val_seeds: int = 10
    save_every: int = 10
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    log_dir: str = "runs"
    checkpoint: str | None = None
    init_from: str | None = None             # start from the (best) weights of another checkpoint
    extra: dict[str, Any] = field(default_factory=dict)

    # keys that may differ between an interrupted run and its resumption
    RESUMABLE_CHANGES = ("meta_steps", "val_every", "save_every", "device", "log_dir", "data_dir", "checkpoint", "name")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.optimizer}_{SHORT.get(self.task, self.task)}"

    @property
    def run_dir(self) -> str:
        """``<log_dir>/<run name>``: the run's TensorBoard logs and, by default, its checkpoint."""
        return os.path.join(self.log_dir, self.run_name)

    @property
    def checkpoint_path(self) -> str:
        # user runs live under runs/<name>/, never in checkpoints/ (shipped, read-only files)
        return self.checkpoint or os.path.join(self.run_dir, "checkpoint.pt")

    def task_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device": self.device}
        if self.task != "quadratic":
            opts["data_dir"] = self.data_dir
        for key in ("hidden", "activation", "batch_size"):
            if getattr(self, key) is not None:
                if self.task == "quadratic" or (self.task == "cifar10_conv" and key == "activation"):
                    raise UsageError(f"--{key.replace('_', '-')} does not apply to task {self.task!r}")
                value = getattr(self, key)
                opts[key] = value[0] if (key == "hidden" and self.task == "cifar10_conv") else value
        return opts

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UsageError(msg)

        need(self.task in TASKS, f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        need(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for key in ("horizon", "truncation", "meta_batch", "meta_steps", "val_every", "val_seeds", "save_every",
                    "lstm_hidden", "lstm_layers", "implicit_iters"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1,
                 f"--{key.replace('_', '-')} must be a positive integer, got {getattr(self, key)!r}")
        need(self.online is None or self.online >= 1, f"--online must be a positive integer, got {self.online}")
        self._validate_floats(need)
        need(self.method != "truncated" or self.truncation <= self.horizon,
             f"--truncation {self.truncation} is longer than --horizon {self.horizon}; pass --truncation <= horizon "
             f"(--truncation {self.horizon} backpropagates through the whole unroll)")
        need(self.online is None or self.online <= self.horizon,
             f"--online {self.online} is longer than --horizon {self.horizon}")
        self._validate_device(need)
        need(self.outer_lr > 0, f"--outer-lr must be > 0, got {self.outer_lr}")
        need(self.clip is None or self.clip > 0, f"--clip must be > 0, got {self.clip}")
        need(self.outer_optimizer in ("adam", "sgd", "rmsprop"), "--outer-optimizer must be adam, sgd or rmsprop")
        need(self.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant")
        is_lstm = self.optimizer == "lstm"
        if is_lstm:
            need(self.learn is None, "--learn selects hyperparameters of a hand-designed optimizer; the LSTM learns all its weights")
            need(self.method in ("truncated", "reverse"), f"the LSTM is meta-trained with --method truncated or reverse, "
                                                           f"not {self.method} (forward mode is for a few meta-parameters; "
                                                           f"implicit cannot see an optimizer's weights)")
        if self.method == "implicit":
            need(self.learn == ["weight_decay"], "--method implicit learns only --learn weight_decay "
                                                 "(a learning rate or momentum acts only through the optimizer)")
        if self.learn and "weight_decay" in self.learn and self.weight_decay is None:
            self.weight_decay = 1e-4
        need(not (self.per_parameter and self.meta_batch > 1), "--per-parameter weight decay needs --meta-batch 1")
        return self

    FLOATS = ("output_scale", "skip_gain", "lr", "momentum", "decay", "weight_decay", "outer_lr", "clip")

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
