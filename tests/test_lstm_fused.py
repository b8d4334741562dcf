"""The LSTM optimizer's one-node cell (hand-written backward) and its compiled gate kernel equal the recorded cell."""
from __future__ import annotations

import math

import pytest
import torch

import l2o
from l2o.hypergrad import segments
from l2o.optim import lstm_kernel
from l2o.optim.lstm import cell_core
from l2o.optim.lstm_fused import FusedCell

CONFIGS = [("dir_mag", 2, 7), ("linear", 1, 2), ("linear", 3, 1)]


def _inputs(readout, layers, feats, hidden=5, n=11, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()
    x, hs, cs, ws = r(feats, n), [r(hidden, n) for _ in range(layers)], [r(hidden, n) for _ in range(layers)], []
    for i in range(layers):
        ws += [r(4 * hidden, (feats if i == 0 else hidden) + hidden), r(4 * hidden)]
    n_out = 1 if readout == "linear" else 2
    ws += [r(n_out, hidden), r(n_out)]
    if readout == "dir_mag":
        ws.append(r(2, feats))
        with torch.no_grad():
            ws[-2][1] = 7.9  # some log-magnitudes above the clamp at 8: its zero gradient is exercised
    return (x, *hs, *cs, *ws)


def _fused(meta):
    return lambda *ins: FusedCell.apply(meta, *ins)


def _recorded(meta):
    hidden, layers, readout, scale, gain = meta

    def f(x, *t):
        u, nh, nc = cell_core(x.t(), [h.t() for h in t[:layers]], [c.t() for c in t[layers:2 * layers]],
                              list(t[2 * layers:]), hidden, readout, scale, gain)
        return (u, *[h.t() for h in nh], *[c.t() for c in nc])
    return f


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("readout,layers,feats", CONFIGS)
def test_fused_cell_equals_recorded_cell(readout, layers, feats, kernel):
    """Float64: outputs and vector-Jacobian products of every input, all outputs or the update alone."""
    meta = (5, layers, readout, 0.1, 1.7)
    ins = _inputs(readout, layers, feats)
    if kernel and lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    ctx = lstm_kernel.disabled() if not kernel else torch.enable_grad()
    with ctx:
        a, b = _fused(meta)(*ins), _recorded(meta)(*ins)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        gen = torch.Generator().manual_seed(1)
        cot = [torch.randn(o.shape, generator=gen) for o in a]
        for outs_a, outs_b, c in ((a, b, cot), (a[:1], b[:1], cot[:1]), (a[1:], b[1:], cot[1:])):
            ga = torch.autograd.grad(outs_a, ins, c, retain_graph=True, allow_unused=True)
            gb = torch.autograd.grad(outs_b, ins, c, retain_graph=True, allow_unused=True)
            for p, q in zip(ga, gb):
                assert (p is None) == (q is None)
                if q is not None:
                    torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("readout,layers,feats", CONFIGS[:2])
def test_fused_cell_gradcheck_and_second_order(readout, layers, feats):
    """Finite differences, and the differentiable backward (create_graph) used by second-order callers."""
    meta = (3, layers, readout, 0.1, 1.3)
    ins = _inputs(readout, layers, feats, hidden=3, n=4)
    assert torch.autograd.gradcheck(_fused(meta), ins)
    assert torch.autograd.gradgradcheck(_fused(meta), ins)


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradients_equal_the_recorded_cell(second_order):
    """Truncated meta-gradients of a rich/dir_mag LSTM on a small MLP: the one-node cell gives the old answer."""
    torch.manual_seed(0)
    opt = l2o.optim.LSTMOptimizer(hidden=6, inputs="rich", readout="dir_mag", init_scale=0.3)
    torch.nn.init.normal_(opt.skip.weight, std=0.3)
    task = l2o.tasks.base.ModuleTask(lambda: l2o.tasks.mlp.build_mlp(6, [5], 3, "sigmoid"),
                                     l2o.tasks.base.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]
    hp = dict(opt.named_parameters())

    def grads(recorded):
        opt.recorded_cell = recorded
        return [s.grads for s in segments(lambda q, h, t: task.loss(q, data[t]), None, params, hp, opt, 6, 3,
                                          second_order=second_order, meta_weights=[1.0] * 6)]
    new, old = grads(False), grads(True)
    opt.recorded_cell = False
    assert any(float(g.abs().max()) > 1e-4 for seg in old for g in seg.values())
    for a, b in zip(new, old):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-13, msg=k)


