"""The LSTM optimizer's one-node cell (hand-written backward) and its compiled gate kernel equal the recorded cell."""
from __future__ import annotations

import math

import pytest
import torch

import l2o
from l2o.hypergrad import segments
from l2o.optim import lstm_kernel, preprocess
from l2o.optim.lstm import cell_core
from l2o.optim.lstm_fused import FusedCell

CONFIGS = [("dir_mag", 2, 7), ("linear", 1, 2), ("linear", 3, 1)]


def _inputs(readout, layers, feats, hidden=5, n=11, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()
    # coordinate-major [n, features] / [n, hidden]; x as the features come, a view of [features, n] storage
    x = torch.randn(feats, n, generator=gen).t().requires_grad_()
    hs, cs, ws = [r(n, hidden) for _ in range(layers)], [r(n, hidden) for _ in range(layers)], []
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
        u, nh, nc = cell_core(x, list(t[:layers]), list(t[layers:2 * layers]), list(t[2 * layers:]), hidden,
                              readout, scale, gain)
        return (u, *nh, *nc)
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


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_compiled_rich_features_equal_eager(dtype, rtol):
    """The one-pass features (no graph) against the eager ones over 6 steps: zeros, both signs, below e^-p."""
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    gen = torch.Generator().manual_seed(0)
    base = torch.tensor([0.0, 1e-7, -1e-7, 4.5e-5, -4.6e-5, 1e-3, -2e-2, 3.0, -40.0], dtype=torch.float64)
    grads = [(base * torch.exp(torch.randn(9, generator=gen))).to(dtype) for _ in range(6)]

    def run():
        state, out = preprocess.rich_init(9, grads[0]), []
        with torch.no_grad():
            for g in grads:
                x, state = preprocess.rich(g, state)
                out.append(x)
        return out, state
    fast, s_fast = run()
    with lstm_kernel.disabled():
        eager, s_eager = run()
    for a, b in zip(fast, eager):
        assert a.shape == b.shape == (9, preprocess.N_RICH)
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    for k in ("m", "v", "t"):
        torch.testing.assert_close(s_fast[k], s_eager[k], rtol=rtol, atol=0)
    assert (fast[-1][:, 0] == -1).sum() >= 2  # the small-gradient branch of log/sign was taken


def test_kernel_propagates_nan_and_saturates():
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    f32 = {"dtype": torch.float32}
    # coordinate-major, H = 1: coordinate n's four gates are all nan, 100, -100, 0
    pre = torch.tensor([float("nan"), 100.0, -100.0, 0.0], **f32)[:, None].repeat(1, 4).contiguous()
    zero_bias, c = torch.zeros(4, **f32), torch.zeros(4, 1, **f32)
    c_new, t, h = torch.empty_like(c), torch.empty_like(c), torch.empty_like(c)
    saving = pre.clone()
    lstm_kernel.gates_forward(saving, zero_bias, c, c_new, t, h)  # with a graph: sigmoids into saving
    assert torch.isnan(saving[0]).all() and torch.isnan(h[0, 0])
    torch.testing.assert_close(saving[1:], torch.tensor([1.0, 0.0, 0.5], **f32)[:, None].expand(3, 4),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(c_new[1:, 0], torch.tensor([1.0, 0.0, 0.0], **f32), rtol=0, atol=1e-7)
    torch.testing.assert_close(h[1:, 0], torch.tensor([math.tanh(1.0), 0.0, 0.0], **f32), rtol=0, atol=1e-6)
    c2, h2 = torch.zeros(4, 1, **f32), torch.empty(4, 1, **f32)
    lstm_kernel.gates_forward_cm(pre, zero_bias, c2, h2)  # without a graph: c updated in place
    assert torch.isnan(c2[0, 0]) and torch.isnan(h2[0, 0])
    assert torch.equal(c2[1:], c_new[1:]) and torch.equal(h2[1:], h[1:])  # the two passes agree
    lstm_kernel.gates_forward_cm(pre, torch.full((4,), 200.0, **f32), c2, h2)  # the bias is added
    torch.testing.assert_close(c2[2:, 0], torch.tensor([1.0, 1.0], **f32), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("hidden,feats", [(20, 7), (3, 2), (25, 20), (1, 1)])
def test_one_pass_layer_equals_products_and_gate_pass(hidden, feats, dtype, tol):
    """A layer's products and gates in one compiled pass (the no-graph step) against BLAS products and
    the separate gate pass (the path with a graph): padded output blocks (4 x hidden not a multiple of
    the register block, or more than one block), features read from [F, N] storage, h written in place."""
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    gen = torch.Generator().manual_seed(hidden)
    n = 37

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x = r(feats, n, scale=2.0).t()  # [n, feats] view of [feats, n] storage, as the features come
    h, c = r(n, hidden), r(n, hidden, scale=3.0)
    w, b = r(4 * hidden, feats + hidden, scale=0.7), r(4 * hidden)
    pre = torch.mm(x, w[:, :feats].t()).addmm_(h, w[:, feats:].t())
    c_ref, h_ref = c.clone(), torch.empty_like(h)
    lstm_kernel.gates_forward_cm(pre, b, c_ref, h_ref)
    c_one, h_one = c.clone(), h.clone()
    lstm_kernel.layer_forward_cm(x, h_one, w, b, c_one, h_one)  # h' written over h
    torch.testing.assert_close(c_one, c_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h_one, h_ref, rtol=tol, atol=tol)
    c_two, h_two = c.clone(), torch.empty_like(h)
    lstm_kernel.layer_forward_cm(x.contiguous(), h, w, b, c_two, h_two)  # another output, contiguous input
    assert torch.equal(c_two, c_one) and torch.equal(h_two, h_one)


def test_one_pass_layer_follows_in_place_weight_updates():
    """The packed (transposed, padded) weights are reused between steps and rebuilt after an in-place update."""
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    gen = torch.Generator().manual_seed(0)
    x, h, c = torch.randn(9, 3, generator=gen), torch.randn(9, 4, generator=gen), torch.randn(9, 4, generator=gen)
    w, b = torch.randn(16, 7, generator=gen).requires_grad_(), torch.randn(16, generator=gen).requires_grad_()

    def both():
        c1, h1 = c.clone(), torch.empty_like(h)
        lstm_kernel.layer_forward_cm(x, h, w, b, c1, h1)
        c2, h2 = c.clone(), torch.empty_like(h)
        pre = torch.mm(x, w.detach()[:, :3].t()).addmm_(h, w.detach()[:, 3:].t())
        lstm_kernel.gates_forward_cm(pre, b.detach(), c2, h2)
        torch.testing.assert_close(h1, h2, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(c1, c2, rtol=1e-13, atol=1e-13)
        return h1
    first = both()
    with torch.no_grad():
        w.mul_(0.5)  # as an outer optimizer updates the LSTM's weights
    assert not torch.equal(both(), first)
    with torch.no_grad():
        b.add_(1.0)
    both()
    with pytest.raises(ValueError, match="LSTM kernel got inputs"):
        lstm_kernel.layer_forward_cm(x[:5], h, w, b, c.clone(), torch.empty_like(h))


def test_no_graph_step_equals_the_recorded_cell_with_states_of_other_strides():
    """Float64: the one-pass no-graph step (kernel) equals the eager one (BLAS products, eager gates), for
    both readouts, with states given as transposed views (copied for the kernel, never written)."""
    if lstm_kernel.kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is unavailable")
    for readout in ("dir_mag", "linear"):
        opt = l2o.optim.LSTMOptimizer(hidden=6, inputs="rich", readout=readout, init_scale=0.5)
        gen = torch.Generator().manual_seed(0)
        params = {"a": torch.randn(4, 5, generator=gen), "b": torch.randn(3, generator=gen)}
        n = 23
        state = opt.init(params)
        state = {**state, "h": [torch.randn(6, n, generator=gen).t() for _ in range(2)],
                 "c": [torch.randn(6, n, generator=gen).t() for _ in range(2)]}
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        before = [t.clone() for t in state["h"] + state["c"]]
        with torch.no_grad():
            fast, s_fast = opt.step(params, grads, state)
            assert all(torch.equal(a, b) for a, b in zip(state["h"] + state["c"], before))
            with lstm_kernel.disabled():
                ref, s_ref = opt.step(params, grads, state)
        for k in params:
            torch.testing.assert_close(fast[k], ref[k], rtol=1e-13, atol=1e-14)
        for a, b in zip(s_fast["h"] + s_fast["c"], s_ref["h"] + s_ref["c"]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


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
