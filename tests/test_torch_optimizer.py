"""``l2o.LearnedOptimizer``: the functional trajectory, torch.optim's trajectories, exact resume, frozen params."""
from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call

import l2o
from l2o import checkpoint, optim

STEPS = 100

# torch.optim twins of the hand-designed optimizers (constant hyperparameters); a new name in
# optim.NAMES fails test_every_optimizer_has_a_twin until it is added here
TWINS = {
    "sgd": ({"lr": 0.3}, lambda ps: torch.optim.SGD(ps, lr=0.3)),
    "momentum": ({"lr": 0.02, "momentum": 0.8}, lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.8)),
    "nesterov": ({"lr": 0.02, "momentum": 0.8}, lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.8, nesterov=True)),
    "momentum_inv_decay": ({"lr": 0.02, "momentum": 0.8, "decay": 0.0},
                           lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.8)),
    "adam": ({"lr": 0.01, "beta1": 0.85, "beta2": 0.99}, lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.85, 0.99))),
    "rmsprop": ({"lr": 0.01, "alpha": 0.95}, lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.95)),
}


class Net(nn.Module):
    """Parameters of every rank: conv (4-d), linear (2-d), biases (1-d) and a scalar gain (0-d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.side = nn.Linear(5, 5)  # used only when the batch asks for it (grad None otherwise)

    def forward(self, x: torch.Tensor, use_side: bool = True) -> torch.Tensor:
        h = self.fc(torch.tanh(self.conv(x)).flatten(1)) * self.gain
        return self.side(h) if use_side else h


def batches(n: int = STEPS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.get_default_dtype()
    teacher = torch.randn(72, 5, generator=gen, dtype=dt)  # learnable labels: a fixed linear teacher
    xs = [torch.randn(8, 2, 6, 6, generator=gen, dtype=dt) for _ in range(n)]
    return [(x, (x.flatten(1) @ teacher).argmax(1)) for x in xs]


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "lstm_mnist.pt")


def lstm(inputs: str = "rich") -> optim.LSTMOptimizer:
    """A small LSTM optimizer with random (not near-zero) readout weights, so every step moves."""
    torch.manual_seed(3)
    opt = optim.LSTMOptimizer(hidden=6, layers=2, inputs=inputs, readout="dir_mag" if inputs == "rich" else "linear",
                              init_scale=0.3)
    if inputs == "rich":
        with torch.no_grad():
            opt.skip.weight.normal_(0, 0.3)
    return opt


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def adapter_run(net: Net, opt: torch.optim.Optimizer, data, use_side=lambda t: True) -> list[float]:
    losses = []
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x, use_side(t)), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def functional_run(net: Net, fopt, data) -> tuple[dict, list[float]]:
    """The reference: l2o's functional protocol on the whole parameter dict."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    state, losses = fopt.init(params), []
    for x, y in data:
        p = {k: v.requires_grad_() for k, v in params.items()}
        loss = nn.functional.cross_entropy(functional_call(net, p, (x,)), y)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        with torch.no_grad():
            params, state = fopt.step({k: v.detach() for k, v in p.items()}, grads, state)
        losses.append(float(loss.detach()))
    return params, losses


@pytest.fixture
def float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def _assert_params(net: Net, params: dict, **tol) -> None:
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), params[k], **tol)


@pytest.mark.parametrize("name", ["lstm_shipped", "lstm_rich", "lstm_paper", *TWINS])
def test_follows_the_functional_trajectory(float32, name):
    if name == "lstm_shipped":
        fopt = l2o.load_optimizer(SHIPPED)
    else:
        fopt = lstm(name.split("_")[1]) if name.startswith("lstm") else optim.make(name, **TWINS[name][0])
    net, data = make_net(), batches()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    ref_params, ref_losses = functional_run(copy.deepcopy(net), copy.deepcopy(fopt), data)
    losses = adapter_run(net, l2o.LearnedOptimizer(net.parameters(), fopt), data)
    # the trajectory goes somewhere (and trains, for the trained optimizers), so agreeing is not trivial
    assert max(float((ref_params[k] - v).abs().max()) for k, v in start.items()) > 0.1
    if name not in ("lstm_rich", "lstm_paper"):
        assert sum(ref_losses[-10:]) < 0.8 * sum(ref_losses[:10])
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    _assert_params(net, ref_params, rtol=1e-5, atol=1e-6)


def test_checkpoint_path_and_name_forms(float32, tmp_path):
    fopt = lstm()
    path = str(tmp_path / "opt.pt")
    checkpoint.save(path, {"optimizer": checkpoint.optimizer_payload(fopt), "best": None, "config": {}})
    net, data = make_net(), batches(20)
    ref_params, _ = functional_run(copy.deepcopy(net), copy.deepcopy(fopt), data)
    adapter_run(net, l2o.LearnedOptimizer(net.parameters(), path), data)
    _assert_params(net, ref_params, rtol=1e-5, atol=1e-6)
    by_name = l2o.LearnedOptimizer(net.parameters(), "adam", lr=0.1)
    assert isinstance(by_name.functional, optim.Adam) and abs(by_name.functional.hparams()["lr"] - 0.1) < 1e-6


