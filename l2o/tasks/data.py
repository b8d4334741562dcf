"""Datasets held in memory as tensors.

Images are read once through ``torchvision.datasets`` (MNIST, Fashion-MNIST) or
straight from the official ``cifar-10-batches-py`` pickles (so that subsets of
CIFAR-10, whose md5 torchvision's integrity check rejects, load too), converted to
one float tensor per split and cached per process. Sampling a minibatch is then a
single ``index_select``, so it never dominates an inner step.

The data root is ``data_dir`` if given, else ``$L2O_DATA_DIR``, else ``./data``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch


class DataNotFoundError(FileNotFoundError):
    """Raised (with a one-line, actionable message) when a dataset is missing offline."""


@dataclass
class ArrayDataset:
    """One split of a dataset: ``x`` float [N, ...] and ``y`` int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        idx = idx.to(self.x.device)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


_CACHE: dict[tuple, ArrayDataset] = {}


def data_root(data_dir: str | None = None) -> str:
    """Resolve the data root: argument, then ``$L2O_DATA_DIR``, then ``./data``."""
    return os.path.expanduser(data_dir or os.environ.get("L2O_DATA_DIR") or "./data")


IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def check_idx(path: str) -> None:
    """Raise :class:`DataNotFoundError` naming ``path`` if this IDX file is shorter or longer than its header says.

    torchvision reports a truncated file as missing (and then tries to download it);
    a user needs to hear which file is damaged instead.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
        ndim = head[3] if len(head) == 4 else 0
        dims = fh.read(4 * ndim)
    if len(head) < 4 or head[:2] != b"\0\0" or ndim == 0 or len(dims) < 4 * ndim:
        raise DataNotFoundError(f"{path!r} is not an IDX file ({size} bytes, no valid header); "
                                f"replace it with the original dataset file")
    expected = 4 + 4 * ndim + int(np.prod(np.frombuffer(dims, dtype=">u4").astype(np.int64)))
    if size != expected:
        raise DataNotFoundError(f"{path!r} is {'truncated' if size < expected else 'corrupt'} ({size} bytes, its "
                                f"header says {expected}); replace it with the original dataset file")


def idx_root(root: str, folder: str) -> str:
    """The data root for a ``--data-dir`` that names the dataset's own folder (``DATA/MNIST``) or
    its ``raw/`` folder instead of the root holding it, as a CIFAR-10 folder may be named."""
    norm = os.path.normpath(root)
    if os.path.isdir(os.path.join(norm, folder, "raw")):
        return root
    if os.path.basename(norm) == "raw" and os.path.basename(os.path.dirname(norm)) == folder:
        return os.path.dirname(os.path.dirname(norm)) or "."
    if os.path.basename(norm) == folder and os.path.isdir(os.path.join(norm, "raw")):
        return os.path.dirname(norm) or "."
    return root


def _torchvision_idx(kind: str, root: str, train: bool):
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST}[kind]
    root = idx_root(root, cls.__name__)
    for name in IDX_FILES[train]:
        path = os.path.join(root, cls.__name__, "raw", name)
        if os.path.isfile(path):
            check_idx(path)
    try:
        return cls(root=root, train=train, download=False)
    except RuntimeError:
        pass
    try:  # not on disk: let torchvision download it if the network allows
        return cls(root=root, train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any network/IO failure means "not available"
        folder = os.path.join(root, cls.__name__, "raw")
        names = [f for files in IDX_FILES.values() for f in files]
        missing = [f for f in names if not os.path.isfile(os.path.join(folder, f))]
        if 0 < len(missing) < len(names):  # a partial copy: say which file, not "not found"
            raise DataNotFoundError(
                f"{cls.__name__} under {root!r} is incomplete: {', '.join(missing)} missing from {folder} (and it "
                f"could not be downloaded); copy the missing file there or pass --data-dir / set L2O_DATA_DIR"
            ) from None
        raise DataNotFoundError(
            f"{cls.__name__} not found under {root!r} and could not be downloaded ({type(exc).__name__}); "
            f"put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte in {folder} or pass --data-dir / set L2O_DATA_DIR"
        ) from None


def on_disk(name: str, data_dir: str | None = None) -> bool:
    """Whether dataset ``name`` is already under the data root (no download is tried)."""
    root = data_root(data_dir)
    if name == "cifar10":
        return cifar10_folder(root) is not None
    sub = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    folder = os.path.join(idx_root(root, sub), sub, "raw")
    return all(os.path.isfile(os.path.join(folder, f)) for files in IDX_FILES.values() for f in files)


def cifar10_folder(root: str) -> str | None:
    """Find a ``cifar-10-batches-py`` folder under ``root`` (full release or a subset)."""
    for cand in (
        root if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py" else None,
        os.path.join(root, "cifar-10-batches-py"),
        os.path.join(root, "cifar-10-subset", "cifar-10-batches-py"),
    ):
        if cand and os.path.isfile(os.path.join(cand, "test_batch")):
            return cand
    return None


def _read_cifar(folder: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataNotFoundError(f"CIFAR-10 file {path!r} is missing; the folder needs data_batch_1..5 and test_batch")
        with open(path, "rb") as fh:
            try:
                entry = pickle.load(fh, encoding="latin1")
            except Exception as exc:  # noqa: BLE001
                raise DataNotFoundError(f"CIFAR-10 file {path!r} is not a CIFAR pickle ({exc})") from None
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar10(root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    folder = cifar10_folder(root)
    if folder is None:
        try:  # let torchvision fetch the full release when the network allows
            import torchvision.datasets as tvd

            tvd.CIFAR10(root=root, train=train, download=True)
            folder = cifar10_folder(root)
        except Exception:  # noqa: BLE001
            folder = None
    if folder is None:
        raise DataNotFoundError(
            f"CIFAR-10 not found under {root!r} and could not be downloaded; put a cifar-10-batches-py folder "
            f"(data_batch_1..5, test_batch) in it or pass --data-dir / set L2O_DATA_DIR"
        )
    return _read_cifar(folder, train)


_MEAN_STD = {
    "mnist": ((0.0,), (1.0,)),  # [0, 1] pixels, as in the L2L paper
    "fashion_mnist": ((0.0,), (1.0,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load(name: str, split: str, data_dir: str | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> ArrayDataset:
    """Load one split of ``mnist``, ``fashion_mnist`` or ``cifar10`` as in-memory tensors."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = data_root(data_dir)
    dtype = dtype or torch.get_default_dtype()
    key = (name, os.path.abspath(root), split, str(device), dtype)
    if key in _CACHE:
        return _CACHE[key]
    train = split == "train"
    if name in ("mnist", "fashion_mnist"):
        ds = _torchvision_idx(name, root, train)
        x = ds.data.numpy()[:, None]  # [N, 1, 28, 28] uint8
        y = ds.targets.numpy()
    elif name == "cifar10":
        x, y = _cifar10(root, train)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose mnist, fashion_mnist or cifar10")
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(dtype) / 255.0
    mean, std = _MEAN_STD[name]
    xt = (xt - torch.tensor(mean, dtype=dtype)[:, None, None]) / torch.tensor(std, dtype=dtype)[:, None, None]
    out = ArrayDataset(xt.to(device), torch.as_tensor(y, dtype=torch.int64).to(device))
    _CACHE[key] = out
    return out
