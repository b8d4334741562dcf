"""Checkpoints: one file holds everything to evaluate and to resume.

The file is a plain dict of tensors and Python primitives, loadable with
``torch.load(path, weights_only=True)``:

    format, version            "l2o-checkpoint", 1
    optimizer                  {"config": opt.config(), "state_dict": ...}   the current weights
    best                       {"state_dict", "meta_step", "val_loss"} or None (kept by validation)
    config                     the run's configuration (a flat dict of primitives)
    outer_optimizer            torch.optim state_dict of the meta-optimizer
    meta_step                  meta-steps completed
    rng                        RNG states needed to continue exactly
    extra                      anything else the trainer keeps (counters, ...)

Writes are atomic (temporary file ``.<name>.tmp-*`` in the same folder, fsync,
``os.replace``), so a kill during a save never loses the previous checkpoint; the next
save of the same target removes temporaries that such a kill left behind.
"""
from __future__ import annotations

import glob
import os
import tempfile
import time
import zipfile
from typing import Any

import torch

from .optim import DifferentiableOptimizer, from_config

FORMAT, VERSION = "l2o-checkpoint", 1
WHICH = ("best", "current")
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


class CheckpointError(ValueError):
    """An unreadable, foreign or inconsistent checkpoint (message says which and what to do)."""


def save(path: str, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` (plus format tags) to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    _remove_stale(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".pt", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove_stale(folder: str, prefix: str) -> None:
    """Delete temporaries of this target left by a killed save (and old-style ``.tmp-*.pt`` over an hour old)."""
    old = [p for p in glob.glob(os.path.join(folder, ".tmp-*.pt")) if time.time() - os.path.getmtime(p) > 3600]
    for stale in glob.glob(os.path.join(folder, glob.escape(prefix) + "*.pt")) + old:
        try:
            os.unlink(stale)
        except OSError:  # gone already, or not ours to delete: the save itself does not depend on it
            pass


def shipped_path(name: str | os.PathLike) -> str:
    """``name`` itself, or ``checkpoints/<name>.pt`` of this repository for a shipped name (``lstm_mnist``)
    when no file ``name`` exists here."""
    text = _path_text(name)
    shipped = os.path.join(SHIPPED, f"{text}.pt")
    return shipped if text and not os.path.exists(text) and os.sep not in text and os.path.isfile(shipped) else text


def shipped_names() -> list[str]:
    """The names of the shipped checkpoints (``checkpoints/*.pt``)."""
    return sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(SHIPPED, "*.pt")))


def _path_text(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _device(map_location: Any) -> Any:
    """Check ``map_location`` before the file is read, so a bad device is not reported as a corrupt file."""
    if callable(map_location) or isinstance(map_location, dict):
        return map_location  # torch.load's other forms, passed through
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"map_location must be a device such as 'cpu' or 'cuda:0', got {map_location!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location {map_location!r} asks for CUDA, which is not available here; use 'cpu'")
    return map_location


def load(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; raises :class:`CheckpointError` with a one-line reason.

    Raises:
        TypeError: ``path`` is not a str or os.PathLike; ValueError: a bad ``map_location``.
    """
    path = _path_text(path)
    map_location = _device(map_location)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder; give the path of a .pt file written by meta_train.py")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; give the path of a .pt file written by meta_train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is "unreadable"
        if "Weights only load failed" in str(exc) and zipfile.is_zipfile(path):  # a torch file of objects
            raise CheckpointError(f"{path!r} is not an l2o checkpoint (a torch file of pickled Python objects, "
                                  f"such as a whole model); use a file written by meta_train.py") from None
        raise CheckpointError(f"checkpoint {path!r} is unreadable ({type(exc).__name__}); "
                              f"it is corrupt or not a torch file, re-create it with meta_train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an l2o checkpoint (no '{FORMAT}' tag); "
                              f"use a file written by meta_train.py")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {ckpt.get('version')}, this l2o reads {VERSION}")
    return ckpt


def optimizer_payload(opt: DifferentiableOptimizer) -> dict[str, Any]:
    return {"config": opt.config(), "state_dict": {k: v.detach().cpu().clone() for k, v in opt.state_dict().items()}}


def build_optimizer(ckpt: dict[str, Any], which: str = "best") -> DifferentiableOptimizer:
    """Rebuild the optimizer stored in a loaded checkpoint.

    Args:
        ckpt: a dict from :func:`load`.
        which: ``"best"`` (by validation, if the run kept one; else the current weights) or
            ``"current"`` (the latest weights).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(map(repr, WHICH))}, got {which!r}")
    try:
        # the module's random initial weights are replaced by the saved ones: drawing them must not
        # move the caller's global RNG (a script's data order would change with the optimizer it loads)
        with torch.random.fork_rng(devices=[]):
            opt = from_config(ckpt["optimizer"]["config"])
        state = ckpt["optimizer"]["state_dict"]
        if which == "best" and ckpt.get("best"):
            state = ckpt["best"]["state_dict"]
        opt.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not describe an l2o optimizer ({type(exc).__name__}: {exc})") from None
    return opt


def load_optimizer(path: str, map_location: str | torch.device = "cpu", which: str = "best") -> DifferentiableOptimizer:
    """Rebuild the saved optimizer from the file alone (``which``: see :func:`build_optimizer`).

    ``path`` may also name a shipped checkpoint (``lstm_mnist``: see :func:`shipped_path`).
    """
    if which not in WHICH:  # before reading the file: a typo must not cost a load
        raise ValueError(f"which must be one of {', '.join(map(repr, WHICH))}, got {which!r}")
    return build_optimizer(load(shipped_path(path), map_location), which)
