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
import torch.nn.functional as F
from torch import nn

from . import preprocess
from .base import DifferentiableOptimizer, Params, State
from .lstm_fused import FusedCell, forward_cm, forward_kernel, kernel_applies

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

    #: with a graph, run :func:`cell_core` under autograd instead of the one-node
    #: :class:`~l2o.optim.lstm_fused.FusedCell` (the reference, for tests and benchmarks)
    recorded_cell: bool = False

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

    # ------------------------------------------------------------------ compiled path
    def use_compiled(self, enabled: bool = True) -> "LSTMOptimizer":
        """Run no-graph steps through ``torch.compile`` (opt-in; eager fallback).

        The first step per coordinate count compiles the fused cell (about 20-60 s on a
        CPU, needs a C++ compiler); later steps reuse it. Where compilation fails, a
        warning is printed once and the eager fused path is used. Steps that build a
        graph always run eagerly.
        """
        self._compiled_enabled = bool(enabled)
        return self

    def _compiled_core(self):
        fn = getattr(self, "_compiled_fn", None)
        if fn is None:
            import torch._inductor.config as inductor_config

            # compile in this process: a pool of compile workers competes with the
            # run itself for the cores of a small machine
            inductor_config.compile_threads = 1
            fn = self._compiled_fn = torch.compile(cell_core, dynamic=False, fullgraph=True)
        return fn

    # ------------------------------------------------------------------ protocol
    def init(self, params: Params) -> State:
        n = sum(p.numel() for p in params.values())
        like = next(iter(params.values())).detach()
        # [N, hidden], contiguous, as the fused paths keep them; one tensor each, not
        # shared, so that step_ may update every state in place
        state: State = {"step": 0, "h": [like.new_zeros(n, self.hidden) for _ in range(self.layers)],
                        "c": [like.new_zeros(n, self.hidden) for _ in range(self.layers)]}
        if self.inputs == "rich":
            state["feat"] = preprocess.rich_init(n, like)
        return state

    def _features(self, g: torch.Tensor, state: State) -> tuple[torch.Tensor, dict | None]:
        if self.inputs == "paper":
            return preprocess.log_sign(g, self.p), None
        if self.inputs == "plain":
            return (g * self.plain_scale)[:, None], None
        return preprocess.rich(g, state["feat"], self.p)

    def _weights(self) -> list[torch.Tensor]:
        ws: list[torch.Tensor] = []
        for lin in self.cells:
            ws += [lin.weight, lin.bias]
        ws += [self.out.weight, self.out.bias]
        if self.readout == "dir_mag":
            ws.append(self.skip.weight)
        return ws

    def _check_state(self, n: int, state: State) -> None:
        """Refuse a state made for another number of coordinates: the compiled kernels would read past its end."""
        sizes = [t.shape[0] if t.dim() else -1 for t in (*state["h"], *state["c"])]
        if "feat" in state:
            sizes += [t.shape[-1] if t.dim() else -1 for t in (state["feat"]["m"], state["feat"]["v"])]  # m: [3, N]
        if any(k != n for k in sizes):
            raise ValueError(f"LSTMOptimizer: the state holds {sizes[0]} coordinates but the parameters have {n}; "
                             f"step with the state init() made for these parameters")

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        keys = list(params)
        g = torch.cat([grads[k].reshape(-1) for k in keys])
        self._check_state(g.shape[0], state)
        x, feat_state = self._features(g, state)
        # under torch.func transforms (vmap over PES particles) neither the custom autograd
        # node nor the in-place kernel applies: every operation is recorded, as the reference
        in_transform = torch._C._functorch.peek_interpreter_stack() is not None
        if in_transform:
            update, hs, cs = cell_core(x, state["h"], state["c"], self._weights(), self.hidden, self.readout,
                                       self.output_scale, self.skip_gain)
        elif torch.is_grad_enabled() and not self.recorded_cell and g.device.type == "cpu":
            # one autograd node per step with a hand-written backward (lstm_fused),
            # coordinate-major as the no-graph path. CPU only: on a GPU its backward's extra
            # small kernels made the meta-unroll 1.12x slower than the recorded cell
            # (benchmarks/RESULTS.md)
            out = FusedCell.apply((self.hidden, self.layers, self.readout, self.output_scale, self.skip_gain),
                                  x, *state["h"], *state["c"], *self._weights())
            update, hs, cs = out[0], list(out[1:1 + self.layers]), list(out[1 + self.layers:])
        elif torch.is_grad_enabled():  # the reference: every operation recorded by autograd
            update, hs, cs = cell_core(x, state["h"], state["c"], self._weights(), self.hidden, self.readout,
                                       self.output_scale, self.skip_gain)
        elif getattr(self, "_compiled_enabled", False) and not getattr(self, "_compile_failed", False):
            try:
                update, hs, cs = self._compiled_core()(x.contiguous(), [h.contiguous() for h in state["h"]],
                                                       [c.contiguous() for c in state["c"]], self._weights(),
                                                       self.hidden, self.readout, self.output_scale, self.skip_gain)
            except Exception as exc:  # no C++ compiler, unsupported platform: eager from now on
                import warnings

                warnings.warn(f"LSTMOptimizer: torch.compile failed ({type(exc).__name__}: {exc}); "
                              f"using the eager fused step", RuntimeWarning, stacklevel=2)
                self._compile_failed = True
                update, hs, cs = self._fused_step(x, state["h"], state["c"])
        else:
            update, hs, cs = self._fused_step(x, state["h"], state["c"])
        return self._updated(params, update, state, hs, cs, feat_state, inplace=False)

    def step_(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """The no-graph step writing the new parameters and LSTM states into the given tensors.

        The same arithmetic as :meth:`step` (bitwise); :meth:`step` itself where the
        fused path does not run (compiled mode, torch.func transforms). States that are
        not contiguous, unshared ``[N, hidden]`` tensors are replaced, not written.
        """
        if (torch.is_grad_enabled() or getattr(self, "_compiled_enabled", False)
                or torch._C._functorch.peek_interpreter_stack() is not None):
            return self.step(params, grads, state)
        keys = list(params)
        g = torch.cat([grads[k].reshape(-1) for k in keys])
        self._check_state(g.shape[0], state)
        x, feat_state = self._features(g, state)
        update, hs, cs = self._fused_step(x, state["h"], state["c"], into=_separate(state))
        return self._updated(params, update, state, hs, cs, feat_state, inplace=True)

    @staticmethod
    def _updated(params: Params, update: torch.Tensor, state: State, hs: list, cs: list, feat_state: dict | None,
                 inplace: bool) -> tuple[Params, State]:
        """``params + update`` (into ``params`` when ``inplace``) and the new state."""
        new_params, offset = {}, 0
        for k, p in params.items():
            n = p.numel()
            u = update[offset:offset + n].view_as(p)
            new_params[k] = p.add_(u) if inplace else p + u
            offset += n
        new_state: State = {"step": state["step"] + 1, "h": hs, "c": cs}
        if feat_state is not None:
            new_state["feat"] = feat_state
        return new_params, new_state

    def _fused_step(self, x: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor], into: bool = False
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """:func:`cell_core` without a graph (:func:`l2o.optim.lstm_fused.forward_cm`).

        Each layer's products and gates in one compiled pass (:mod:`l2o.optim.lstm_kernel`);
        where the kernel is unavailable, coordinate-major ``[N, 4 hidden]`` products into a
        work matrix reused across steps (allocated only then: 320 bytes per coordinate) and
        eager gates, the cell output's ``tanh`` as ``2 sigmoid(2 c) - 1``. Returns
        ``(update [N], hidden states, cell states)``; ``into``: written into ``hs``, ``cs``.
        """
        H, n, ws = self.hidden, x.shape[0], self._weights()
        if kernel_applies(x, hs, cs, ws, self.readout):
            return forward_kernel(x, hs, cs, ws, self.readout, self.output_scale, self.skip_gain, into)
        buf = getattr(self, "_scratch", None)
        if buf is None or buf.shape != (n, 4 * H) or buf.dtype != x.dtype or buf.device != x.device:
            buf = self._scratch = x.new_empty(n, 4 * H)
        return forward_cm(x, hs, cs, ws, H, self.readout, self.output_scale, self.skip_gain, into=into,
                          scratch=buf)[:3]


def _separate(state: State) -> bool:
    """Whether every LSTM state is a contiguous ``[N, hidden]`` tensor with storage of its own (step_ writes them)."""
    ts = [*state["h"], *state["c"]]
    return all(t.is_contiguous() for t in ts) and len({t.untyped_storage().data_ptr() for t in ts}) == len(ts)


def cell_core(x: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor], weights: list[torch.Tensor],
              hidden: int, readout: str, output_scale: float, skip_gain: float
              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One step of the stacked LSTM on ``[N, features]`` inputs, out of place (differentiable, compilable).

    Per layer, with ``s = sigmoid([x, h] W^T + b)`` split in ``[i, f, o, g]`` blocks of
    ``hidden`` columns: ``c' = f c + i (2 g - 1)``, ``h' = o tanh(c')``. Coordinate-major
    with one product per layer and ``[x, h]`` concatenated: the recorded reference, and
    what ``torch.compile`` and torch.func transforms run.

    Returns:
        ``(update [N], new hidden states, new cell states)``, states as ``[N, hidden]``.
    """
    H, feats = hidden, x
    new_h, new_c = [], []
    for i, (h, c) in enumerate(zip(hs, cs)):
        w, b = weights[2 * i], weights[2 * i + 1]
        s = torch.sigmoid(torch.addmm(b, torch.cat([x, h], dim=1), w.t()))
        ig, fg, og, gg = s.split(H, dim=1)
        c = torch.addcmul(fg * c, ig, 2.0 * gg - 1.0)
        x = og * torch.tanh(c)
        new_h.append(x)
        new_c.append(c)
    if readout == "linear":
        update = F.linear(x, weights[-2], weights[-1]).squeeze(1) * output_scale
    else:
        w, b, skip = weights[-3:]
        ds = F.linear(x, w, b) + skip_gain * F.linear(feats, skip)
        update = ds[:, 0] * torch.exp(ds[:, 1].clamp(max=MAX_LOG_MAGNITUDE)) * output_scale
    return update, new_h, new_c
