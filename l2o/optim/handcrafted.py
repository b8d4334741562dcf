"""Hand-designed differentiable optimizers that follow ``torch.optim``'s update rules.

With constant hyperparameters each reproduces the matching ``torch.optim`` trajectory
(tested in float64); written out-of-place so that gradients reach the hyperparameters.
Without a graph (``torch.no_grad()``) and with one value of each hyperparameter for all
parameters, ``step`` runs the same arithmetic as a handful of ``torch._foreach_*`` calls
over every tensor at once: out of place in ``step`` (the old params and state stay
valid), in place in ``step_`` (for callers that own them, as ``torch.optim`` updates).
"""
from __future__ import annotations

import math

import torch

from .base import DifferentiableOptimizer, Params, State, foreach


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of inf (avoids NaN second derivatives)."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


class SGD(DifferentiableOptimizer):
    """``p <- p - lr * g``."""

    def __init__(self, lr: float | torch.Tensor = 0.1) -> None:
        super().__init__()
        self._hparam("lr", lr, "positive")

    def init(self, params: Params) -> State:
        return {"step": 0}

    def fused_names(self) -> tuple[str, ...]:
        return ("lr",)

    def _fused(self, keys, params, grads, state, h, inplace):
        new = foreach("add", inplace, list(params.values()), [grads[k] for k in keys], alpha=-h["lr"])
        return dict(zip(keys, new)), {"step": state["step"] + 1}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        fused = self._try_fused(params, grads, state, False)
        if fused is not None:
            return fused
        lr = self.hparam_getter("lr")
        new = {k: torch.addcmul(p, lr(k), grads[k], value=-1.0) for k, p in params.items()}
        return new, {"step": state["step"] + 1}


class Momentum(DifferentiableOptimizer):
    """Heavy-ball or Nesterov momentum, as ``torch.optim.SGD(momentum=mu, nesterov=...)``.

    ``b <- mu b + g``; heavy ball ``p <- p - lr b``; Nesterov ``p <- p - lr (g + mu b)``.
    """

    def __init__(self, lr: float | torch.Tensor = 0.1, momentum: float | torch.Tensor = 0.9,
                 nesterov: bool = False) -> None:
        super().__init__()
        self._hparam("lr", lr, "positive")
        self._hparam("momentum", momentum, "unit")
        self.nesterov = bool(nesterov)
        self._config["nesterov"] = self.nesterov

    def init(self, params: Params) -> State:
        return {"step": 0, "buf": {k: torch.zeros_like(p) for k, p in params.items()}}

    def lr_at(self, step: int, key: str) -> torch.Tensor:
        return self.hparam("lr", key)

    def lr_getter(self, step: int):
        """``key -> lr_at(step, key)`` (the constant rate computed once per step)."""
        return self.hparam_getter("lr")

    def fused_names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        fused = self._try_fused(params, grads, state, False)
        if fused is not None:
            return fused
        new_p, new_b = {}, {}
        momentum, lr = self.hparam_getter("momentum"), self.lr_getter(state["step"])
        for k, p in params.items():
            # addcmul: one autograd node per product-and-sum instead of two (the
            # backward through a long unroll visits every node)
            mu, g = momentum(k), grads[k]
            b = torch.addcmul(g, mu, state["buf"][k])             # mu * buf + g
            d = torch.addcmul(g, mu, b) if self.nesterov else b   # g + mu * b
            new_p[k] = torch.addcmul(p, lr(k), d, value=-1.0)      # p - lr * d
            new_b[k] = b
        return new_p, {"step": state["step"] + 1, "buf": new_b}

    def _fused(self, keys, params, grads, state, h, inplace):
        mu, g = h["momentum"], [grads[k] for k in keys]
        lr = float(self.lr_at(state["step"], keys[0]))
        b = foreach("mul", inplace, [state["buf"][k] for k in keys], mu)  # mu buf + g, as torch.optim orders it
        torch._foreach_add_(b, g)
        if self.nesterov:  # p - lr (g + mu b), without materialising g + mu b
            new_p = foreach("add", inplace, list(params.values()), g, alpha=-lr)
            torch._foreach_add_(new_p, b, alpha=-lr * mu)
        else:
            new_p = foreach("add", inplace, list(params.values()), b, alpha=-lr)
        return dict(zip(keys, new_p)), {"step": state["step"] + 1, "buf": dict(zip(keys, b))}


class MomentumInvDecay(Momentum):
    """Momentum with ``lr_t = lr * (1 + t / T0) ** -decay`` (Wu et al. 2018, short-horizon bias)."""

    def __init__(self, lr: float | torch.Tensor = 0.1, momentum: float | torch.Tensor = 0.9,
                 decay: float | torch.Tensor = 0.0, T0: float = 100.0, nesterov: bool = False) -> None:
        super().__init__(lr, momentum, nesterov)
        self._hparam("decay", decay, "real")
        if T0 <= 0:
            raise ValueError(f"T0 must be > 0, got {T0}")
        self.T0 = float(T0)
        self._config["T0"] = self.T0

    def lr_at(self, step: int, key: str) -> torch.Tensor:
        return self.hparam("lr", key) * (1.0 + step / self.T0) ** (-self.hparam("decay", key))

    def lr_getter(self, step: int):
        return lambda key: self.lr_at(step, key)


