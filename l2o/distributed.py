"""torch.distributed for the outer loop: process group, shared decisions, spread-out work.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``); without those variables
every helper here is the identity of one process and no process group exists. Only
the trainer and the evaluation suite use this module: tasks, optimizers and the
hypergradient core never know how many processes there are.

What the helpers guarantee:

* every rank takes the same decision (a rank that saw a non-finite value, a checkpoint
  that rank 0 could not read) - no rank is left waiting in a collective;
* results do not depend on the number of processes: :meth:`Context.map` runs each item
  on one rank (the next free one) and hands every rank the values in the original order, so
  a mean taken afterwards is the same sum in the same order as in one process; likewise
  :meth:`Context.all_gather` hands every rank all ranks' rows in order (the trainer's
  per-member meta-gradients), never a sum whose order of additions the backend picks;
* a lost peer (killed, crashed, or silent for ``timeout`` seconds) ends a collective with
  :class:`PeerLost`, a one-line error, instead of a hang.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .config import UsageError

T = TypeVar("T")
BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 600.0


class PeerLost(RuntimeError):
    """Another process of the group died, was stopped, or stayed silent past the timeout."""


def launched() -> bool:
    """True when a launcher (torchrun, or :func:`spawn_workers`) started this process as one rank of many."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without one); usable before any group exists."""
    return int(os.environ.get("RANK", "0"))


