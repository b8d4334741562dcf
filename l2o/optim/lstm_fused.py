"""The LSTM optimizer's cell with a graph: one autograd node per step, a hand-written backward.

:func:`l2o.optim.lstm.cell_core` records about fifteen small operations per layer and
step, each saving its inputs and each with its own backward kernel. :class:`FusedCell`
computes the same function feature-major (``[features, N]``, every gate a contiguous
block of rows, as the no-graph step does) and records one node whose backward is a few
matrix products and elementwise expressions per layer:

    s = sigmoid(W [x; h] + b) = [i, f, o, q],  g = 2 q - 1,  c' = f c + i g,
    t = tanh(c') = 2 sigmoid(2 c') - 1,        h' = o t
    dc = dc'_in + dh' o (1 - t^2),  dpre = s (1 - s) * [dc g, dc c, dh' t, 2 dc i]
    dW = dpre [x; h]^T,  db = sum_n dpre,  [dx; dh] = W^T dpre,  dc_prev = dc f

Asked for a differentiable backward (``create_graph=True``: second-order hypergradients,
forward mode's double-vjp), the backward instead re-runs :func:`cell_core` on the saved
inputs under autograd and differentiates that, so higher derivatives are exact too.
"""
from __future__ import annotations

import torch

from . import lstm_kernel

MAX_LOG_MAGNITUDE = 8.0  # mirrors l2o.optim.lstm (imported there from here would be circular)


def forward_fm(xT: torch.Tensor, hsT: list[torch.Tensor], csT: list[torch.Tensor], weights: list[torch.Tensor],
               hidden: int, readout: str, output_scale: float, skip_gain: float):
    """The stacked cell and readout feature-major: ``xT [F, N]``, states ``[H, N]``, no graph recorded.

    :class:`FusedCell`'s forward. Returns ``(update [N], new hT, new cT, saved)``; ``saved``
    holds, per layer, the gate activations ``s [4H, N]`` and ``t = tanh(c') [H, N]``, then
    the readout's ``[d; s]`` pre-activations and ``exp(clamp(s))``.
    """
    H = hidden
    new_h, new_c, saved = [], [], []
    inp = xT
    fast = lstm_kernel.usable(xT, *hsT, *csT)
    for i, (h, c) in enumerate(zip(hsT, csT)):
        w, b = weights[2 * i], weights[2 * i + 1]
        k = inp.shape[0]
        pre = xT.new_empty(4 * H, xT.shape[1])
        # the bias is added in the gate pass (addmm would first copy it into all N columns:
        # 14% of a meta-step in a profile)
        torch.mm(w[:, :k], inp, out=pre)
        pre.addmm_(w[:, k:], h)
        if fast and lstm_kernel.usable(xT, b):  # one compiled pass: sigmoids in place, c', tanh(c'), h'
            t = torch.empty_like(c)
            c_new, h_new = torch.empty_like(c), torch.empty_like(c)
            lstm_kernel.gates_forward(pre, b, c, c_new, t, h_new)
        else:
            pre.add_(b[:, None]).sigmoid_()
            ig, fg, og, gg = pre[:H], pre[H:2 * H], pre[2 * H:3 * H], pre[3 * H:]
            c_new = torch.mul(fg, c)
            c_new.addcmul_(ig, gg, value=2.0).sub_(ig)  # f c + i (2 q - 1)
            t = torch.mul(c_new, 2.0).sigmoid_().mul_(2.0).sub_(1.0)  # tanh(c') = 2 sigmoid(2 c') - 1
            h_new = torch.mul(og, t)
        saved += [pre, t]
        new_h.append(h_new)
        new_c.append(c_new)
        inp = h_new
    rest = weights[2 * len(hsT):]
    if readout == "linear":
        update = torch.addmm(rest[1][:, None], rest[0], inp)[0] * output_scale
    else:
        ds = torch.addmm(torch.addmm(rest[1][:, None], rest[0], inp), rest[2], xT, alpha=skip_gain)
        e = torch.exp(ds[1].clamp(max=MAX_LOG_MAGNITUDE))
        update = ds[0] * e * output_scale
        saved += [ds, e]
    return update, new_h, new_c, saved


