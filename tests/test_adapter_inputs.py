"""``l2o.LearnedOptimizer`` and ``l2o.load_optimizer`` on what users give them: shipped names,
foreign or mismatched optimizer states, half-precision models, bad options and arguments."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import l2o
from l2o import checkpoint, optim


def _net(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, 6, generator=gen).to(next(net.parameters()).dtype)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x).float(), y).backward()
        opt.step()


def _saved(opt: torch.optim.Optimizer) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_shipped_names_work_as_in_load_optimizer():
    net_a, net_b = _net(), _net()
    by_name = l2o.LearnedOptimizer(net_a.parameters(), "lstm_generalist")
    by_path = l2o.LearnedOptimizer(net_b.parameters(), checkpoint.shipped_path("lstm_generalist"))
    assert by_path.functional.config() == by_name.functional.config()
    _train(net_a, by_name, 3)
    _train(net_b, by_path, 3)
    assert all(torch.equal(a, b) for a, b in zip(net_a.parameters(), net_b.parameters()))
    with pytest.raises(ValueError, match=r"unknown optimizer 'lstm_nope'.*shipped checkpoint \(.*lstm_mnist"):
        l2o.LearnedOptimizer(_net().parameters(), "lstm_nope")
    with pytest.raises(ValueError, match="which must be one of"):
        l2o.LearnedOptimizer(_net().parameters(), "lstm_mnist", which="last")


@pytest.mark.parametrize("saved_with, loaded_into", [
    ("adam", "lstm_mnist"), ("lstm_mnist", "adam"), ("lstm_mnist", "lstm_generalist"), ("sgd", "momentum")])
def test_a_state_of_another_optimizer_is_refused_and_nothing_changes(saved_with, loaded_into):
    net = _net()
    src = l2o.LearnedOptimizer(net.parameters(), saved_with)
    _train(net, src, 2)
    dst_net = _net()
    dst = l2o.LearnedOptimizer(dst_net.parameters(), loaded_into)
    _train(dst_net, dst, 2)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match="does not fit this optimizer"):
        dst.load_state_dict(_saved(src))
    after = dst.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        got = after["state"][i]["l2o"]
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(got),
                                                      torch.utils._pytree.tree_leaves(st["l2o"]))
                   if isinstance(a, torch.Tensor))
    _train(dst_net, dst, 1)  # and it still steps


def test_an_lstm_state_for_other_shapes_is_refused_not_read_past_its_end():
    """Loading the state of a 4-coordinate parameter into a 5-coordinate one used to let the
    compiled LSTM kernels run past the state's end (heap corruption) at the next step."""
    small, big = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(5))
    src = l2o.LearnedOptimizer([small], "lstm_mnist")
    small.grad = torch.randn(4)
    src.step()
    dst = l2o.LearnedOptimizer([big], "lstm_mnist")
    with pytest.raises(ValueError, match=r"h\[0\] has shape \(4, 20\), this optimizer's has \(5, 20\)"):
        dst.load_state_dict(_saved(src))
    # the functional protocol refuses it too
    opt = l2o.load_optimizer("lstm_mnist")
    state = opt.init({"w": torch.zeros(4)})
    for step in (opt.step, opt.step_):
        with torch.no_grad(), pytest.raises(ValueError, match="state holds 4 coordinates but the parameters have 5"):
            step({"w": torch.zeros(5)}, {"w": torch.randn(5)}, state)


