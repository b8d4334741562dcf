"""``l2o.LearnedOptimizer``: any l2o optimizer as a ``torch.optim.Optimizer``.

    model = MyNet()
    opt = l2o.LearnedOptimizer(model.parameters(), "checkpoints/lstm_cifar10.pt")
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

Each step runs the functional optimizer's own ``step(params, grads, state)`` under
``torch.no_grad()`` on every parameter that has a gradient, batched into as few calls
as the parameters' states allow (one call in the usual case, so the LSTM sees all
coordinates as one batch). The functional state is kept per parameter in
``self.state[p]["l2o"]`` (split and merged by :mod:`l2o.state_layout`), so

* a parameter whose ``grad`` is None is skipped and its state is left untouched;
* ``state_dict()`` / ``load_state_dict()`` carry the learned optimizer's per-coordinate
  state (the LSTM's hidden and cell states, its momenta features, step counts) and a
  training run resumes bit-identically;
* parameters may live in several groups, on CPU or CUDA, in any floating dtype (the
  functional optimizer is copied to each device/dtype it meets; float16 / bfloat16
  parameters are stepped in float32 on a float32 state and rounded into the parameter);
* ``load_state_dict`` checks every state against this optimizer's own layout for that
  parameter's shape and refuses (ValueError, nothing changed) one that does not fit.

Param-group options: ``scale`` (default 1.0) multiplies the group's update
(``p <- p + scale * lr * (step(p) - p)``); ``lr`` (default 1.0) multiplies it too and is
the entry ``torch.optim.lr_scheduler`` schedules drive (warm-up, cosine decay, ...), so a
group's ``lr`` is a factor on the learned step, not a learning rate of its own. Both 1.0
apply the optimizer's update exactly.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable, Iterable

import torch

from . import checkpoint, optim, state_layout
from .checkpoint import load_optimizer
from .optim import DifferentiableOptimizer, WeightDecay


def _resolve(optimizer: Any, which: str, options: dict[str, Any]) -> DifferentiableOptimizer:
    if isinstance(optimizer, (str, os.PathLike)):
        text = os.fspath(optimizer)
        if which not in checkpoint.WHICH:
            raise ValueError(f"which must be one of {', '.join(map(repr, checkpoint.WHICH))}, got {which!r}")
        if not os.path.exists(text) and os.sep not in text and not text.endswith(".pt") and (
                text in optim.NAMES or checkpoint.shipped_path(text) == text):
            try:
                return optim.make(text, **options)  # a name
            except ValueError as exc:
                if text in optim.NAMES:
                    raise
                raise ValueError(f"{exc}, or a shipped checkpoint ({', '.join(checkpoint.shipped_names())}), "
                                 f"or a checkpoint path") from None
        if options:
            raise ValueError(f"options {sorted(options)} apply to an optimizer given by name "
                             f"({', '.join(optim.NAMES)}), not to the checkpoint {text!r}")
        return load_optimizer(text, "cpu", which)  # a path, or a shipped name such as "lstm_mnist"
    if isinstance(optimizer, torch.nn.Module) and callable(getattr(optimizer, "init", None)) \
            and callable(getattr(optimizer, "step", None)):
        if options:
            raise ValueError(f"options {sorted(options)} apply to an optimizer given by name, not to a module")
        return optimizer
    raise TypeError(f"LearnedOptimizer needs a checkpoint path, an optimizer name ({', '.join(optim.NAMES)}) "
                    f"or an l2o optimizer module, got {type(optimizer).__name__}")


def _check_portable(opt: torch.nn.Module) -> None:
    """Refuse hyperparameters tied to the parameter names of the task they were learned on."""
    for mod in opt.modules():
        if isinstance(mod, WeightDecay) and mod.per_weight:
            raise ValueError("this optimizer learned one weight decay per weight of the task it was trained on; "
                             "it cannot be applied to other parameters")
        if any(isinstance(v, dict) for v in getattr(mod, "_given", {}).values()):
            raise ValueError("this optimizer has per-parameter hyperparameters keyed by another task's "
                             "parameter names; give scalar hyperparameters instead")


def _scale(value: Any, name: str = "scale") -> float:
    """A group's ``scale`` or ``lr``: a finite number >= 0 (torch.optim refuses a negative learning rate alike)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _factor(group: dict[str, Any]) -> float:
    """What a group's update is multiplied by: its ``scale`` times its (scheduled) ``lr``."""
    return _scale(group["scale"]) * _scale(group.get("lr", 1.0), "a param group's lr (the factor lr schedulers drive)")


