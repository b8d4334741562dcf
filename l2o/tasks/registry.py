"""``l2o.tasks.get(name, **options)``: the task registry, open to user tasks.

A task name is a built-in (``quadratic``, ``mnist_mlp``, ...), a name given to
:func:`register`, or an import path ``package.module:function`` (or
``path/to/file.py:function``) naming a Task, a Task class or a function that returns
a Task; an import path is registered under itself the first time it is used.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

from .base import Task
from .conv import ConvTask
from .mlp import MLPTask
from .quadratic import QuadraticTask

TASKS: dict[str, Callable[..., Task]] = {
    "quadratic": QuadraticTask,
    "mnist_mlp": lambda **kw: MLPTask(dataset="mnist", **kw),
    "fashion_mnist_mlp": lambda **kw: MLPTask(dataset="fashion_mnist", **kw),
    "cifar10_conv": ConvTask,
}
_SIGNATURES: dict[str, Callable] = {"quadratic": QuadraticTask, "mnist_mlp": MLPTask, "fashion_mnist_mlp": MLPTask,
                                    "cifar10_conv": ConvTask}
_HIDDEN = ("self", "dataset", "W", "y")  # constructor arguments that are not user options


def register(name: str, factory: Task | Callable[..., Task], *, replace: bool = False) -> None:
    """Make ``factory`` available as task ``name`` (to :func:`get`, the CLIs and task families).

    Args:
        name: the task's name.
        factory: a :class:`Task` (returned as is), a Task class, or a function returning a
            Task; its keyword arguments are the task's options.
        replace: allow replacing an existing, different task of that name.

    Raises:
        ValueError: ``name`` is taken (and ``replace`` is False).
        TypeError: ``factory`` is neither a Task nor callable.
    """
    if isinstance(factory, Task):
        task = factory

        def factory() -> Task:  # noqa: F811 - a fixed task: no options
            return task
        factory.fixed = task  # type: ignore[attr-defined]
    elif not callable(factory):
        raise TypeError(f"task {name!r}: register a Task, a Task class or a function returning a Task, "
                        f"got {type(factory).__name__}")
    old = TASKS.get(name)
    fixed = getattr(old, "fixed", None)
    same = old is factory or (fixed is not None and fixed is getattr(factory, "fixed", None))
    if old is not None and not same and not replace:
        raise ValueError(f"task {name!r} is already registered; pass replace=True to replace it")
    TASKS[name] = factory
    _SIGNATURES[name] = factory


def _load(path: str) -> Any:
    """The object named by ``package.module:attr`` or ``file.py:attr`` (ValueError with one line otherwise)."""
    where, _, attr = path.rpartition(":")
    if not where or not attr:
        raise ValueError(f"bad task import path {path!r}; write package.module:function or file.py:function")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise ValueError(f"task file {where!r} (from {path!r}) does not exist")
            name = "l2o_user_tasks_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(where))
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, where)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module  # before running it, so dataclasses and pickling find it
                try:
                    spec.loader.exec_module(module)  # type: ignore[union-attr]
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            added = os.getcwd() not in sys.path  # `python meta_train.py` does not put the cwd on the path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(where)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's import is reported in one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"cannot import task {path!r}: {type(exc).__name__}: {detail}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"task {path!r}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, Task) or callable(obj)):
        raise ValueError(f"task {path!r} is a {type(obj).__name__}, not a Task or a function returning one")
    return obj


def _factory(name: str) -> Callable[..., Task]:
    if name not in TASKS:
        if ":" not in name:
            raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} "
                             f"or give an import path package.module:function")
        register(name, _load(name))
    return TASKS[name]


def check(name: str) -> None:
    """Raise ValueError (one line) unless ``name`` is a known task or an importable task path."""
    _factory(name)


def _signature(name: str) -> list[inspect.Parameter]:
    target = _SIGNATURES[name]
    target = target.__init__ if inspect.isclass(target) else target
    try:
        return list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: no named options
        return [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]


def options(name: str) -> list[str]:
    """The option names accepted by task ``name``."""
    _factory(name)
    return [p.name for p in _signature(name) if p.name not in _HIDDEN
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def _check_common(opts: dict[str, Any]) -> None:
    """``device`` and ``data_dir`` (every task's options) checked here, not deep inside torch or os."""
    if opts.get("data_dir") is not None and not isinstance(opts["data_dir"], (str, os.PathLike)):
        raise TypeError(f"data_dir must be a str or os.PathLike, got {type(opts['data_dir']).__name__}")
    if opts.get("device") is None:
        return
    import torch

    try:
        device = torch.device(opts["device"])
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {opts['device']!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {opts['device']!r} asks for CUDA, which is not available here; use 'cpu'")


def get(name: str, **opts) -> Task:
    """Build a task by name.

    Args:
        name: a built-in (``quadratic``, ``mnist_mlp``, ``fashion_mnist_mlp``,
            ``cifar10_conv``), a name given to :func:`register`, or an import path
            ``package.module:function`` / ``file.py:function``.
        **opts: task options (e.g. ``hidden=[40]``, ``activation="relu"``, ``data_dir=...``).
            ``device`` and ``data_dir`` are accepted for every task: a task that takes no
            ``device`` is moved with ``task.to(device)``, and a ``data_dir`` of None is
            dropped for a task that takes none.

    Raises:
        ValueError: unknown task or option, a bad ``device``, or an import path that
            fails, with the valid choices in the one-line message. TypeError: ``name`` is
            not a str.
    """
    if not isinstance(name, str):
        raise TypeError(f"a task name must be a str (a built-in, a registered name or package.module:function), "
                        f"got {type(name).__name__}")
    _check_common(opts)
    factory = _factory(name)
    known = options(name)
    any_option = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in _signature(name))
    device = opts.pop("device", None) if "device" not in known and not any_option else None
    if "data_dir" not in known and not any_option and opts.get("data_dir", 0) is None:
        opts.pop("data_dir")
    bad = [k for k in opts if k not in known and not any_option]
    if bad:
        raise ValueError(f"task {name!r} has no option {bad[0]!r}; options: {', '.join(known) or 'none'}")
    required = [p.name for p in _signature(name)[1 if inspect.isclass(_SIGNATURES[name]) else 0:]
                if p.default is inspect.Parameter.empty and p.name not in opts
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if required:  # checked here: a TypeError raised inside the factory is the user's own, with its traceback
        raise ValueError(f"task {name!r} needs a value for {required[0]!r} (no default); give it as an option "
                         f"or a default in the function")
    task = factory(**opts)
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r} built a {type(task).__name__}, not an l2o Task; "
                         f"make one with l2o.tasks.from_module(...)")
    if device is not None:
        task = task.to(device)
    if ":" not in name:  # an import path keeps the task's own (shorter) name
        task.name = name
    if name not in _BUILTIN and hasattr(task, "options"):
        task.options = dict(opts)  # UserTask.config(): the options that rebuild it
    return task


def resolve(spec: str | Task | Callable[..., Task], **opts) -> Task:
    """A Task from any way of naming one: a Task, a registered name or import path, or a factory.

    Task families call this for each member they hold, so a family may mix built-in and
    user tasks. ``opts`` go to :func:`get` or to the factory; a Task is only moved to
    ``opts["device"]`` if given.
    """
    if isinstance(spec, Task):
        return spec.to(opts["device"]) if opts.get("device") is not None else spec
    if isinstance(spec, str):
        return get(spec, **opts)
    if callable(spec):
        task = spec(**opts)
        if not isinstance(task, Task):
            raise ValueError(f"task factory {getattr(spec, '__name__', spec)!r} built a {type(task).__name__}, "
                             f"not an l2o Task")
        return task
    raise TypeError(f"cannot make a task from {type(spec).__name__}")


_BUILTIN = frozenset(TASKS)
