#!/usr/bin/env python
"""Does one core slow down when the other computes? A check of the machine, not of l2o.

Runs a compute kernel for 8 s and prints its iterations per CPU-second: ``py`` is a
pure-Python integer loop, ``mm`` a 64x64 float32 matrix product (48 KB, cache-resident, so
no memory traffic). Run it alone, then two copies pinned to two cores at once:

    python benchmarks/core_contention.py mm
    taskset -c 0 python benchmarks/core_contention.py mm & taskset -c 1 python benchmarks/core_contention.py mm & wait

If each copy's rate drops when both run, the two cores share arithmetic units (or clock
headroom), and no multi-process program reaches 2x on them.
"""
import sys
import time

import torch

torch.set_num_threads(1)
kind = sys.argv[1] if len(sys.argv) > 1 else "mm"
if kind not in ("py", "mm"):
    print("core_contention.py: error: choose py or mm", file=sys.stderr)
    sys.exit(2)
a, b = torch.randn(64, 64), torch.randn(64, 64)
t0, c0, n = time.perf_counter(), time.process_time(), 0
while time.perf_counter() - t0 < 8:
    if kind == "py":
        s = 0
        for i in range(100000):
            s += i
    else:
        for _ in range(200):
            a @ b
    n += 1
print(kind, f"{n / (time.process_time() - c0):.2f} iterations per CPU-second")