def forward_cm(x: torch.Tensor, hs: list[torch.Tensor], cs: list[torch.Tensor], weights: list[torch.Tensor],
               hidden: int, readout: str, output_scale: float, skip_gain: float, into: bool = False,
               scratch: torch.Tensor | None = None):
    """The stacked cell and readout coordinate-major, without a graph: ``x [N, F]``, states ``[N, H]``.

    A layer's gate pre-activations ``[N, 4H]`` are two products with the weights'
    transposes (inputs of any strides: BLAS reads transposed operands in place); on the
    2-core CPU these ran 1.7-2.1x faster than the same products feature-major (``[4H, N]``
    outputs with an inner dimension of 7-20), and 77% of a step is products. The gates'
    elementwise work is one compiled pass (:func:`l2o.optim.lstm_kernel.gates_forward_cm`)
    or eager operations. ``into``: ``c`` is updated in place and ``h'`` written into ``h``
    (contiguous, unshared tensors the caller owns); otherwise new contiguous states.
    ``scratch``: an ``[N, 4H]`` work matrix reused across steps. Returns ``(update [N],
    new hidden states, new cell states)``.
    """
    H = hidden
    pre = scratch if scratch is not None else x.new_empty(x.shape[0], 4 * H)
    inp, new_h, new_c = x, [], []
    for i, (h, c) in enumerate(zip(hs, cs)):
        w, b = weights[2 * i], weights[2 * i + 1]
        k = inp.shape[1]
        # the bias is added in the gate pass (addmm would first copy it into all N rows)
        torch.mm(inp, w[:, :k].t(), out=pre)
        pre.addmm_(h, w[:, k:].t())  # the last read of h: h' may go into its storage
        c_new = c if into else torch.empty_like(c, memory_format=torch.contiguous_format).copy_(c)
        h_new = h if into else torch.empty_like(c_new)
        if lstm_kernel.usable(pre, b, c_new, h_new):
            lstm_kernel.gates_forward_cm(pre, b, c_new, h_new)
        else:
            s = pre.add_(b).sigmoid_()
            ig, fg, og, gg = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
            c_new.mul_(fg).addcmul_(ig, gg, value=2.0).sub_(ig)  # f c + i (2 q - 1)
            t = torch.mul(c_new, 2.0).sigmoid_().mul_(2.0).sub_(1.0)  # tanh(c') = 2 sigmoid(2 c') - 1
            torch.mul(og, t, out=h_new)
        new_h.append(h_new)
        new_c.append(c_new)
        inp = h_new
    # the readout feature-major: its outputs are 1-2 rows of N (as [N, 2] the product ran 3.5x slower)
    rest = weights[2 * len(hs):]
    if readout == "linear":
        return torch.addmm(rest[1][:, None], rest[0], inp.t())[0] * output_scale, new_h, new_c
    ds = torch.addmm(rest[1][:, None], rest[0], inp.t()).addmm_(rest[2], x.t(), alpha=skip_gain)
    return ds[0] * torch.exp(ds[1].clamp(max=MAX_LOG_MAGNITUDE)) * output_scale, new_h, new_c