def test_every_optimizer_has_a_twin():
    assert set(TWINS) == set(optim.NAMES) - {"lstm"}


@pytest.mark.parametrize("name", list(TWINS))
def test_handcrafted_follow_torch_optim(name):
    kwargs, twin = TWINS[name]
    net, data = make_net(), batches()
    net2 = copy.deepcopy(net)
    ours = adapter_run(net, l2o.LearnedOptimizer(net.parameters(), name, **kwargs), data)
    theirs = adapter_run(net2, twin(net2.parameters()), data)
    assert sum(theirs[-10:]) < 0.8 * sum(theirs[:10])
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    _assert_params(net, dict(net2.named_parameters()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["lstm", "adam"])
def test_state_dict_round_trip_continues_bit_identically(tmp_path, name):
    fopt = lstm() if name == "lstm" else optim.Adam(lr=0.01)
    data = batches(40)
    side = lambda t: t % 3 != 0  # noqa: E731 - some steps leave `side` without a gradient
    net = make_net()
    opt = l2o.LearnedOptimizer(net.parameters(), fopt)
    adapter_run(net, opt, data, side)
    straight = {k: v.detach().clone() for k, v in net.named_parameters()}

    net = make_net()
    opt = l2o.LearnedOptimizer(net.parameters(), fopt)
    adapter_run(net, opt, data[:25], side)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert "h" not in saved["opt"]["state"][0]["l2o"] or saved["opt"]["state"][0]["l2o"]["h"][0].shape[1] == 6
    net2 = make_net(seed=99)  # different weights, replaced by the checkpoint
    net2.load_state_dict(saved["model"])
    opt2 = l2o.LearnedOptimizer(net2.parameters(), fopt)
    opt2.load_state_dict(saved["opt"])
    adapter_run(net2, opt2, data[25:], lambda t: side(t + 25))
    for k, v in net2.named_parameters():
        assert torch.equal(v.detach(), straight[k]), k


@pytest.mark.parametrize("name", ["lstm", "adam"])
def test_frozen_and_sometimes_unused_params_are_skipped_exactly(name):
    fopt = lstm() if name == "lstm" else optim.Adam(lr=0.01)
    net, data = make_net(), batches(12)
    net.conv.weight.requires_grad_(False)
    frozen = net.conv.weight.detach().clone()
    side = lambda t: t % 2 == 0  # noqa: E731
    opt = l2o.LearnedOptimizer(net.parameters(), fopt)
    side_state, side_value = None, None
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x, side(t)), y).backward()
        opt.step()
        if not side(t):  # no gradient this step: value and state untouched
            assert torch.equal(net.side.weight, side_value) and opt.state[net.side.weight]["l2o"] is side_state
        side_state, side_value = opt.state[net.side.weight]["l2o"], net.side.weight.detach().clone()
    assert torch.equal(net.conv.weight, frozen) and net.conv.weight not in opt.state

    # reference: each parameter stepped on its own functional state, only when it has a gradient
    ref, states = make_net(), {}
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    for t, (x, y) in enumerate(data):
        live = [k for k in params if k != "conv.weight" and (side(t) or not k.startswith("side"))]
        p = {k: v.requires_grad_(k in live) for k, v in params.items()}
        loss = nn.functional.cross_entropy(functional_call(ref, p, (x, side(t))), y)
        grads = dict(zip(live, torch.autograd.grad(loss, [p[k] for k in live])))
        with torch.no_grad():
            for k in live:
                st = states.get(k) or fopt.init({k: p[k]})
                new, states[k] = fopt.step({k: p[k].detach()}, {k: grads[k]}, st)
                params[k] = new[k]
        params = {k: v.detach() for k, v in params.items()}
    _assert_params(net, params, rtol=1e-12, atol=1e-13)


def test_param_groups_scale_and_added_groups():
    net, data = make_net(), batches(10)
    ref = copy.deepcopy(net)
    opt = l2o.LearnedOptimizer([{"params": [net.conv.weight, net.conv.bias], "scale": 0.5},
                                {"params": [net.fc.weight, net.fc.bias, net.gain]}], "sgd", lr=0.1)
    opt.add_param_group({"params": list(net.side.parameters()), "scale": 0.0})
    assert [g["scale"] for g in opt.param_groups] == [0.5, 1.0, 0.0]
    side_before = net.side.weight.detach().clone()
    adapter_run(net, opt, data)
    assert torch.equal(net.side.weight, side_before)  # scale 0: never moves
    # SGD with a half learning rate on the first group is the same trajectory
    topt = torch.optim.SGD([{"params": [ref.conv.weight, ref.conv.bias], "lr": 0.05},
                            {"params": [ref.fc.weight, ref.fc.bias, ref.gain], "lr": 0.1}], lr=0.1)
    adapter_run(ref, topt, data)
    for k, v in net.named_parameters():
        if not k.startswith("side"):
            torch.testing.assert_close(v.detach(), dict(ref.named_parameters())[k], rtol=1e-12, atol=1e-14)


