"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016).

One small LSTM (default 2 layers x 20 units) is shared by every coordinate; each
coordinate keeps its own hidden state. All coordinates of all parameter tensors are
one batch of shape ``[N, features]``, so a step is a handful of matrix products
regardless of the number of tensors (no Python loop over coordinates).

Update: ``theta <- theta + output_scale * Linear(h_top)``, the output layer initialised
near zero so that early meta-training starts from an almost-still optimizer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import preprocess
from .base import DifferentiableOptimizer, Params, State

INPUTS = ("paper", "plain", "rich")
READOUTS = ("linear", "dir_mag")
MAX_LOG_MAGNITUDE = 8.0  # exp(s) is capped at e^8 so a bad step cannot overflow



class LSTMOptimizer(DifferentiableOptimizer):
    """Coordinatewise learned optimizer.

    Args:
        hidden: LSTM width (20 in the paper).
        layers: number of stacked LSTM layers (2 in the paper).
        inputs: ``paper`` (log/sign preprocessing, 2 features), ``plain`` (the raw
            gradient times ``plain_scale``) or ``rich`` (log/sign plus momenta at
            several timescales and Adam-normalised gradient, see
            :func:`l2o.optim.preprocess.rich`).
        output_scale: multiplies the LSTM's output (0.1 in the paper).
        p: preprocessing scale (10 in the paper).
        init_scale: standard deviation of the output layer's initial weights
            (near-zero initial updates).
        readout: ``linear`` (the paper: ``update = output_scale * w.h``) or ``dir_mag``
            (direction and log-magnitude, ``update = output_scale * d * exp(s)``, with
            ``[d, s]`` linear in the top hidden state *and* in the input features). With
            scale-free ``rich`` inputs, ``dir_mag`` can express updates proportional to
            the gradient's scale (``exp(s) ~ rms``), i.e. SGD/momentum-like steps, which
            a bounded linear readout of an LSTM cannot; both start near zero.
        skip_gain: the skip path's weights are used multiplied by this gain. Under Adam as
            the outer optimizer a gain of g is a g-times larger meta learning rate for
            the handful of weights that set the overall step size and its dependence on
            the gradient's scale, which otherwise need thousands of meta-steps to move by O(1).
    """

    def __init__(self, hidden: int = 20, layers: int = 2, inputs: str = "paper", output_scale: float = 0.1,
                 p: float = 10.0, init_scale: float = 1e-3, plain_scale: float = 1.0,
                 readout: str = "linear", skip_gain: float = 1.0) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"unknown LSTM inputs {inputs!r}; choose one of {', '.join(INPUTS)}")
        if hidden < 1 or layers < 1 or output_scale <= 0 or p <= 0:
            raise ValueError("hidden, layers, output_scale and p must be positive")
        self.hidden, self.layers, self.inputs = int(hidden), int(layers), inputs
        self.output_scale, self.p, self.plain_scale = float(output_scale), float(p), float(plain_scale)
        if readout not in READOUTS:
            raise ValueError(f"unknown LSTM readout {readout!r}; choose one of {', '.join(READOUTS)}")
        self.readout, self.skip_gain = readout, float(skip_gain)
        self._config.update(hidden=self.hidden, layers=self.layers, inputs=inputs, output_scale=self.output_scale,
                            p=self.p, init_scale=float(init_scale), plain_scale=self.plain_scale, readout=readout,
                            skip_gain=self.skip_gain)
        n_in = {"paper": 2, "plain": 1, "rich": preprocess.N_RICH}[inputs]
        # One fused weight per layer acting on [x, h]: a single matmul per layer and step.
        # Gate order [input, forget, output, cell]. The cell gate is computed as
        # tanh(z) = 2 sigmoid(2 z) - 1, its pre-activation stored as 2z, so that one
        # sigmoid over all gates replaces three sigmoids and a tanh on strided slices
        # (the same function class, about 1.4x faster on CPU).
        self.cells = nn.ModuleList()
        for i in range(self.layers):
            lin = nn.Linear((n_in if i == 0 else hidden) + hidden, 4 * hidden)
            bound = 1.0 / math.sqrt(hidden)
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
            with torch.no_grad():
                lin.weight[3 * hidden:] *= 2.0
                lin.bias[hidden:2 * hidden] = 1.0  # forget-gate bias 1: remember by default
            self.cells.append(lin)
        n_out = 1 if readout == "linear" else 2
        self.out = nn.Linear(hidden, n_out)
        nn.init.normal_(self.out.weight, std=init_scale)
        nn.init.zeros_(self.out.bias)
        if readout == "dir_mag":  # skip path from the features to [d, s], starts at zero
            self.skip = nn.Linear(n_in, 2, bias=False)
            nn.init.zeros_(self.skip.weight)

    def learn(self, names: list[str] | None) -> "LSTMOptimizer":
        """None: learn every weight; a list of names: the LSTM has no hyperparameters, so its weights stay fixed
        (``WeightDecay(lstm).learn(["weight_decay"])`` learns only the decay)."""
        super().learn(names)
        for p in self.parameters():
            p.requires_grad_(names is None)
        return self

    def default_update_every(self, truncation: int, horizon: int) -> int:
        """Thousands of weights learn from many small updates: one per truncation, as the L2L paper trains."""
        return truncation

    def init(self, params: Params) -> State:
        n = sum(p.numel() for p in params.values())
        like = next(iter(params.values())).detach()
        z = like.new_zeros(n, self.hidden)
        state: State = {"step": 0, "h": [z] * self.layers, "c": [z] * self.layers}
        if self.inputs == "rich":
            state["feat"] = preprocess.rich_init(n, like)
        return state

    def _features(self, g: torch.Tensor, state: State) -> tuple[torch.Tensor, dict | None]:
        if self.inputs == "paper":
            return preprocess.log_sign(g, self.p), None
        if self.inputs == "plain":
            return (g * self.plain_scale)[:, None], None
        return preprocess.rich(g, state["feat"], self.p)

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        keys = list(params)
        g = torch.cat([grads[k].reshape(-1) for k in keys])
        x, feat_state = self._features(g, state)
        hs, cs = [], []
        H = self.hidden
        feats = x
        for i, lin in enumerate(self.cells):
            s = torch.sigmoid(torch.addmm(lin.bias, torch.cat([x, state["h"][i]], dim=1), lin.weight.t()))
            ig, fg, og, gg = s.split(H, dim=1)
            c = torch.addcmul(fg * state["c"][i], ig, 2.0 * gg - 1.0)
            x = og * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        if self.readout == "linear":
            update = self.out(x).squeeze(1) * self.output_scale
        else:
            ds = self.out(x) + self.skip_gain * self.skip(feats)
            update = ds[:, 0] * torch.exp(ds[:, 1].clamp(max=MAX_LOG_MAGNITUDE)) * self.output_scale
        new_params, offset = {}, 0
        for k in keys:
            n = params[k].numel()
            new_params[k] = params[k] + update[offset:offset + n].view_as(params[k])
            offset += n
        new_state: State = {"step": state["step"] + 1, "h": hs, "c": cs}
        if feat_state is not None:
            new_state["feat"] = feat_state
        return new_params, new_state
