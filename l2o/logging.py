"""TensorBoard logging and the progress bar of a meta-training run."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from .progress import bar


class RunLogger:
    """Writes ``runs/<name>/`` and drives a tqdm bar over meta-steps.

    Charts: ``meta/loss`` (the meta-objective of each meta-step), ``meta/grad_norm``
    (largest pre-clipping meta-gradient norm of the step), ``meta/skipped`` (meta-steps
    skipped for non-finite values, cumulative), ``meta/outer_lr``; ``val/learned`` and
    ``val/adam_tuned`` (mean final training loss on the validation seeds);
    ``lstm/update_magnitude`` (histogram of log10 |theta_{t+1} - theta_t|);
    ``hparams/<name>`` and ``hypergrad/<name>`` for learned hyperparameters; the config
    as text and, at the end, as TensorBoard hparams.
    """

    def __init__(self, log_dir: str, config: dict[str, Any], start: int, total: int, enabled: bool = True,
                 progress: bool = True) -> None:
        self.writer = SummaryWriter(log_dir, purge_step=start if start > 0 else None) if enabled else None
        self.config = config
        if self.writer is not None and start == 0:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)
        self.bar = bar(total, "meta-train", progress, initial=start, unit="step")
        self.postfix: dict[str, str] = {}

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        values = values[torch.isfinite(values)]  # a diverged run's inf / nan: TensorBoard's binning fails on them
        if self.writer is not None and values.numel() > 0:
            self.writer.add_histogram(tag, values.float(), step)

    def step(self, n: int = 1, **postfix: float) -> None:
        self.postfix.update({k: f"{v:.4g}" for k, v in postfix.items() if v is not None})
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(n)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self, metrics: dict[str, float] | None = None) -> None:
        self.bar.close()
        if self.writer is not None:
            if metrics:
                flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.config.items()}
                self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
            self.writer.close()
