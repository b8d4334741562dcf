"""Coordinatewise input features for learned optimizers.

All functions take flat vectors (one entry per coordinate of every parameter tensor)
and return ``[N, F]`` feature matrices, so a learned optimizer sees every coordinate
of every tensor as one batch. The matrices are views of ``[F, N]`` storage, so
``.t()`` gives each feature as a contiguous row.
"""
from __future__ import annotations

import math

import torch

from . import lstm_kernel


def log_sign(g: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """The L2L paper's gradient preprocessing (Andrychowicz et al. 2016, appendix A).

    ``(log|g| / p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``. Gradients of this
    map are well defined everywhere (``log`` is evaluated on a clamped input).

    Args:
        g: ``[N]`` gradients.
        p: the scale ``p > 0`` (10 in the paper).

    Returns:
        ``[N, 2]`` features in roughly ``[-1, 1]``.
    """
    big = g.abs() >= math.exp(-p)
    logmag = torch.log(g.abs().clamp_min(math.exp(-p))) / p
    first = torch.where(big, logmag, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    # built as rows ([2, N] storage, returned as its [N, 2] view): consumers that work
    # feature-major (the LSTM) take ``.t()`` for free
    return torch.stack([first, second], dim=0).t()


# decays of the momentum features and of the second-moment normaliser in "rich" inputs
MOMENTUM_DECAYS = (0.5, 0.9, 0.99)
RMS_DECAY = 0.999
N_RICH = 2 + len(MOMENTUM_DECAYS) + 2
_COMPILED_LAYOUT = len(MOMENTUM_DECAYS) == 3  # the compiled pass (lstm_kernel.rich) writes these 7 features


def rich_init(n: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """State of :func:`rich` for ``n`` coordinates: EMAs of g and g^2, and the step count."""
    z = like.new_zeros(len(MOMENTUM_DECAYS), n)
    return {"m": z, "v": like.new_zeros(n), "t": like.new_zeros(())}


def rich(g: torch.Tensor, state: dict[str, torch.Tensor], p: float = 10.0, eps: float = 1e-8
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Richer coordinatewise inputs (as in learned_optimization's RNN/MLP optimizers).

    Features: the paper's log/sign of ``g``; momenta at several timescales and ``g``
    itself, each divided by the bias-corrected RMS of ``g`` (Adam-style normalisation,
    so the features are scale free); and ``log`` of that RMS / p.

    Returns:
        ``([N, N_RICH] features, new state)``.
    """
    if (_COMPILED_LAYOUT and not torch.is_grad_enabled() and torch._C._functorch.peek_interpreter_stack() is None
            and lstm_kernel.usable(g, state["m"], state["v"], state["t"])):
        return _rich_compiled(g, state, p, eps)
    decays = g.new_tensor(MOMENTUM_DECAYS)[:, None]
    m = decays * state["m"] + (1 - decays) * g
    v = RMS_DECAY * state["v"] + (1 - RMS_DECAY) * g * g
    t = state["t"] + 1
    rms = torch.sqrt(v / (1 - RMS_DECAY ** t) + eps * eps)
    m_hat = m / (1 - decays ** t)
    feats = torch.cat([
        log_sign(g, p).t(),
        m_hat / rms,
        (g / rms)[None],
        (torch.log(rms) / p)[None],
    ], dim=0)  # [N_RICH, N] storage, returned as its [N, N_RICH] view (see log_sign)
    return feats.t(), {"m": m, "v": v, "t": t}


def _rich_compiled(g: torch.Tensor, state: dict[str, torch.Tensor], p: float, eps: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`rich` without a graph as one compiled pass (a dozen small eager passes took ~10% of a step)."""
    t = state["t"] + 1
    decays = g.new_tensor(MOMENTUM_DECAYS)
    k = torch.cat([decays, 1 - decays, 1 - decays ** t, g.new_tensor([RMS_DECAY, 1 - RMS_DECAY]),
                   (1 - RMS_DECAY ** t)[None], g.new_tensor([p, math.exp(-p), math.exp(p), eps * eps])])
    x, m, v = lstm_kernel.rich(g.contiguous(), state["m"].contiguous(), state["v"].contiguous(), k)
    return x.t(), {"m": m, "v": v, "t": t}
