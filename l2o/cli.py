"""What every command-line entry point shares: one error style, flag types, threads, output checks.

Bad input is reported as ONE line ``prog: error: <what and what to do>`` on stderr with
exit status 2 and no traceback, whether argparse or a later check finds it, and before
any work starts. :class:`Parser` is an ``ArgumentParser`` that does this for argparse's
own errors; :func:`fail` does it for everything else.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Callable, NoReturn

from .config import UsageError  # noqa: F401 - the one bad-input exception, re-exported

# One torch thread by default. Measured on 2 cores (benchmarks/RESULTS.md, "Threads"):
# 2 threads are ~1.2x faster on a quiet machine but ~8x slower when another process holds
# one core, since every small op then waits for the descheduled thread; 1 thread cannot
# collapse that way.
DEFAULT_THREADS = 1


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line ``prog: error: ...`` (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(self.prog, f"{message} (see --help)")


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` (first line only) on stderr and exit with status 2."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "bad input"
    print(f"{prog}: error: {first}", file=sys.stderr)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonempty(text: str) -> str:
    """argparse type: a path or name that is not empty (``--out ""``, or ``--out $UNSET``, is a mistake
    that would otherwise fall back to a default or to the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path or name, got {text!r}")
    return text


def path(text: str) -> str:
    """argparse type: a non-empty path, ``~`` expanded (the shell leaves ``--out=~/x`` as it is, which
    would make a folder named ``~`` here)."""
    return os.path.expanduser(nonempty(text))


def seed(text: str) -> int:
    """argparse type: an integer seed with ``|seed| < 2**40`` (seeds derived from it stay within torch's 64 bits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(value) >= 2 ** 40:
        raise argparse.ArgumentTypeError(f"expected an integer with |seed| < 2**40, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite float (no nan / inf: they would only surface deep inside a run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def csv_list(kind: Callable) -> Callable[[str], list]:
    """argparse type: a non-empty comma-separated list of ``kind``."""
    def parse(text: str) -> list:
        try:
            values = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a non-empty comma-separated list, got {text!r}")
        return values
    parse.__name__ = f"{kind.__name__}_list"
    return parse


def add_threads(p: argparse.ArgumentParser, default: int | None = DEFAULT_THREADS) -> None:
    """The ``--threads`` flag every entry point has.

    ``default=None`` (the entry points that run under torchrun) leaves the choice to
    :func:`set_threads`: 1 in one process, cores / processes under torchrun, while an
    explicit ``--threads N`` wins everywhere.
    """
    shown = (f"{DEFAULT_THREADS} in one process; under torchrun the cores shared out among this machine's "
             f"processes, or $L2O_THREADS" if default is None else str(default))
    p.add_argument("--threads", type=positive_int, default=default, metavar="N",
                   help=f"torch CPU threads (default {shown}: these small models gain ~1.2x from a "
                        f"second thread on an idle machine but run ~8x slower with it when another process "
                        f"holds a core)")


def set_threads(n: int | None) -> int:
    """Set torch's threads: ``n`` if given, else the default of :func:`l2o.distributed.threads_for`."""
    import torch

    from .distributed import threads_for

    n = threads_for(n, DEFAULT_THREADS)
    torch.set_num_threads(n)
    return n


def writable_dir(path: str, flag: str) -> str:
    """Create folder ``path`` if needed and prove it writable, else raise :class:`UsageError`."""
    probe_path = os.path.abspath(path)
    while not os.path.exists(probe_path) and os.path.dirname(probe_path) != probe_path:
        probe_path = os.path.dirname(probe_path)  # the nearest part of the path that exists
    if not os.path.isdir(probe_path):
        shown = repr(path) if probe_path == os.path.abspath(path) else f"{path!r}: {probe_path!r}"
        raise UsageError(f"{flag} {shown} is a file, not a folder; give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {path!r} is not writable ({exc.strerror or type(exc).__name__}); "
                         f"choose another folder") from None
    return path


def writable_file(path: str, flag: str) -> str:
    """Check that file ``path`` can be (re)written: not a folder, its folder writable."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file path such as runs/NAME/checkpoint.pt")
    writable_dir(os.path.dirname(os.path.abspath(path)), f"the folder of {flag}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path!r} is read-only; choose another path")
    return path


def run(main: Callable[[], int], prog: str, interrupted: str = "interrupted") -> NoReturn:
    """Run a script's ``main()`` and exit with its status, the same way for every entry point.

    Ctrl-C during imports or setup prints ``prog: <interrupted>`` and exits 130. Under
    torchrun the process leaves with ``os._exit`` once its output is flushed, before the
    launcher can stop a slow interpreter shutdown with SIGTERM.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        code = 130
    except SystemExit as exc:  # argparse and fail(): exit 2 after one line
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