def test_torch_optim_state_is_refused():
    p = nn.Parameter(torch.randn(3))
    theirs = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    theirs.step()
    ours = l2o.LearnedOptimizer([p], "adam")
    with pytest.raises(ValueError, match="not saved by l2o.LearnedOptimizer"):
        ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("name", ["adam", "lstm_mnist", "lstm_generalist"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_steps_in_float32_and_resumes_exactly(name, dtype):
    """In bfloat16 Adam's beta2 = 0.999 rounds to 1 and every step was NaN; the step now runs
    in float32 on a float32 state, rounded once into the parameter."""
    net = _net(dtype)
    ref = _net(torch.float32)
    opt = l2o.LearnedOptimizer(net.parameters(), name)
    ref_opt = l2o.LearnedOptimizer(ref.parameters(), name)
    _train(net, opt, 6)
    _train(ref, ref_opt, 6)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    leaf = next(t for t in torch.utils._pytree.tree_leaves(next(iter(opt.state.values()))["l2o"])
                if isinstance(t, torch.Tensor))
    assert leaf.dtype == torch.float32
    # close to the float32 run (each step's parameter is rounded to 8 or 11 bits)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(_net(torch.float32).parameters(), ref.parameters()))
        gap = max(float((p.float() - q).abs().max()) for p, q in zip(net.parameters(), ref.parameters()))
    assert moved > 1e-3 and gap < 0.2 * moved + 2e-2

    # save / load: continuing equals continuing without the round trip, bit for bit
    straight = copy.deepcopy(net)
    straight_opt = l2o.LearnedOptimizer(straight.parameters(), name)
    straight_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    saved = _saved(opt)
    resumed = copy.deepcopy(net)
    resumed_opt = l2o.LearnedOptimizer(resumed.parameters(), name)
    resumed_opt.load_state_dict(saved)
    _train(straight, straight_opt, 3, start=6)
    _train(resumed, resumed_opt, 3, start=6)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    _train(net, opt, 3, start=6)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), net.parameters()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "0.1", True, None])
def test_bad_scale_is_refused(bad):
    params = list(_net().parameters())
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        l2o.LearnedOptimizer(params, "sgd", scale=bad)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        l2o.LearnedOptimizer([{"params": params, "scale": bad}], "sgd")
    opt = l2o.LearnedOptimizer(params[:2], "sgd")
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        opt.add_param_group({"params": params[2:], "scale": bad})
    assert len(opt.param_groups) == 1


def test_load_optimizer_argument_errors(tmp_path):
    for bad in (None, 3, b"lstm_mnist.pt"):
        with pytest.raises(TypeError, match="a checkpoint path must be a str or os.PathLike"):
            l2o.load_optimizer(bad)
    # a bad device is named as such, not blamed on the (intact) file
    with pytest.raises(ValueError, match="map_location must be a device"):
        l2o.load_optimizer("lstm_mnist", map_location="cpux")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA, which is not available"):
            l2o.load_optimizer("lstm_mnist", map_location="cuda")
    with pytest.raises(checkpoint.CheckpointError, match="is a folder"):
        l2o.load_optimizer(str(tmp_path))
    assert isinstance(l2o.load_optimizer("lstm_mnist", map_location=torch.device("cpu")), optim.LSTMOptimizer)


def test_loading_an_optimizer_leaves_the_global_rng_alone():
    """Building the saved module drew its throw-away random weights from the global RNG, so a
    script's minibatches and dropout masks changed with the optimizer it loaded."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    for load in (lambda: l2o.load_optimizer("lstm_mnist"),
                 lambda: l2o.LearnedOptimizer([nn.Parameter(torch.zeros(2))], "lstm_generalist")):
        torch.manual_seed(0)
        load()
        assert torch.equal(torch.rand(3), expected)


def test_complex_parameters_are_refused():
    """Adam's ``g * g`` on a complex gradient is not ``|g|^2``: the step was silently wrong."""
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="steps real parameters, got one of dtype torch.complex64"):
        l2o.LearnedOptimizer([z], "adam")
    with pytest.raises(ValueError, match="steps real parameters"):
        l2o.LearnedOptimizer([("z", z)], "adam")  # named parameters, as torch.optim takes them
    opt = l2o.LearnedOptimizer([nn.Parameter(torch.randn(2))], "adam")
    with pytest.raises(ValueError, match="steps real parameters"):
        opt.add_param_group({"params": iter([z])})
    assert len(opt.param_groups) == 1


def test_a_pickled_model_is_named_foreign_not_corrupt(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save(nn.Linear(2, 2), path)  # a whole module: torch.load(weights_only=True) refuses it
    with pytest.raises(checkpoint.CheckpointError, match="is not an l2o checkpoint .*pickled Python objects"):
        l2o.load_optimizer(path)
