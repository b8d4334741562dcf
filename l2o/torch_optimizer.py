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
  functional optimizer is copied to each device/dtype it meets).

Param-group option: ``scale`` (default 1.0) multiplies the group's update
(``p <- p + scale * (step(p) - p)``); 1.0 applies the optimizer's update exactly.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Iterable

import torch

from . import optim, state_layout
from .checkpoint import load_optimizer
from .optim import DifferentiableOptimizer, WeightDecay


def _resolve(optimizer: Any, which: str, options: dict[str, Any]) -> DifferentiableOptimizer:
    if isinstance(optimizer, (str, os.PathLike)):
        text = os.fspath(optimizer)
        if not os.path.exists(text) and os.sep not in text and not text.endswith(".pt"):
            return optim.make(text, **options)  # a name; an unknown one is a ValueError naming the choices
        if options:
            raise ValueError(f"options {sorted(options)} apply to an optimizer given by name "
                             f"({', '.join(optim.NAMES)}), not to the checkpoint {text!r}")
        return load_optimizer(text, "cpu", which)
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


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned (or hand-designed) l2o optimizer behind the ``torch.optim.Optimizer`` interface.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        optimizer: a checkpoint path written by ``meta_train.py`` (a learned LSTM or
            learned hyperparameters), an optimizer name from ``l2o.optim.NAMES`` (with its
            constructor options, e.g. ``"adam", lr=1e-3``), or an l2o optimizer module.
        which: ``best`` (by validation, the default) or ``current`` weights of a checkpoint.
        scale: default of the groups' ``scale`` option (multiplies each update).
        **options: constructor options of an optimizer given by name.

    Raises:
        l2o.checkpoint.CheckpointError: the checkpoint is missing or not an l2o checkpoint.
        ValueError: unknown optimizer name, bad options, or hyperparameters learned per
            weight of another task.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], optimizer: Any, *, which: str = "best",
                 scale: float = 1.0, **options: Any) -> None:
        self.functional = _resolve(optimizer, which, options)
        _check_portable(self.functional)
        self._copies: dict[tuple, tuple[torch.nn.Module, Any]] = {}
        self._merged: dict[tuple, tuple[list, list, Any]] = {}  # the last single call's merged state
        super().__init__(params, {"scale": float(scale)})

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
        kinds: dict[tuple, list[tuple[torch.Tensor, dict]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                kinds.setdefault((p.device, p.dtype), []).append((p, group))
        for key, items in kinds.items():
            module, layout = self._functional_for(*key)
            for p, _ in items:
                if "l2o" not in self.state[p]:
                    self.state[p]["l2o"] = module.init({state_layout.KEY: p.detach()})
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
        params = {n: p for n, (p, _) in zip(names, call)}
        grads = {n: p.grad for n, (p, _) in zip(names, call)}
        if all(group["scale"] == 1.0 for _, group in call):
            # the parameters and their state are ours to update, as torch.optim's are: in place
            new, state = module.step_(params, grads, merged)
        else:
            new, state = module.step(params, grads, merged)
        for n, (p, group) in zip(names, call):
            if new[n] is p:
                continue
            if group["scale"] == 1.0:
                p.copy_(new[n])
            else:
                p.add_(new[n] - p, alpha=group["scale"])
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
        """Load a state from :meth:`state_dict` (the learned optimizer's per-coordinate state included)."""
        self._merged.clear()
        super().load_state_dict(state_dict)
