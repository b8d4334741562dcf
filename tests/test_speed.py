"""The fast paths compute what the differentiable ones do: fused LSTM step, foreach optimizers, checks, caches."""
from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import math
import os

import pytest
import torch

import l2o
from l2o.hypergrad.unroll import all_finite, own, unroll
from l2o.optim import lstm_kernel
from l2o.optim.lstm import MAX_LOG_MAGNITUDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "checkpoints", "*.pt")))
implicit_mod = importlib.import_module("l2o.hypergrad.implicit")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(n_shapes=((7, 5), (5,), (3, 7), ()), seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(n_shapes)}
    grads = [{k: torch.randn(v.shape, generator=gen) * 10.0 ** float(torch.randint(-6, 1, (), generator=gen))
              for k, v in params.items()} for _ in range(6)]
    return params, grads


def _run(opt, params, grads, graph: bool):
    """Chain ``len(grads)`` steps with (graph) or without autograd recording; params after each step."""
    state, traj = opt.init(params), []
    with torch.set_grad_enabled(graph):
        for g in grads:
            params, state = opt.step(params, g, state)
            traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj, state


def _assert_same(a, b, rtol, atol):
    for t, (pa, pb) in enumerate(zip(a, b)):
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=atol, msg=f"step {t}, {k}")


# ----------------------------------------------------------------------------- the LSTM step
@pytest.mark.parametrize("inputs,readout,layers", [("paper", "linear", 2), ("plain", "linear", 1),
                                                   ("rich", "dir_mag", 2), ("rich", "linear", 3)])
@pytest.mark.parametrize("kernel", [True, False], ids=["compiled_gates", "eager_gates"])
def test_fused_lstm_step_equals_graph_step(inputs, readout, layers, kernel):
    torch.manual_seed(0)
    opt = l2o.optim.LSTMOptimizer(hidden=6, layers=layers, inputs=inputs, readout=readout, init_scale=0.3)
    if readout == "dir_mag":
        torch.nn.init.normal_(opt.skip.weight, std=0.5)
    params, grads = _problem()
    with contextlib.nullcontext() if kernel else lstm_kernel.disabled():
        fused, s_fused = _run(opt, params, grads, graph=False)
    graph, s_graph = _run(opt, params, grads, graph=True)
    moved = max(float((fused[-1][k] - params[k]).abs().max()) for k in params)
    assert moved > 1e-3  # the updates are not near zero, so agreeing means something
    _assert_same(fused, graph, rtol=1e-12, atol=1e-14)  # float64: the same arithmetic
    for a, b in zip(s_fused["h"] + s_fused["c"], s_graph["h"] + s_graph["c"]):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def _reference_step(opt, params, grads, state):
    """The LSTM step as first written (coordinate-major, torch.tanh): the eager reference."""
    keys = list(params)
    g = torch.cat([grads[k].reshape(-1) for k in keys])
    x, feat = opt._features(g, state)
    x = x.contiguous()
    feats, H, hs, cs = x, opt.hidden, [], []
    for i, lin in enumerate(opt.cells):
        s = torch.sigmoid(torch.addmm(lin.bias, torch.cat([x, state["h"][i]], dim=1), lin.weight.t()))
        ig, fg, og, gg = s.split(H, dim=1)
        c = torch.addcmul(fg * state["c"][i], ig, 2.0 * gg - 1.0)
        x = og * torch.tanh(c)
        hs.append(x)
        cs.append(c)
    if opt.readout == "linear":
        update = opt.out(x).squeeze(1) * opt.output_scale
    else:
        ds = opt.out(x) + opt.skip_gain * opt.skip(feats)
        update = ds[:, 0] * torch.exp(ds[:, 1].clamp(max=MAX_LOG_MAGNITUDE)) * opt.output_scale
    new, off = {}, 0
    for k in keys:
        new[k] = params[k] + update[off:off + params[k].numel()].view_as(params[k])
        off += params[k].numel()
    out = {"step": state["step"] + 1, "h": hs, "c": cs}
    if feat is not None:
        out["feat"] = feat
    return new, out