def default_threads(local_world_size: int) -> int:
    """Torch threads per rank: the cores this process may use, shared out among the ranks of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def threads_for(explicit: int | None = None, one_process: int = 1) -> int:
    """Torch threads for this process: ``explicit`` (a ``--threads N`` flag) always wins.

    Otherwise, as one of several ranks: ``L2O_THREADS`` if set, else :func:`default_threads`
    of this machine's ranks; in one process (a launcher's world of 1 included): ``one_process``.
    """
    if explicit:
        return explicit
    world = int(os.environ["WORLD_SIZE"]) if launched() else 1
    if world == 1:
        return one_process
    return int(os.environ.get("L2O_THREADS", "0")) or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def choose_backend(device: str, override: str | None = None) -> str:
    """gloo for CPU tensors, NCCL for CUDA ones; ``override`` must fit the device (UsageError otherwise)."""
    kind = torch.device(device).type
    if override is None:
        return "nccl" if kind == "cuda" else "gloo"
    if override not in BACKENDS:
        raise UsageError(f"unknown --dist-backend {override!r}; choose gloo (CPU or CUDA) or nccl (CUDA)")
    if override == "nccl" and kind != "cuda":
        raise UsageError(f"--dist-backend nccl needs CUDA tensors, but --device is {device!r}; use gloo on CPU")
    if override == "nccl" and not dist.is_nccl_available():
        raise UsageError("--dist-backend nccl: this torch build has no NCCL; use gloo")
    return override


@dataclass
class Context:
    """One process's place in the group; with ``world_size == 1`` every method is local and free."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    _maps: int = field(default=0, repr=False)  # calls of map so far (one store key each)
    _kv: Any = field(default=None, repr=False)
    _prefix: str | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)``; ``n`` must be a multiple of the world size."""
        if n % self.world_size:
            raise UsageError(f"--meta-batch {n} is not a multiple of the {self.world_size} processes; "
                             f"use a multiple of {self.world_size} (each process unrolls an equal share)")
        k = n // self.world_size
        return range(self.rank * k, (self.rank + 1) * k)

    def _collective(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except RuntimeError as exc:  # DistBackendError, gloo "connection closed by peer", timeouts
            raise PeerLost(f"rank {self.rank}: lost contact with another process ({_reason(exc)})") from None

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (equal shapes) stacked along dim 0 in rank order, on every rank.

        A gather rather than a sum: the caller then adds in an order it fixes itself, where
        a reduction's order of additions would depend on the backend and the world size.
        """
        if not self.active:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        self._collective(lambda: dist.all_gather(parts, rows.contiguous()))
        return torch.cat(parts)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def decide(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (it reads rank 0's disk) and give its result, or its exception, to all."""
        if not self.active:
            return fn()
        out: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                out = (True, fn())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                out = (False, exc)
        ok, value = self.broadcast(out)
        if not ok:
            raise value
        return value

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``[fn(x) for x in items]``, the items shared out among the ranks, in order on every rank.

        Each rank takes the next item not yet taken (a counter in the group's key-value
        store), so a rank held up by other work (rank 0 writing the report, a busier core)
        takes fewer: the ranks finish together. Which rank computes an item does not change
        its value. An exception on any rank is raised on every rank (as :class:`RuntimeError`
        naming it when it cannot travel), so no rank waits for a peer that gave up.
        """
        if not self.active:
            return [fn(x) for x in items]
        key = f"{self._store_prefix()}/{self._maps}"  # every rank calls map in the same sequence
        self._maps += 1
        mine: list[tuple[int, Any]] = []
        err = None
        while err is None:
            i = self._collective(lambda: self._store().add(key, 1)) - 1
            if i >= len(items):
                break
            try:
                mine.append((i, fn(items[i])))
            except Exception as exc:  # noqa: BLE001
                err = RuntimeError(f"rank {self.rank}: {type(exc).__name__}: {exc}")
        parts: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(parts, (err, mine)))
        for e, _ in parts:
            if e is not None:
                raise e
        out: list[Any] = [None] * len(items)
        for _, pairs in parts:
            for i, value in pairs:
                out[i] = value
        return out

    def _store(self) -> "dist.Store":
        """A client of the launcher's key-value store (torchrun's, or rank 0's under :func:`spawn_workers`)."""
        if self._kv is None:
            self._kv = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                     timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._kv

    def _store_prefix(self) -> str:
        """Rank 0's random name for this group's keys (a restarted job may meet the same store)."""
        if self._prefix is None:
            self._prefix = "l2o/map/" + self.broadcast(uuid.uuid4().hex if self.is_main else None)
        return self._prefix

    def barrier(self) -> None:
        if self.active:
            self._collective(lambda: dist.barrier())

    def stop_together(self) -> None:
        """Leave the group on an error every rank shares (bad input): after a barrier, so all have reached it.

        torchrun stops the other ranks (SIGTERM) as soon as the first exits; from here on
        SIGTERM exits with code 2 too, so every rank reports the usage error's status.
        """
        if not (self.active and dist.is_initialized()):
            return
        signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
        _OLD_SIGTERM.clear()
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer already left: nothing to wait for
        dist.destroy_process_group()

    def close(self) -> None:
        """Leave the group (and give back the SIGTERM handler :func:`init` installed)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
            if _OLD_SIGTERM:
                signal.signal(signal.SIGTERM, _OLD_SIGTERM.pop())


LOCAL = Context()


def _reason(exc: BaseException) -> str:
    """The gist of a backend error: first sentence, without the C++ source location."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


_OLD_SIGTERM: list = []


def _stop_on_sigterm(signum, frame) -> None:
    raise PeerLost("stopped by the launcher (SIGTERM): another process failed or the job was cancelled")


def check_gpus(backend: str, per_node: int, gpus: int) -> None:
    """NCCL refuses two ranks on one GPU, deep inside its first collective: say so up front.

    Raises:
        UsageError: ``backend`` is ``nccl`` and this node runs more processes than it has GPUs.
    """
    if backend == "nccl" and per_node > gpus:
        raise UsageError(f"NCCL needs one GPU per process: {per_node} processes on this node, {gpus} GPU(s); "
                         f"start at most {gpus} per node (--nproc_per_node) or pass --dist-backend gloo")


def init(device: str = "cpu", backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
         threads: int | None = None) -> Context:
    """Join the process group a launcher described in the environment (one process: :data:`LOCAL`).

    Validates ``backend`` against ``device`` even in one process (so a bad flag fails the
    same way everywhere), picks ``cuda:LOCAL_RANK`` for CUDA, sets torch's threads
    (:func:`threads_for`: ``threads``, an explicit ``--threads``, wins) and turns the
    launcher's SIGTERM into :class:`PeerLost`.
    """
    if not launched():
        choose_backend(device, backend)
        return LOCAL
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if world == 1:
        choose_backend(device, backend)
        return LOCAL
    problem = None  # bad input is reported after joining (with gloo), so every rank leaves together
    try:
        chosen = choose_backend(device, backend)
        if torch.device(device).type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {device} asked for, but CUDA is not available here")
            gpus = torch.cuda.device_count()
            check_gpus(chosen, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpus)
            torch.cuda.set_device(local_rank % gpus)
    except UsageError as exc:
        chosen, problem = "gloo", exc
    torch.set_num_threads(threads_for(threads))
    _OLD_SIGTERM.append(signal.signal(signal.SIGTERM, _stop_on_sigterm))
    try:
        dist.init_process_group(chosen, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise PeerLost(f"rank {rank}: could not join the process group ({_reason(exc)})") from None
    ctx = Context(rank, world, local_rank, chosen, timeout_s)
    if problem is not None:
        ctx.stop_together()
        raise problem
    return ctx


def device_for(ctx: Context, device: str) -> str:
    """``cuda`` becomes this rank's ``cuda:LOCAL_RANK``; anything else is kept."""
    if ctx.active and device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


@contextlib.contextmanager
def spawn_workers(n: int, target: Callable[..., Any], args: tuple = ()):
    """Run ``target(*args)`` in ``n - 1`` child processes as ranks ``1..n-1``; this process is rank 0.

    The children get the environment torchrun would give them (a free local port), so
    they join the group through :func:`init` like torchrun's workers; inside the ``with``
    block this process does too. On exit the environment is restored and the children
    are joined (and stopped if they outlive rank 0 by 60 s).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
    saved = {k: os.environ.get(k) for k in (*env, "RANK", "LOCAL_RANK")}
    mp = torch.multiprocessing.get_context("spawn")
    procs = []
    try:
        for r in range(1, n):
            os.environ.update(env, RANK=str(r), LOCAL_RANK=str(r))
            procs.append(mp.Process(target=target, args=args, daemon=True))
            procs[-1].start()
        os.environ.update(env, RANK="0", LOCAL_RANK="0")
        yield procs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