def test_lr_schedulers_drive_the_groups_lr_factor():
    """torch.optim.lr_scheduler works: a group's ``lr`` (1.0 at first) multiplies the step, as ``scale`` does."""
    data = batches(12)
    runs = []
    for kind in ("l2o", "torch"):
        net = make_net()
        if kind == "l2o":
            opt = l2o.LearnedOptimizer([{"params": [net.conv.weight, net.conv.bias], "scale": 0.5},
                                        {"params": [p for n, p in net.named_parameters() if not n.startswith("conv")]}],
                                       "sgd", lr=0.1)
            assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
        else:  # the same schedule on torch.optim.SGD with the learning rates the factors stand for
            opt = torch.optim.SGD([{"params": [net.conv.weight, net.conv.bias], "lr": 0.05},
                                   {"params": [p for n, p in net.named_parameters() if not n.startswith("conv")]}],
                                  lr=0.1)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[4])
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
        runs.append((net, opt, sched))
    (net, opt, sched), (ref, _, _) = runs
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), dict(ref.named_parameters())[k], rtol=1e-12, atol=1e-14)
    # the factor and the scheduler resume from a state_dict
    again = l2o.LearnedOptimizer([{"params": [net.conv.weight, net.conv.bias], "scale": 0.5},
                                  {"params": [p for n, p in net.named_parameters() if not n.startswith("conv")]}],
                                 "sgd", lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups] != [1.0, 1.0]
    # a state saved before groups had the factor loads with factor 1
    old = opt.state_dict()
    for g in old["param_groups"]:
        del g["lr"]
    again.load_state_dict(old)
    assert [g["lr"] for g in again.param_groups] == [1.0, 1.0]
    # a factor a scheduler (or a user) set to nan or below 0 is refused at the step, nothing moved
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    for bad in (math.nan, -0.1):
        again.param_groups[1]["lr"] = bad
        with pytest.raises(ValueError, match="lr"):
            again.step()
        assert all(torch.equal(v, before[k]) for k, v in net.named_parameters())
    with pytest.raises(ValueError, match="lr must be a finite number"):
        l2o.LearnedOptimizer([{"params": [net.gain], "lr": -1.0}], "sgd", lr=0.1)


def test_closure_and_mixed_dtypes():
    net = make_net()
    net.fc.float()  # a float32 layer beside float64 ones: one optimizer copy per dtype
    opt = l2o.LearnedOptimizer(net.parameters(), lstm())
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        out = net.fc(torch.tanh(net.conv(x)).flatten(1).float()).double() * net.gain
        loss = nn.functional.cross_entropy(net.side(out), y)
        loss.backward()
        return loss

    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)
    assert all(not torch.equal(v, before[k]) for k, v in net.named_parameters())
    assert net.fc.weight.dtype == torch.float32 and opt.state[net.fc.weight]["l2o"]["h"][0].dtype == torch.float32


def test_bad_optimizer_arguments(tmp_path):
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        l2o.LearnedOptimizer(params, "adamw")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        l2o.LearnedOptimizer(params, str(tmp_path / "nope.pt"))
    with pytest.raises(TypeError, match="checkpoint path"):
        l2o.LearnedOptimizer(params, 0.1)
    with pytest.raises(ValueError, match="by name"):
        l2o.LearnedOptimizer(params, lstm(), lr=0.1)
    per_weight = optim.WeightDecay(optim.SGD(), 1e-3, shapes={"1.weight": [3]})
    with pytest.raises(ValueError, match="per weight"):
        l2o.LearnedOptimizer(params, per_weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net, data = make_net(), batches(20)
    gpu = copy.deepcopy(net).cuda()
    adapter_run(net, l2o.LearnedOptimizer(net.parameters(), lstm()), data)
    opt = l2o.LearnedOptimizer(gpu.parameters(), lstm())
    adapter_run(gpu, opt, [(x.cuda(), y.cuda()) for x, y in data])
    assert all(s["l2o"]["h"][0].is_cuda for s in opt.state.values())
    for k, v in gpu.named_parameters():
        torch.testing.assert_close(v.detach().cpu(), dict(net.named_parameters())[k].detach(), rtol=1e-9, atol=1e-10)