@pytest.mark.skipif(not SHIPPED, reason="no shipped checkpoints in this checkout")
@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_shipped_checkpoints_train_as_before(path):
    """Float32, as shipped: a 30-step run of an MLP gives the losses of the original eager step."""
    torch.set_default_dtype(torch.float32)  # the autouse fixture restores float64
    opt = l2o.load_optimizer(path)
    while not isinstance(opt, l2o.optim.LSTMOptimizer):  # the wrappers' own rules: test_adaptive_scale.py, test_sum.py
        opt = opt.parts[0] if isinstance(opt, l2o.optim.Sum) else opt.base
    task = l2o.tasks.base.ModuleTask(lambda: l2o.tasks.mlp.build_mlp(14 * 14, [10], 10, "sigmoid"),
                                     l2o.tasks.base.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    x = torch.rand(64, 14 * 14, generator=gen)
    y = (x @ torch.randn(14 * 14, 10, generator=gen)).argmax(1)  # learnable labels

    def losses(step_fn, graph):
        p, state, out = params, opt.init(params), []
        state = {**state, "h": [h.contiguous() for h in state["h"]], "c": [c.contiguous() for c in state["c"]]}
        for _ in range(30):
            q = {k: v.detach().requires_grad_() for k, v in p.items()}
            loss = task.loss(q, (x, y))
            g = dict(zip(q, torch.autograd.grad(loss, list(q.values()))))
            out.append(float(loss.detach()))
            with torch.set_grad_enabled(graph):
                p, state = step_fn(q if graph else {k: v.detach() for k, v in q.items()}, g, state)
        return torch.tensor(out)

    ref = losses(lambda p, g, s: _reference_step(opt, p, g, s), graph=False)
    assert float(ref[-1]) < float(ref[0]) - 0.05  # the optimizer trains: the comparison is not vacuous
    torch.testing.assert_close(losses(opt.step, graph=False), ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(losses(opt.step, graph=True), ref, rtol=2e-5, atol=0)


@pytest.mark.slow
def test_compiled_lstm_step_equals_eager():
    torch.set_default_dtype(torch.float32)
    opt = l2o.load_optimizer(SHIPPED[0]) if SHIPPED else l2o.optim.LSTMOptimizer(inputs="rich", readout="dir_mag")
    params, grads = _problem()
    params = {k: v.float() for k, v in params.items()}
    grads = [{k: v.float() for k, v in g.items()} for g in grads]
    eager, _ = _run(opt, params, grads, graph=False)
    compiled, _ = _run(opt.use_compiled(), params, grads, graph=False)
    _assert_same(compiled, eager, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- hand-designed optimizers
TWINS = {
    "sgd": lambda s: l2o.optim.SGD(lr=0.05),
    "momentum": lambda s: l2o.optim.Momentum(lr=0.05, momentum=0.8),
    "nesterov": lambda s: l2o.optim.Momentum(lr=0.05, momentum=0.8, nesterov=True),
    "inv_decay": lambda s: l2o.optim.MomentumInvDecay(lr=0.05, momentum=0.8, decay=0.5, T0=3.0),
    "adam": lambda s: l2o.optim.Adam(lr=0.02, beta1=0.8, beta2=0.95),
    "rmsprop": lambda s: l2o.optim.RMSprop(lr=0.01, alpha=0.9),
    "wd_scalar": lambda s: l2o.optim.WeightDecay(l2o.optim.Adam(lr=0.02), 0.3),
    "wd_per_weight": lambda s: l2o.optim.WeightDecay(l2o.optim.Momentum(lr=0.05), 0.3, shapes=s),
    "given_tensor_lr": lambda s: l2o.optim.SGD(lr=torch.tensor(0.05, requires_grad=True)),
    "per_key_lr": lambda s: l2o.optim.SGD(lr={k: torch.full(v, 0.05) for k, v in s.items()}),
}


@pytest.mark.parametrize("name", list(TWINS))
def test_no_graph_optimizer_follows_its_graph_twin(name):
    params, grads = _problem()
    opt = TWINS[name]({k: list(v.shape) for k, v in params.items()})
    fast, _ = _run(opt, params, grads, graph=False)
    slow, _ = _run(opt, params, grads, graph=True)
    assert max(float((fast[-1][k] - params[k]).abs().max()) for k in params) > 1e-3
    _assert_same(fast, slow, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(TWINS))
def test_in_place_step_equals_the_out_of_place_one(name):
    params, grads = _problem()
    opt = TWINS[name]({k: list(v.shape) for k, v in params.items()})
    fast, state_out = _run(opt, params, grads, graph=False)
    p, state = own(params), own(opt.init(params))
    with torch.no_grad():
        for t, g in enumerate(grads):
            storage = {k: v.data_ptr() for k, v in p.items()}
            p, state = opt.step_(p, g, state)
            for k in p:  # bitwise: the same kernels, into other memory
                assert torch.equal(p[k], fast[t][k]), (t, k)
            if name != "per_key_lr":  # a per-weight rate has no fused path: step_ is step
                assert all(p[k].data_ptr() == storage[k] for k in p), "step_ did not update in place"
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(state_out)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled_gates", "eager_gates"])
def test_lstm_in_place_step_equals_the_out_of_place_one(kernel):
    opt = l2o.load_optimizer(SHIPPED[0]) if SHIPPED else l2o.optim.LSTMOptimizer(inputs="rich", readout="dir_mag")
    params, grads = _problem()
    with contextlib.nullcontext() if kernel else lstm_kernel.disabled():
        fast, _ = _run(opt, params, grads, graph=False)
        p, state = own(params), opt.init(params)
        with torch.no_grad():
            for t, g in enumerate(grads):
                storage = [v.data_ptr() for v in [*p.values(), *state["h"], *state["c"]]]
                p, state = opt.step_(p, g, state)
                assert [v.data_ptr() for v in [*p.values(), *state["h"], *state["c"]]] == storage
                for k in p:
                    assert torch.equal(p[k], fast[t][k]), (t, k)
        n = sum(v.numel() for v in params.values())
        zero = params["p0"].new_zeros(opt.hidden, n).t()
        shared = {**opt.init(params), "h": [zero] * opt.layers, "c": [zero] * opt.layers}  # one tensor for all
        with torch.no_grad():
            out, new = opt.step_(own(params), grads[0], shared)  # falls back to the out-of-place step
    assert not zero.any() and torch.equal(out["p0"], fast[0]["p0"])


@pytest.mark.parametrize("make", [lambda: l2o.optim.Adam(lr=0.02), lambda: l2o.optim.Momentum(lr=0.05, nesterov=True),
                                  lambda: l2o.optim.AdaptiveScale(l2o.optim.Adam(lr=0.02), beta=0.3),
                                  lambda: l2o.optim.LSTMOptimizer(inputs="rich", readout="dir_mag")],
                         ids=["adam", "nesterov", "adaptive_adam", "lstm"])
def test_unroll_without_graph_never_writes_the_callers_tensors(make):
    gen = torch.Generator().manual_seed(3)
    target = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}

    def loss(p, h, t):
        return ((p["w"] - target["w"]) ** 2).sum() + (1 + 0.1 * t) * ((p["b"] - target["b"]) ** 2).sum()
    opt = make()
    params = {k: torch.randn(v.shape, generator=gen) for k, v in target.items()}
    state = opt.init(params)
    kept = own((params, state))
    fast = unroll(loss, params, {}, opt, 7, state=state, graph=False)  # in place on its own copies
    slow = unroll(loss, params, {}, opt, 7, state=state, graph=False, callback=lambda t, p, v: None)
    for a, b in zip(torch.utils._pytree.tree_leaves((params, state)), torch.utils._pytree.tree_leaves(kept)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert fast.losses == slow.losses and fast.losses[-1] != fast.losses[0]  # it moved (an untrained LSTM may climb)
    for k in params:
        assert torch.equal(fast.params[k], slow.params[k]) and not fast.params[k].requires_grad
    again = unroll(loss, fast.params, {}, opt, 3, state=fast.state, start=7, graph=False)  # continuing from a result
    ref = unroll(loss, slow.params, {}, opt, 3, state=slow.state, start=7, graph=False, callback=lambda t, p, v: None)
    assert again.losses == ref.losses and torch.equal(fast.params["w"], slow.params["w"])


def test_cached_decay_follows_in_place_updates():
    params, grads = _problem()
    opt = l2o.optim.WeightDecay(l2o.optim.SGD(lr=0.1), 0.3, shapes={k: list(v.shape) for k, v in params.items()})
    before, _ = _run(opt, params, grads[:1], graph=False)
    with torch.no_grad():
        for raw in opt.raw_weight_decay.values():
            raw.add_(1.0)  # what an outer optimizer does
    after, _ = _run(opt, params, grads[:1], graph=False)
    twin, _ = _run(opt, params, grads[:1], graph=True)
    _assert_same(after, twin, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(before[0]["p0"], after[0]["p0"])


def test_penalty_derivatives_match_plain_formula():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=gen, requires_grad=True)
    raw = torch.randn(4, 3, generator=gen, requires_grad=True)
    opt = l2o.optim.WeightDecay(l2o.optim.SGD(), {"w": torch.nn.functional.softplus(raw)})
    ours = lambda q: opt.penalty({"w": q})  # noqa: E731
    plain = lambda q: 0.5 * (torch.nn.functional.softplus(raw) * q * q).sum()  # noqa: E731
    torch.testing.assert_close(ours(p), plain(p), rtol=1e-14, atol=0)
    g1 = torch.autograd.grad(ours(p), p, create_graph=True)[0]
    g2 = torch.autograd.grad(plain(p), p, create_graph=True)[0]
    v = torch.randn(4, 3, generator=gen)
    for a, b in zip(torch.autograd.grad((g1 * v).sum(), [p, raw]), torch.autograd.grad((g2 * v).sum(), [p, raw])):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)  # Hessian- and mixed-vector products
    assert torch.autograd.gradcheck(lambda q, d: l2o.optim.penalty._Penalty.apply(q, d),
                                    (p, torch.rand(4, 3, generator=gen, requires_grad=True)))
    assert torch.autograd.gradgradcheck(lambda q, d: l2o.optim.penalty._Penalty.apply(q, d),
                                        (p, torch.rand((), generator=gen, requires_grad=True)))


# ----------------------------------------------------------------------------- unroll and implicit
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_sees_every_non_finite_value(bad):
    big = torch.full((5,), 3e38, dtype=torch.float32)  # finite, though its square or sum overflows
    assert all_finite([torch.ones(3), big, torch.ones(0)]) and all_finite([])
    t = torch.ones(2, 3)
    t[1, 2] = bad
    assert not all_finite([torch.ones(3), t])


def test_unroll_stops_at_a_non_finite_gradient():
    def loss(p, h, t):
        return (p["a"] ** 2).sum() + (p["b"] * (math.inf if t == 2 else 1.0)).sum()
    res = unroll(loss, {"a": torch.ones(2), "b": torch.zeros(3)}, {}, l2o.optim.SGD(lr=0.1), 5, graph=False)
    assert not res.finite and len(res.losses) == 3


def test_default_neumann_step_estimated_once_per_inner_problem(monkeypatch):
    calls = []
    real = implicit_mod.largest_eigenvalue
    monkeypatch.setattr(implicit_mod, "largest_eigenvalue", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 4, generator=gen), torch.randn(20, generator=gen)
    wd = torch.tensor(0.3, requires_grad=True)
    params = {"w": torch.randn(4, generator=gen)}

    def make_inner():
        return lambda p, h, t: ((X @ p["w"] - y) ** 2).mean() + h["wd"] * (p["w"] ** 2).sum()

    outer = lambda p, h: ((X @ p["w"] - y - 1) ** 2).mean()  # noqa: E731
    inner = make_inner()
    g1 = implicit_mod.implicit(inner, outer, params, {"wd": wd}, method="neumann", iters=3)
    g2 = implicit_mod.implicit(inner, outer, params, {"wd": wd}, method="neumann", iters=3)
    assert len(calls) == 1 and torch.equal(g1["wd"], g2["wd"])
    implicit_mod.implicit(make_inner(), outer, params, {"wd": wd}, method="neumann", iters=3)
    assert len(calls) == 2  # a new inner problem gets its own estimate
    alpha = implicit_mod._ALPHAS[inner][1]
    g3 = implicit_mod.implicit(inner, outer, params, {"wd": wd}, method="neumann", iters=3, alpha=alpha)
    torch.testing.assert_close(g3["wd"], g1["wd"], rtol=0, atol=0)


def test_module_task_call_is_pure_and_falls_back_with_buffers():
    task = l2o.tasks.base.ModuleTask(lambda: torch.nn.Sequential(torch.nn.Linear(3, 2)),
                                     lambda out, y: ((out - y) ** 2).mean())
    before = {k: v.clone() for k, v in task.module.state_dict().items()}
    params = task.init(torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):  # a failing call leaves the template as it was
        task.loss(params, (torch.randn(4, 5), torch.randn(4, 2)))
    task.loss(params, (torch.randn(4, 3), torch.randn(4, 2)))
    assert all(torch.equal(v, before[k]) and type(dict(task.module.named_parameters())[k]) is torch.nn.Parameter
               for k, v in task.module.state_dict().items())
    bn = l2o.tasks.base.ModuleTask(lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)),
                                   lambda out, y: ((out - y) ** 2).mean())
    assert bn._slots is None and task._slots is not None
    p = bn.init(torch.Generator().manual_seed(0))
    ref = torch.func.functional_call(bn.module, p, (torch.ones(4, 3),))
    torch.testing.assert_close(bn.forward(p, torch.ones(4, 3)), ref)