def test_compiled_step_equals_eager_in_float32():
    """The no-graph step with the compiled kernel (Cephes exp) against eager PyTorch, float32, 15 steps."""
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    torch.set_default_dtype(torch.float32)  # the autouse fixture restores float64
    torch.manual_seed(0)
    opt = l2o.optim.LSTMOptimizer(hidden=20, inputs="rich", readout="dir_mag", init_scale=0.3)
    torch.nn.init.normal_(opt.skip.weight, std=0.3)
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(40, 30, generator=gen), "b": torch.randn(30, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) * 10.0 ** -i for k, v in params.items()} for i in range(15)]

    def run():
        p, s = params, opt.init(params)
        with torch.no_grad():
            for g in grads:
                p, s = opt.step(p, g, s)
        return p, s
    fast = run()
    with lstm_kernel.disabled():
        eager = run()
    for k in params:
        assert float((fast[0][k] - params[k]).abs().max()) > 1e-2  # the optimizer moved
        torch.testing.assert_close(fast[0][k], eager[0][k], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast[1]["h"] + fast[1]["c"], eager[1]["h"] + eager[1]["c"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_propagates_nan_and_saturates():
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    pre = torch.tensor([float("nan"), 100.0, -100.0, 0.0], dtype=torch.float32).repeat_interleave(4)
    pre = pre.view(4, 4).t().contiguous()  # each gate row holds nan, 100, -100, 0
    c = torch.zeros(1, 4, dtype=torch.float32)
    c_new, t, h = torch.empty_like(c), torch.empty_like(c), torch.empty_like(c)
    cm_pre = pre.t().contiguous()  # the coordinate-major twin
    cm_c, cm_h = torch.zeros(4, 1, dtype=torch.float32), torch.empty(4, 1, dtype=torch.float32)
    zero_bias = torch.zeros(4, dtype=torch.float32)
    lstm_kernel.gates_forward(pre, zero_bias, c, c_new, t, h)
    assert torch.isnan(pre[:, 0]).all() and torch.isnan(h[0, 0])
    torch.testing.assert_close(pre[:, 1:], torch.tensor([1.0, 0.0, 0.5], dtype=torch.float32).expand(4, 3),
                               rtol=0, atol=1e-7)
    assert torch.isfinite(h[0, 1:]).all()
    lstm_kernel.gates_forward_cm(cm_pre, zero_bias, cm_c, cm_h)  # c updated in place
    assert torch.isnan(cm_h[0, 0]) and torch.isnan(cm_c[0, 0])
    torch.testing.assert_close(cm_c[1:, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float32), rtol=0, atol=1e-7)
    torch.testing.assert_close(cm_h[1:, 0], torch.tensor([math.tanh(1.0), 0.0, 0.0], dtype=torch.float32),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(cm_h[1:], h[:, 1:].t(), rtol=0, atol=1e-7)  # the two layouts agree


def test_without_a_compiler_the_step_warns_once_and_runs_eagerly(monkeypatch, tmp_path):
    monkeypatch.setattr(lstm_kernel, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("L2O_KERNEL_CACHE", str(tmp_path / "cache"))
    opt = l2o.optim.LSTMOptimizer(hidden=4)
    params = {"w": torch.randn(3, 2)}
    with pytest.warns(RuntimeWarning, match="compiled LSTM kernel is unavailable"):
        with torch.no_grad():
            new, state = opt.step(params, {"w": torch.randn(3, 2)}, opt.init(params))
    assert lstm_kernel.kernel() is None and torch.isfinite(new["w"]).all()