# float16 / bfloat16 parameters are stepped in float32 (state kept in float32, the result
# rounded into the parameter): in 8 or 11 significant bits the optimizers' constants
# (1 - beta2 = 1e-3, a bf16 0.999 rounds to 1) and an LSTM's small updates vanish
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def _fits(loaded: Any, fresh: Any, where: str) -> str | None:
    """Why ``loaded`` is not a state of the layout of ``fresh`` (None if it is)."""
    if isinstance(fresh, dict):
        if not isinstance(loaded, dict) or set(loaded) != set(fresh):
            got = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
            return f"{where or 'the state'} has keys {got}, this optimizer's has {sorted(fresh)}"
        return next((r for k in fresh if (r := _fits(loaded[k], fresh[k], f"{where}.{k}".lstrip("."))) is not None),
                    None)
    if isinstance(fresh, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(fresh):
            return f"{where} has {len(loaded) if isinstance(loaded, (list, tuple)) else loaded!r} entries, " \
                   f"this optimizer's has {len(fresh)}"
        return next((r for i, (a, b) in enumerate(zip(loaded, fresh)) if (r := _fits(a, b, f"{where}[{i}]")) is not None),
                    None)
    if isinstance(fresh, torch.Tensor):
        if not isinstance(loaded, torch.Tensor) or loaded.shape != fresh.shape:
            got = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else type(loaded).__name__
            return f"{where} has shape {got}, this optimizer's has {tuple(fresh.shape)}"
        return None
    if isinstance(loaded, torch.Tensor) or isinstance(loaded, (dict, list, tuple)):
        return f"{where} is a {type(loaded).__name__}, this optimizer's is a {type(fresh).__name__}"
    return None


def _cast(state: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``state`` with its floating tensors on ``device`` in ``dtype`` (other leaves as they are)."""
    if isinstance(state, dict):
        return {k: _cast(v, device, dtype) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cast(v, device, dtype) for v in state)
    if isinstance(state, torch.Tensor):
        return state.to(device=device, dtype=dtype if state.is_floating_point() else state.dtype)
    return state


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned (or hand-designed) l2o optimizer behind the ``torch.optim.Optimizer`` interface.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        optimizer: a checkpoint path written by ``meta_train.py`` (a learned LSTM or
            learned hyperparameters) or a shipped checkpoint's name (``"lstm_mnist"``,
            ``"lstm_generalist"``, ...), an optimizer name from ``l2o.optim.NAMES`` (with its
            constructor options, e.g. ``"adam", lr=1e-3``), or an l2o optimizer module.
        which: ``best`` (by validation, the default) or ``current`` weights of a checkpoint.
        scale: default of the groups' ``scale`` option (multiplies each update; finite, >= 0).
        **options: constructor options of an optimizer given by name.

    Raises:
        l2o.checkpoint.CheckpointError: the checkpoint is missing or not an l2o checkpoint.
        ValueError: unknown optimizer name, bad options or ``scale``, or hyperparameters
            learned per weight of another task.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], optimizer: Any, *, which: str = "best",
                 scale: float = 1.0, **options: Any) -> None:
        scale = _scale(scale)
        self.functional = _resolve(optimizer, which, options)
        _check_portable(self.functional)
        self._copies: dict[tuple, tuple[torch.nn.Module, Any]] = {}
        self._merged: dict[tuple, tuple[list, list, Any]] = {}  # the last single call's merged state
        super().__init__(params, {"scale": scale, "lr": 1.0})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (its ``scale`` defaults to the optimizer's), as ``torch.optim`` does."""
        if isinstance(param_group, dict) and "scale" in param_group:
            param_group = {**param_group, "scale": _scale(param_group["scale"])}
        if isinstance(param_group, dict) and "lr" in param_group:
            param_group = {**param_group, "lr": _scale(param_group["lr"], "lr")}
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (torch.Tensor, type(None))):
            param_group = {**param_group, "params": list(param_group["params"])}  # a generator is read once
        ps = param_group.get("params") if isinstance(param_group, dict) else None
        for p in [ps] if isinstance(ps, torch.Tensor) else ps or []:
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, parameter), as named_parameters() gives
            if isinstance(p, torch.Tensor) and p.is_complex():
                # the optimizers' arithmetic (g * g, sign, log|g|) is for real coordinates; torch.optim
                # steps complex parameters as pairs of reals, which these optimizers were not trained on
                raise ValueError(f"LearnedOptimizer steps real parameters, got one of dtype {p.dtype}; keep its "
                                 f"real and imaginary parts as two real parameters")
        super().add_param_group(param_group)

    def _functional_for(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        """The functional optimizer on ``device`` in ``dtype``, and its state layout (None: step one by one)."""
        key = (device, dtype)
        if key not in self._copies:
            module = self.functional
            tensors = [*module.parameters(), *module.buffers()]
            if any(t.device != device or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
                module = copy.deepcopy(module).to(device=device, dtype=dtype)
            try:
                layout = state_layout.infer(module, torch.empty(0, device=device, dtype=dtype))
            except state_layout.LayoutError:
                layout = None
            self._copies[key] = (module, layout)
        return self._copies[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kinds: dict[tuple, list[tuple[torch.Tensor, float]]] = {}
        for group in self.param_groups:
            factor = None  # checked once per group that has a gradient
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if factor is None:
                    factor = _factor(group)
                kinds.setdefault((p.device, _compute_dtype(p)), []).append((p, factor))
        for key, items in kinds.items():
            module, layout = self._functional_for(*key)
            for p, _ in items:
                if "l2o" not in self.state[p]:
                    self.state[p]["l2o"] = module.init({state_layout.KEY: p.detach().to(key[1])})
            calls = self._calls(key, items, layout)
            for call, merged in calls:
                self._apply(key, module, layout, call, merged, remember=len(calls) == 1)
        return loss

    def _calls(self, key: tuple, items: list, layout: Any) -> list[tuple[list, Any]]:
        """Group parameters into batched calls: those whose shared state (step counts) agree."""
        if layout is None:
            return [([item], self.state[item[0]]["l2o"]) for item in items]
        cached = self._merged.get(key)
        if cached is not None and len(cached[0]) == len(items) and all(
                q is p and part is self.state[p]["l2o"] for (p, _), q, part in zip(items, cached[0], cached[1])):
            return [(items, cached[2])]  # same parameters, states untouched since the last step: no re-merge
        calls: list[list] = []
        for item in items:
            st = self.state[item[0]]["l2o"]
            for call in calls:
                if state_layout.shared_equal(layout, self.state[call[0][0]]["l2o"], st):
                    call.append(item)
                    break
            else:
                calls.append([item])
        return [(call, state_layout.merge(layout, [self.state[p]["l2o"] for p, _ in call])) for call in calls]

    def _apply(self, key: tuple, module: torch.nn.Module, layout: Any, call: list, merged: Any,
               remember: bool) -> None:
        names = [str(i) for i in range(len(call))] if layout is not None else [state_layout.KEY]
        dtype = key[1]  # float32 copies of float16 / bfloat16 parameters and gradients
        params = {n: p if p.dtype == dtype else p.detach().to(dtype) for n, (p, _) in zip(names, call)}
        grads = {n: p.grad if p.grad.dtype == dtype else p.grad.to(dtype) for n, (p, _) in zip(names, call)}
        if all(factor == 1.0 for _, factor in call):
            # the parameters and their state are ours to update, as torch.optim's are: in place
            new, state = module.step_(params, grads, merged)
        else:
            new, state = module.step(params, grads, merged)
        for n, (p, factor) in zip(names, call):
            if new[n] is p:
                continue
            if factor == 1.0:
                p.copy_(new[n])
            elif params[n] is p:
                p.add_(new[n] - p, alpha=factor)
            else:  # the step in float32, rounded once into the parameter
                p.copy_(params[n].add_(new[n] - params[n], alpha=factor))
        if layout is None:
            self.state[call[0][0]]["l2o"] = state
            return
        parts = state_layout.split(layout, state, [p.numel() for p, _ in call])
        for (p, _), part in zip(call, parts):
            self.state[p]["l2o"] = part
        if remember:
            self._merged[key] = ([p for p, _ in call], parts, state)
        else:
            self._merged.pop(key, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (the learned optimizer's per-coordinate state included).

        The optimizer itself (a checkpoint's weights, a named optimizer's hyperparameters) is the
        constructor's, not part of the state: resume with the arguments the state was saved under.

        Raises:
            ValueError: the state was not saved by a ``LearnedOptimizer`` with this optimizer
                over parameters of these shapes (as ``torch.optim``, for a mismatch of the
                groups); the optimizer is left as it was.
        """
        before = (self.state, self.param_groups)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("lr", 1.0)  # saved before groups had a scheduled factor
        try:
            self._adopt(state_dict)
        except ValueError:
            self.state, self.param_groups = before  # load_state_dict replaced both; nothing is lost
            raise
        self._merged.clear()

    def _adopt(self, state_dict: dict[str, Any]) -> None:
        """Check every loaded per-parameter state against this optimizer's own, and hold it in its compute dtype.

        ``torch.optim`` casts floating state to each parameter's dtype; a float16 /
        bfloat16 parameter's float32 state is taken from ``state_dict`` again instead.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            st = self.state.get(p)
            if not st:
                continue
            if "l2o" not in st:
                raise ValueError(f"loaded state of parameter {index} has no 'l2o' entry (keys {sorted(st)}): "
                                 f"it was not saved by l2o.LearnedOptimizer")
            dtype = _compute_dtype(p)
            module, _ = self._functional_for(p.device, dtype)
            with torch.no_grad():
                fresh = module.init({state_layout.KEY: torch.zeros(p.shape, device=p.device, dtype=dtype)})
            why = _fits(st["l2o"], fresh, "")
            if why is not None:
                raise ValueError(f"loaded state of parameter {index} (shape {tuple(p.shape)}) does not fit this "
                                 f"optimizer: {why}; load a state_dict saved by a LearnedOptimizer with the same "
                                 f"optimizer over parameters of the same shapes")
            if p.dtype in _LOW_PRECISION:
                st["l2o"] = _cast(state_dict["state"][saved_id]["l2o"], p.device, dtype)
