"""Meta-training configuration: one flat dataclass, validated, stored in every checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .optim import NAMES as OPTIMIZERS
from .tasks import check as check_task, options as task_option_names

METHODS = ("truncated", "reverse", "forward", "implicit")
OBJECTIVES = ("sum_train", "final_train", "final_test")
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
    # torchrun (ignored without it): collective backend (default gloo on CPU, nccl on CUDA), peer timeout
    dist_backend: str | None = None
    dist_timeout: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)

    # keys that may differ between an interrupted run and its resumption
    RESUMABLE_CHANGES = ("meta_steps", "val_every", "save_every", "device", "log_dir", "data_dir", "checkpoint", "name",
                          "dist_backend", "dist_timeout")

    @property
    def run_name(self) -> str:
        # an import path (pkg.mod:make_task, file.py:make_task) is named by its function
        return self.name or f"{self.optimizer}_{SHORT.get(self.task, self.task.rpartition(':')[2])}"

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint or f"checkpoints/{self.run_name}.pt"

    def task_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device": self.device}
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
                opts[key] = value[0] if (key == "hidden" and self.task == "cifar10_conv") else value
        return opts

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UsageError(msg)

        try:
            check_task(self.task)  # a built-in, a registered name or an importable package.module:function
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        need(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for key in ("horizon", "truncation", "meta_batch", "meta_steps", "val_every", "val_seeds", "save_every",
                    "lstm_hidden", "lstm_layers", "implicit_iters"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1,
                 f"--{key.replace('_', '-')} must be a positive integer, got {getattr(self, key)!r}")
        need(self.online is None or self.online >= 1, f"--online must be a positive integer, got {self.online}")
        need(self.outer_lr > 0, f"--outer-lr must be > 0, got {self.outer_lr}")
        need(self.clip is None or self.clip > 0, f"--clip must be > 0, got {self.clip}")
        need(self.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
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
