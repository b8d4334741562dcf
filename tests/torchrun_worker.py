"""torchrun entry point for the distributed tests: meta_train.py's ``main`` in ``L2O_TEST_DTYPE`` (default float64)."""
from __future__ import annotations

import os
import sys

import torch

torch.set_default_dtype(getattr(torch, os.environ.get("L2O_TEST_DTYPE", "float64")))

import meta_train  # noqa: E402 - after the dtype is set

code = meta_train.main(sys.argv[1:])
print(f"rank {os.environ['RANK']}: {torch.get_num_threads()} torch threads")  # what the run used
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # as meta_train.py does under torchrun: no slow interpreter shutdown for the launcher to cut short
