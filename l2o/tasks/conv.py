"""The L2L paper's CIFAR-10 optimizee: three conv layers and a 32-unit hidden layer."""
from __future__ import annotations

import numbers

from torch import nn

from .base import DatasetTask, cross_entropy


def build_conv(channels: int = 16, hidden: int = 32) -> nn.Module:
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4x4
        nn.Flatten(), nn.Linear(c * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


class ConvTask(DatasetTask):
    """Small convnet on CIFAR-10 (full release or any ``cifar-10-batches-py`` subset)."""

    name = "cifar10_conv"

    def __init__(self, channels: int = 16, hidden: int = 32, batch_size: int = 128,
                 data_dir: str | None = None, device: str = "cpu") -> None:
        for v in (channels, hidden, batch_size):  # a list (MLP-style hidden) or 2.5 failed later or was truncated
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v).is_integer() or v < 1:
                raise ValueError(f"channels, hidden and batch_size must be positive integers, got {v!r}")
        self.channels, self.hidden, self.batch_size, self.data_dir = int(channels), int(hidden), int(batch_size), data_dir
        super().__init__(lambda: build_conv(self.channels, self.hidden), cross_entropy)
        self.to(device)
        self.load_splits("cifar10", data_dir)

    def config(self) -> dict:
        return {"channels": self.channels, "hidden": self.hidden, "batch_size": self.batch_size}
