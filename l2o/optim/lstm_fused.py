"""The LSTM optimizer's cell with a graph: one autograd node per step, a hand-written backward.

:func:`l2o.optim.lstm.cell_core` records about fifteen small operations per layer and
step, each saving its inputs and each with its own backward kernel. :class:`FusedCell`
computes the same function as the no-graph step does (:func:`forward_cm`: coordinate-major
``[N, 4 hidden]`` gate products, the gates' elementwise work in one compiled pass) and
records one node whose backward is a few matrix products and one elementwise pass per
layer (rows are coordinates):

    s = sigmoid([x, h] W^T + b) = [i, f, o, q],  g = 2 q - 1,  c' = f c + i g,
    t = tanh(c') = 2 sigmoid(2 c') - 1,          h' = o t
    dc = dc'_in + dh' o (1 - t^2),  dpre = s (1 - s) * [dc g, dc c, dh' t, 2 dc i]
    dW = dpre^T [x, h],  db = sum_n dpre,  [dx, dh] = dpre W,  dc_prev = dc f

Asked for a differentiable backward (``create_graph=True``: second-order hypergradients,
forward mode's double-vjp), the backward instead re-runs :func:`cell_core` on the saved
inputs under autograd and differentiates that, so higher derivatives are exact too.
"""
from __future__ import annotations

import torch

from . import lstm_kernel

MAX_LOG_MAGNITUDE = 8.0  # mirrors l2o.optim.lstm (imported there from here would be circular)


def forward_cm(x: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor], weights: list[torch.Tensor],
               hidden: int, readout: str, output_scale: float, skip_gain: float, save: bool = False,
               into: bool = False, scratch: torch.Tensor | None = None):
    """The stacked cell and readout coordinate-major, no graph recorded: ``x [N, F]``, states ``[N, H]``.

    A layer's gate pre-activations ``[N, 4H]`` are two products with the weights'
    transposes (inputs of any strides: BLAS reads transposed operands in place); on the
    2-core CPU these ran 1.7-2.1x faster than the same products feature-major (``[4H, N]``
    outputs with an inner dimension of 7-20), and the backward's 1.35x faster. The gates'
    elementwise work, bias included, is one compiled pass (:mod:`l2o.optim.lstm_kernel`)
    or eager operations; the readout is feature-major (its 1-2 output rows of N: as
    ``[N, 2]`` the product ran 3.5x slower). Without a graph, where the compiled kernel
    applies (:func:`kernel_applies`), :func:`forward_kernel` computes the same instead.

    ``save`` (:class:`FusedCell`): ``saved`` holds, per layer, the gate activations
    ``s [N, 4H]``, ``t = tanh(c') [N, H]`` and the (contiguous) ``c`` used, then the
    readout's ``[d; s]`` pre-activations ``[2, N]`` and ``exp(clamp(s))``. Otherwise
    ``into``: ``c`` is updated in place and ``h'`` written into ``h`` (contiguous, unshared
    tensors the caller owns), and ``scratch`` is an ``[N, 4H]`` work matrix reused across
    steps. Returns ``(update [N], new hidden states, new cell states, saved)``.
    """
    H = hidden
    x = x.contiguous()  # the features come as [N, F] views of [F, N] storage: products with them ran 1.9x slower
    inp, new_h, new_c, saved = x, [], [], []
    for i, (h, c) in enumerate(zip(hs, cs)):
        w, b = weights[2 * i], weights[2 * i + 1]
        k = inp.shape[1]
        pre = scratch if scratch is not None and not save else x.new_empty(x.shape[0], 4 * H)
        # the bias is added in the gate pass (addmm would first copy it into all N rows)
        torch.mm(inp, w[:, :k].t(), out=pre)
        pre.addmm_(h, w[:, k:].t())  # the last read of h: h' may go into its storage
        c = c if c.is_contiguous() or into else c.contiguous()
        fast = lstm_kernel.usable(pre, b, c)
        c_new = c if into else torch.empty_like(c)
        h_new = h if into else torch.empty_like(c)
        if fast and save:  # sigmoids into pre, c', tanh(c'), h'
            t = torch.empty_like(c)
            lstm_kernel.gates_forward(pre, b, c, c_new, t, h_new)
        elif fast:  # (states of other strides or dtypes) c' written over (a copy of) c
            lstm_kernel.gates_forward_cm(pre, b, c_new if into else c_new.copy_(c), h_new)
        else:
            s = pre.add_(b).sigmoid_()
            ig, fg, og, gg = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
            c_new = torch.mul(fg, c, out=c_new)
            c_new.addcmul_(ig, gg, value=2.0).sub_(ig)  # f c + i (2 q - 1)
            t = torch.mul(c_new, 2.0).sigmoid_().mul_(2.0).sub_(1.0)  # tanh(c') = 2 sigmoid(2 c') - 1
            torch.mul(og, t, out=h_new)
        if save:
            saved += [pre, t, c]
        new_h.append(h_new)
        new_c.append(c_new)
        inp = h_new
    update, extra = _readout(x, inp, weights[2 * len(hs):], readout, output_scale, skip_gain, save)
    return update, new_h, new_c, saved + extra


