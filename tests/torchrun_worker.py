"""torchrun entry point for the distributed tests: meta_train.py's ``main`` in float64 (the tests' dtype)."""
from __future__ import annotations

import os
import sys

import torch

torch.set_default_dtype(torch.float64)

import meta_train  # noqa: E402 - after the dtype is set

code = meta_train.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # as meta_train.py does under torchrun: no slow interpreter shutdown for the launcher to cut short
