"""Shared fixtures: float64 by default and tiny data files in the real on-disk formats."""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def float64():
    """Gradient checks run in float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def write_idx(folder: str, n_train: int = 256, n_test: int = 64, seed: int = 0) -> None:
    """Write MNIST-format IDX files (uint8 images 28x28 + labels) with learnable structure."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):  # a bright stripe whose row encodes the label
            images[i, 2 + 2 * y: 4 + 2 * y, 4:24] = 255
        with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as fh:
            fh.write(struct.pack(">IIII", 2051, n, 28, 28))
            fh.write(images.tobytes())
        with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as fh:
            fh.write(struct.pack(">II", 2049, n))
            fh.write(labels.tobytes())


def write_cifar(folder: str, n_per_batch: int = 20, seed: int = 0) -> None:
    """Write a ``cifar-10-batches-py`` folder in the official pickle layout."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, n_per_batch).tolist()
        data = rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8)
        entry = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(entry, fh)
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_per_batch,
                     "num_vis": 3072}, fh)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A data root holding tiny MNIST, FashionMNIST and CIFAR-10 files in their real formats."""
    root = str(tmp_path_factory.mktemp("data"))
    write_idx(os.path.join(root, "MNIST", "raw"), seed=0)
    write_idx(os.path.join(root, "FashionMNIST", "raw"), seed=1)
    write_cifar(os.path.join(root, "cifar-10-batches-py"))
    return root
