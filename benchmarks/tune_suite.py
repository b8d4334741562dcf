#!/usr/bin/env python
"""Regenerate ``l2o/tuned_lrs.json``: the baseline learning rates of meta_eval's default suite.

meta_eval tunes every baseline's learning rate per task (9+ rates x 5 tuning seeds x
each horizon), which takes most of an hour on 2 CPU cores. The results depend only on
the task configuration, the data, the grid, the seeds and the dtype, all of which are in
the cache key, so l2o ships them: a first ``python meta_eval.py`` on the real datasets
finds them and skips tuning (``--retune`` redoes it). Run this after changing a task, a
grid or the tuning seeds; entries are written as they finish, so it can be interrupted
and rerun (finished entries are kept).

    nice python benchmarks/tune_suite.py --data-dir DATA            # every entry whose data is present
    python benchmarks/tune_suite.py --data-dir DATA --tasks mnist_mlp,quadratic
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from l2o import suite  # noqa: E402
from l2o.evaluate import log_grid  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="data root (default $L2O_DATA_DIR or ./data)")
    ap.add_argument("--tasks", help="suite entries, comma-separated (default all)")
    ap.add_argument("--out", default=suite.SHIPPED_TUNING, help="file to write (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = suite.TuningCache(None, shipped=None)
    cache.path = os.path.abspath(args.out)  # read what is there, add to it
    entries = suite.select(args.tasks.split(",") if args.tasks else None)
    for entry, task in suite.build_tasks(entries, args.data_dir):
        for b in suite.BASELINES:
            t0 = time.perf_counter()
            tuned = suite.tune(task, entry.task, b, entry.steps, log_grid(*suite.GRIDS[b]), suite.TUNING_SEEDS, cache)
            print(f"{entry.name:<18} {b:<9} lr {tuned['lr']:.3g}{' (cached)' if tuned['cached'] else ''} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