class FusedCell(torch.autograd.Function):
    """``(update, hT..., cT...) = cell(xT, hT..., cT..., weights...)`` as one autograd node.

    ``meta = (hidden, layers, readout, output_scale, skip_gain)``; tensors feature-major.
    """

    @staticmethod
    def forward(ctx, meta, xT, *tensors):
        hidden, layers, readout, output_scale, skip_gain = meta
        hsT, csT, weights = list(tensors[:layers]), list(tensors[layers:2 * layers]), list(tensors[2 * layers:])
        update, new_h, new_c, saved = forward_fm(xT, hsT, csT, weights, hidden, readout, output_scale, skip_gain)
        ctx.meta = meta
        ctx.save_for_backward(xT, *tensors, *new_h, *new_c, *saved)
        ctx.set_materialize_grads(False)
        return (update, *new_h, *new_c)

    @staticmethod
    def backward(ctx, du, *dstates):
        hidden, layers, readout, output_scale, skip_gain = ctx.meta
        saved = ctx.saved_tensors
        n_w = len(saved) - 1 - 4 * layers - 2 * layers - (2 if readout == "dir_mag" else 0)
        xT, hsT, csT = saved[0], saved[1:1 + layers], saved[1 + layers:1 + 2 * layers]
        weights = saved[1 + 2 * layers:1 + 2 * layers + n_w]
        rest = saved[1 + 2 * layers + n_w:]
        new_h, new_c, acts = rest[:layers], rest[layers:2 * layers], rest[2 * layers:]
        if torch.is_grad_enabled():  # create_graph: differentiate the autograd-recorded cell instead
            return (None, *_graph_backward(ctx, xT, hsT, csT, weights, du, dstates))
        need = ctx.needs_input_grad[1:]  # [x, h..., c..., weights...]
        need_h, need_c, need_w = need[1:1 + layers], need[1 + layers:1 + 2 * layers], need[1 + 2 * layers:]
        dh_ext, dc_ext = dstates[:layers], dstates[layers:]
        H = hidden
        g_w: list[torch.Tensor | None] = [None] * n_w
        dx = None
        # readout: d update / d [d; s] -> gradients of the readout weights and of the top h
        rw = weights[2 * layers:]
        h_top = new_h[-1]
        if du is None:
            dds = None
        elif readout == "linear":
            dds = (du * output_scale)[None]
        else:
            ds, e = acts[2 * layers], acts[2 * layers + 1]
            dd = du * e * output_scale
            dsv = torch.where(ds[1] <= MAX_LOG_MAGNITUDE, dd * ds[0], 0.0)
            dds = torch.stack([dd, dsv])
        if dds is not None:
            if need_w[2 * layers]:
                g_w[2 * layers] = dds @ h_top.t()
            if need_w[2 * layers + 1]:
                g_w[2 * layers + 1] = dds.sum(1)
            if readout == "dir_mag":
                if need_w[2 * layers + 2]:
                    g_w[2 * layers + 2] = (dds @ xT.t()) * skip_gain
                if need[0]:
                    dx = (rw[2].t() @ dds) * skip_gain
            dh = rw[0].t() @ dds
            dh = dh if dh_ext[-1] is None else dh + dh_ext[-1]
        else:
            dh = dh_ext[-1]
        fast = lstm_kernel.usable(acts[0], acts[1], *csT)
        dh_prev: list[torch.Tensor | None] = [None] * layers
        dc_prev: list[torch.Tensor | None] = [None] * layers
        for i in reversed(range(layers)):
            s, t = acts[2 * i], acts[2 * i + 1]
            inp = xT if i == 0 else new_h[i - 1]
            dc = dc_ext[i]
            if dh is None and dc is None:  # nothing flows into this layer (nor below it from here)
                dh = dh_ext[i - 1] if i > 0 else None
                continue
            dpre = torch.empty_like(s)
            if fast:  # one compiled pass for the gates' backward
                dc_p = torch.empty_like(csT[i])
                lstm_kernel.gates_backward(s, t, csT[i], None if dh is None else dh.contiguous(),
                                           None if dc is None else dc.contiguous(), dpre, dc_p)
                dc_prev[i] = dc_p if need_c[i] else None
            else:
                ig, fg, og, qg = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
                if dh is not None:
                    torch.mul(dh, t, out=dpre[2 * H:3 * H])  # d o
                    dct = (1.0 - t * t).mul_(og).mul_(dh)
                    dc = dct if dc is None else dct.add_(dc)
                else:
                    dpre[2 * H:3 * H].zero_()
                torch.mul(dc, 2.0 * qg - 1.0, out=dpre[:H])  # d i
                torch.mul(dc, csT[i], out=dpre[H:2 * H])  # d f
                torch.mul(dc, ig, out=dpre[3 * H:]).mul_(2.0)  # d q
                dpre.mul_(s * (1.0 - s))
                if need_c[i]:
                    dc_prev[i] = dc * fg
            k = inp.shape[0]
            if need_w[2 * i]:
                g_w[2 * i] = torch.cat([dpre @ inp.t(), dpre @ hsT[i].t()], dim=1)
            if need_w[2 * i + 1]:
                g_w[2 * i + 1] = dpre.sum(1)
            w = weights[2 * i]
            below = i > 0 or need[0]  # the gradient of this layer's input is wanted
            if below and need_h[i]:  # one product for both: rows [:k] and [k:] are contiguous blocks
                both = w.t() @ dpre
                d_in, dh_prev[i] = both[:k], both[k:]
            else:
                d_in = w[:, :k].t() @ dpre if below else None
                if need_h[i]:
                    dh_prev[i] = w[:, k:].t() @ dpre
            if i > 0:
                dh = d_in if dh_ext[i - 1] is None else d_in + dh_ext[i - 1]
            elif d_in is not None:
                dx = d_in if dx is None else dx + d_in
        return (None, dx, *dh_prev, *dc_prev, *g_w)


def _graph_backward(ctx, xT, hsT, csT, weights, du, dstates):
    """The backward as a differentiable computation: re-run :func:`cell_core` under autograd."""
    from .lstm import cell_core

    hidden, layers, readout, output_scale, skip_gain = ctx.meta
    ins = [xT, *hsT, *csT, *weights]
    need = ctx.needs_input_grad[1:]
    with torch.enable_grad():
        leaves = [v.detach().requires_grad_() if not v.requires_grad else v for v in ins]
        x, hs, cs, ws = leaves[0], leaves[1:1 + layers], leaves[1 + layers:1 + 2 * layers], leaves[1 + 2 * layers:]
        update, new_h, new_c = cell_core(x.t(), [h.t() for h in hs], [c.t() for c in cs], list(ws), hidden,
                                         readout, output_scale, skip_gain)
        outs = [update] + [h.t() for h in new_h] + [c.t() for c in new_c]
        pairs = [(o, g) for o, g in zip(outs, (du, *dstates)) if g is not None]
        wanted = [v for v, n in zip(leaves, need) if n]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True) if pairs and wanted else [None] * len(wanted)
    it = iter(grads)
    return [next(it) if n else None for n in need]