# ----------------------------------------------------------------------------- CUDA
@cuda
def test_cuda_unroll_and_lstm_step():
    torch.set_default_dtype(torch.float32)
    params, grads = _problem()
    dev = {k: v.float().cuda() for k, v in params.items()}
    grads = [{k: v.float().cuda() for k, v in g.items()} for g in grads]
    opt = l2o.optim.LSTMOptimizer(hidden=8, inputs="rich", readout="dir_mag", init_scale=0.3).cuda()
    fused, _ = _run(opt, dev, grads, graph=False)
    graph, _ = _run(opt, dev, grads, graph=True)
    assert fused[-1]["p0"].is_cuda
    _assert_same(fused, graph, rtol=1e-4, atol=1e-6)
    target = torch.randn(7, 5, device="cuda")
    res = unroll(lambda p, h, t: ((p["p0"] - target) ** 2).sum(), dev, {}, l2o.optim.Adam(lr=0.1).cuda(), 30,
                 graph=False)
    assert res.finite and res.params["p0"].is_cuda and res.losses[-1] < 0.5 * res.losses[0]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cuda
def test_cuda_meta_train_smoke(tmp_path):
    code = _script("meta_train").main(["--task", "quadratic", "--device", "cuda", "--lstm-hidden", "6",
                                       "--horizon", "8", "--truncation", "4", "--meta-steps", "2",
                                       "--val-every", "1", "--val-seeds", "2", "--log-dir", str(tmp_path / "runs"),
                                       "--checkpoint", str(tmp_path / "ck.pt"), "--no-progress"])
    assert code == 0 and os.path.exists(tmp_path / "ck.pt")


@cuda
def test_cuda_meta_eval_smoke(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path / "cache"))
    ck = tmp_path / "lstm.pt"
    l2o.checkpoint.save(str(ck), {"optimizer": l2o.checkpoint.optimizer_payload(l2o.optim.LSTMOptimizer(hidden=4)),
                                  "best": None, "config": {}, "meta_step": 0})
    code = _script("meta_eval").main(["--checkpoint", str(ck), "--tasks", "mnist_mlp", "--steps", "3", "--seeds", "2",
                                      "--tuning-seeds", "1", "--baselines", "sgd", "--grid", "0.1,1,2",
                                      "--test-points", "1", "--data-dir", tiny_data, "--out", str(tmp_path / "out"),
                                      "--device", "cuda", "--no-progress"])
    assert code == 0