class Adam(DifferentiableOptimizer):
    """Adam exactly as ``torch.optim.Adam`` (bias-corrected, eps outside the sqrt)."""

    def __init__(self, lr: float | torch.Tensor = 1e-3, beta1: float | torch.Tensor = 0.9,
                 beta2: float | torch.Tensor = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        self._hparam("lr", lr, "positive")
        self._hparam("beta1", beta1, "unit")
        self._hparam("beta2", beta2, "unit")
        self.eps = float(eps)
        if not (math.isfinite(self.eps) and self.eps >= 0):  # as torch.optim: "Invalid epsilon value"
            raise ValueError(f"{type(self).__name__}: eps must be a finite number >= 0, got {eps}")
        self._config["eps"] = self.eps

    def init(self, params: Params) -> State:
        # m and v are separate tensors: an in-place step (step_) writes each
        return {"step": 0, "m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()}}

    def fused_names(self) -> tuple[str, ...]:
        return ("lr", "beta1", "beta2")

    def _fused(self, keys, params, grads, state, h, inplace):
        """The same arithmetic as :meth:`step`'s loop, over all tensors at once."""
        t = state["step"] + 1
        b1, b2, g = h["beta1"], h["beta2"], [grads[k] for k in keys]
        m = foreach("lerp", inplace, [state["m"][k] for k in keys], g, 1 - b1)  # b1 m + (1 - b1) g, one pass
        v = foreach("mul", inplace, [state["v"][k] for k in keys], b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - b2 ** t) ** 0.5)
        torch._foreach_add_(denom, self.eps)
        new_p = foreach("addcdiv", inplace, list(params.values()), m, denom, value=-h["lr"] / (1 - b1 ** t))
        return dict(zip(keys, new_p)), {"step": t, "m": dict(zip(keys, m)), "v": dict(zip(keys, v))}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        fused = self._try_fused(params, grads, state, False)
        if fused is not None:
            return fused
        t = state["step"] + 1
        new_p, m_new, v_new = {}, {}, {}
        beta1, beta2, lr = self.hparam_getter("beta1"), self.hparam_getter("beta2"), self.hparam_getter("lr")
        for k, p in params.items():
            b1, b2, g = beta1(k), beta2(k), grads[k]
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            denom = safe_sqrt(v) / torch.sqrt(1 - b2 ** t) + self.eps
            new_p[k] = p - lr(k) / (1 - b1 ** t) * m / denom
            m_new[k], v_new[k] = m, v
        return new_p, {"step": t, "m": m_new, "v": v_new}


class RMSprop(DifferentiableOptimizer):
    """RMSprop exactly as ``torch.optim.RMSprop`` (no momentum, not centered)."""

    def __init__(self, lr: float | torch.Tensor = 1e-2, alpha: float | torch.Tensor = 0.99, eps: float = 1e-8) -> None:
        super().__init__()
        self._hparam("lr", lr, "positive")
        self._hparam("alpha", alpha, "unit")
        self.eps = float(eps)
        if not (math.isfinite(self.eps) and self.eps >= 0):  # as torch.optim: "Invalid epsilon value"
            raise ValueError(f"{type(self).__name__}: eps must be a finite number >= 0, got {eps}")
        self._config["eps"] = self.eps

    def init(self, params: Params) -> State:
        return {"step": 0, "v": {k: torch.zeros_like(p) for k, p in params.items()}}

    def fused_names(self) -> tuple[str, ...]:
        return ("lr", "alpha")

    def _fused(self, keys, params, grads, state, h, inplace):
        """The same arithmetic as :meth:`step`'s loop, over all tensors at once."""
        a, g = h["alpha"], [grads[k] for k in keys]
        v = foreach("mul", inplace, [state["v"][k] for k in keys], a)
        torch._foreach_addcmul_(v, g, g, value=1 - a)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.eps)
        new_p = foreach("addcdiv", inplace, list(params.values()), g, denom, value=-h["lr"])
        return dict(zip(keys, new_p)), {"step": state["step"] + 1, "v": dict(zip(keys, v))}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        fused = self._try_fused(params, grads, state, False)
        if fused is not None:
            return fused
        new_p, v_new = {}, {}
        alpha, lr = self.hparam_getter("alpha"), self.hparam_getter("lr")
        for k, p in params.items():
            a, g = alpha(k), grads[k]
            v = a * state["v"][k] + (1 - a) * g * g
            new_p[k] = p - lr(k) * g / (safe_sqrt(v) + self.eps)
            v_new[k] = v
        return new_p, {"step": state["step"] + 1, "v": v_new}