def _readout(x: torch.Tensor, h: torch.Tensor, rest: list[torch.Tensor], readout: str, output_scale: float,
             skip_gain: float, save: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The update ``[N]`` from the top hidden state (feature-major products: as ``[N, 2]`` they ran 3.5x
    slower) and, with ``save``, the ``dir_mag`` readout's ``[d; s]`` and ``exp(clamp(s))``."""
    if readout == "linear":
        return torch.addmm(rest[1][:, None], rest[0], h.t())[0] * output_scale, []
    ds = torch.addmm(rest[1][:, None], rest[0], h.t()).addmm_(rest[2], x.t(), alpha=skip_gain)
    e = torch.exp(ds[1].clamp(max=MAX_LOG_MAGNITUDE))
    return ds[0] * e * output_scale, ([ds, e] if save else [])


def kernel_applies(x: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor], weights: list[torch.Tensor],
                    readout: str) -> bool:
    """Whether the no-graph cell runs on the compiled one-pass layers (:func:`forward_kernel`).

    States of other strides are copied for it (the kernel reads contiguous rows)."""
    return (lstm_kernel.usable(*weights) and readout in ("dir_mag", "linear")
            and all(t.dtype == weights[0].dtype and t.device.type == "cpu" for t in (x, *hs, *cs)))


def forward_kernel(x: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor], weights: list[torch.Tensor],
                   readout: str, output_scale: float, skip_gain: float, into: bool):
    """:func:`forward_cm` without a graph on the compiled kernel: each layer's products and gates in one
    pass (:func:`l2o.optim.lstm_kernel.layer_forward_cm`: the ``[N, 4H]`` pre-activations never go
    through memory; 0.6-0.8x the time of the BLAS products and separate gate pass, which the path with
    a graph keeps: there its fresh saved outputs, not the products, set the time), the
    features read in place from their ``[F, N]`` storage. The same arithmetic as that path up to
    the order of the products' sums (float32 rounding)."""
    inp, new_h, new_c = x, [], []
    with torch.no_grad():
        for i, (h, c) in enumerate(zip(hs, cs)):
            c_new = c if into else c.clone(memory_format=torch.contiguous_format)
            h_new = h if into else torch.empty_like(c_new)
            lstm_kernel.layer_forward_cm(inp, h.contiguous(), weights[2 * i], weights[2 * i + 1], c_new, h_new)
            new_h.append(h_new)
            new_c.append(c_new)
            inp = h_new
        update, _ = _readout(x, inp, weights[2 * len(hs):], readout, output_scale, skip_gain, False)
    return update, new_h, new_c


class FusedCell(torch.autograd.Function):
    """``(update, h..., c...) = cell(x, h..., c..., weights...)`` as one autograd node.

    ``meta = (hidden, layers, readout, output_scale, skip_gain)``; ``x [N, F]``, states
    ``[N, hidden]`` (coordinate-major, any strides).
    """

    @staticmethod
    def forward(ctx, meta, x, *tensors):
        hidden, layers, readout, output_scale, skip_gain = meta
        hs, cs, weights = list(tensors[:layers]), list(tensors[layers:2 * layers]), list(tensors[2 * layers:])
        update, new_h, new_c, saved = forward_cm(x, hs, cs, weights, hidden, readout, output_scale, skip_gain,
                                                 save=True)
        ctx.meta, ctx.n_w = meta, len(weights)
        ctx.save_for_backward(x, *hs, *weights, *new_h, *saved)
        ctx.set_materialize_grads(False)
        return (update, *new_h, *new_c)

    @staticmethod
    def backward(ctx, du, *dstates):
        hidden, layers, readout, output_scale, skip_gain = ctx.meta
        saved, n_w = ctx.saved_tensors, ctx.n_w
        x, hs, weights = saved[0], saved[1:1 + layers], saved[1 + layers:1 + layers + n_w]
        new_h, acts = saved[1 + layers + n_w:1 + 2 * layers + n_w], saved[1 + 2 * layers + n_w:]
        if torch.is_grad_enabled():  # create_graph: differentiate the autograd-recorded cell instead
            cs = acts[2:3 * layers:3]  # the c of each layer's (s, t, c)
            return (None, *_graph_backward(ctx, [x, *hs, *cs, *weights], du, dstates))
        need = ctx.needs_input_grad[1:]  # [x, h..., c..., weights...]
        need_h, need_c, need_w = need[1:1 + layers], need[1 + layers:1 + 2 * layers], need[1 + 2 * layers:]
        dh_ext, dc_ext = dstates[:layers], dstates[layers:]
        H = hidden
        g_w: list[torch.Tensor | None] = [None] * n_w
        dx = None
        # readout (feature-major [n_out, N]): gradients of its weights, of x and of the top h
        rw = weights[2 * layers:]
        if du is None:
            dds = None
        elif readout == "linear":
            dds = (du * output_scale)[None]
        else:
            ds, e = acts[3 * layers], acts[3 * layers + 1]
            dd = du * e * output_scale
            dsv = torch.where(ds[1] <= MAX_LOG_MAGNITUDE, dd * ds[0], 0.0)
            dds = torch.stack([dd, dsv])
        if dds is not None:
            if need_w[2 * layers]:
                g_w[2 * layers] = dds @ new_h[-1]
            if need_w[2 * layers + 1]:
                g_w[2 * layers + 1] = dds.sum(1)
            if readout == "dir_mag":
                if need_w[2 * layers + 2]:
                    g_w[2 * layers + 2] = (dds @ x) * skip_gain
                if need[0]:
                    dx = (dds.t() @ rw[2]) * skip_gain
            dh = dds.t() @ rw[0]
            dh = dh if dh_ext[-1] is None else dh + dh_ext[-1]
        else:
            dh = dh_ext[-1]
        dh_prev: list[torch.Tensor | None] = [None] * layers
        dc_prev: list[torch.Tensor | None] = [None] * layers
        for i in reversed(range(layers)):
            s, t, c = acts[3 * i], acts[3 * i + 1], acts[3 * i + 2]
            inp = x if i == 0 else new_h[i - 1]
            dc = dc_ext[i]
            if dh is None and dc is None:  # nothing flows into this layer (nor below it from here)
                dh = dh_ext[i - 1] if i > 0 else None
                continue
            dpre = torch.empty_like(s)
            dh = None if dh is None else dh.contiguous()
            dc = None if dc is None else dc.contiguous()
            if lstm_kernel.usable(s, t, c):  # one compiled pass for the gates' backward
                dc_p = torch.empty_like(c)
                lstm_kernel.gates_backward(s, t, c, dh, dc, dpre, dc_p)
                dc_prev[i] = dc_p if need_c[i] else None
            else:
                ig, fg, og, qg = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
                if dh is not None:
                    torch.mul(dh, t, out=dpre[:, 2 * H:3 * H])  # d o
                    dct = (1.0 - t * t).mul_(og).mul_(dh)
                    dc = dct if dc is None else dct.add_(dc)
                else:
                    dpre[:, 2 * H:3 * H].zero_()
                torch.mul(dc, 2.0 * qg - 1.0, out=dpre[:, :H])  # d i
                torch.mul(dc, c, out=dpre[:, H:2 * H])  # d f
                torch.mul(dc, ig, out=dpre[:, 3 * H:]).mul_(2.0)  # d q
                dpre.mul_(s * (1.0 - s))
                if need_c[i]:
                    dc_prev[i] = dc * fg
            # products in the operand order measured fastest here (dpre^T inp as (inp^T dpre)^T:
            # 0.55 against 3.0 ms; dpre W_x as (W_x^T dpre^T)^T: 0.62 against 2.4 ms)
            k = inp.shape[1]
            if need_w[2 * i]:
                g_w[2 * i] = torch.cat([(inp.t() @ dpre).t(), (hs[i].t() @ dpre).t()], dim=1)
            if need_w[2 * i + 1]:
                g_w[2 * i + 1] = dpre.sum(0)
            w = weights[2 * i]
            # the gradient of this layer's input
            d_in = (w[:, :k].t() @ dpre.t()).t() if i > 0 or need[0] else None
            if need_h[i]:
                dh_prev[i] = dpre @ w[:, k:]
            if i > 0:
                dh = d_in if dh_ext[i - 1] is None else d_in + dh_ext[i - 1]
            elif d_in is not None:
                dx = d_in if dx is None else dx + d_in
        return (None, dx, *dh_prev, *dc_prev, *g_w)


def _graph_backward(ctx, ins, du, dstates):
    """The backward as a differentiable computation: re-run :func:`cell_core` under autograd on ``ins``."""
    from .lstm import cell_core

    hidden, layers, readout, output_scale, skip_gain = ctx.meta
    need = ctx.needs_input_grad[1:]
    with torch.enable_grad():
        leaves = [v.detach().requires_grad_() if not v.requires_grad else v for v in ins]
        x, hs, cs, ws = leaves[0], leaves[1:1 + layers], leaves[1 + layers:1 + 2 * layers], leaves[1 + 2 * layers:]
        update, new_h, new_c = cell_core(x, list(hs), list(cs), list(ws), hidden, readout, output_scale, skip_gain)
        outs = [update, *new_h, *new_c]
        pairs = [(o, g) for o, g in zip(outs, (du, *dstates)) if g is not None]
        wanted = [v for v, n in zip(leaves, need) if n]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True) if pairs and wanted else [None] * len(wanted)
    it = iter(grads)
    return [next(it) if n else None for n in need]
