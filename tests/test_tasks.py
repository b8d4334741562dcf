"""Tasks: the registry, pure losses (graphs, forward-mode duals), reproducible init, offline data errors.

Every dataset test reads the tiny real-format files written by the ``tiny_data``
fixture; nothing here touches the network (torchvision's downloaders are stubbed
wherever a missing dataset would trigger them).
"""
from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torchvision.datasets as tvd
from torch.func import functional_call

import l2o
from l2o.tasks import data as tdata
from conftest import write_cifar

# small models keep every test well under a second
MODULE_TASKS = [
    ("mnist_mlp", {}),
    ("mnist_mlp", {"hidden": [7, 5], "activation": "relu"}),
    ("mnist_mlp", {"hidden": 6, "activation": "tanh", "batch_size": 16}),
    ("fashion_mnist_mlp", {"hidden": [8]}),
    ("cifar10_conv", {"channels": 4, "hidden": 8, "batch_size": 8}),
]


@pytest.fixture
def offline(monkeypatch):
    """Make every torchvision download fail as it would without a network."""

    def no_network(self, *args, **kwargs):
        raise RuntimeError("no network in tests")

    for cls in (tvd.MNIST, tvd.FashionMNIST, tvd.CIFAR10):
        monkeypatch.setattr(cls, "download", no_network)


def _functional_loss(task, params, batch):
    """Reference loss via torch.func.functional_call on the task's template module."""
    x, y = batch
    return task.criterion(functional_call(task.module, params, (x,)), y)


def _snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- registry and options
def test_get_quadratic_and_its_loss():
    task = l2o.tasks.get("quadratic", dim=3, init_std=0.5)
    assert task.name == "quadratic" and task.config() == {"dim": 3, "init_std": 0.5}
    with pytest.raises(RuntimeError, match="sample"):
        task.batch("train", torch.Generator())
    problem = task.sample(torch.Generator().manual_seed(1))
    params = problem.init(torch.Generator().manual_seed(2))
    assert params["x"].shape == (3,) and params["x"].dtype == torch.float64
    W, y = problem.batch("train", torch.Generator())
    x = params["x"]
    expected = sum((sum(W[i, j] * x[j] for j in range(3)) - y[i]) ** 2 for i in range(3))
    torch.testing.assert_close(problem.loss(params, (W, y)), expected, rtol=1e-14, atol=0)
    # a fresh sample is a different problem; the same seed the same one
    W2, _ = task.sample(torch.Generator().manual_seed(1)).batch("test", torch.Generator())
    W3, _ = task.sample(torch.Generator().manual_seed(3)).batch("test", torch.Generator())
    assert torch.equal(W, W2) and not torch.equal(W, W3)
    with pytest.raises(ValueError, match="shape"):
        problem.loss({"x": torch.zeros(4)}, (W, y))


@pytest.mark.parametrize("name,opts", MODULE_TASKS)
def test_get_module_tasks_shapes_and_options(tiny_data, name, opts):
    task = l2o.tasks.get(name, data_dir=tiny_data, **opts)
    assert task.name == name
    params = task.init(torch.Generator().manual_seed(0))
    x, y = task.batch("train", torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64 and y.dtype == torch.int64
    assert x.shape[0] == y.shape[0] == opts.get("batch_size", 128)
    assert all(v.dtype == torch.float64 and not v.requires_grad for v in params.values())
    logits = task.forward(params, x)
    assert logits.shape == (x.shape[0], 10)
    if name.endswith("mlp"):
        hidden = opts.get("hidden", [20])
        hidden = [hidden] if isinstance(hidden, int) else hidden
        widths = [p.shape[0] for k, p in params.items() if k.endswith("weight")]
        assert widths == hidden + [10]
        acts = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}
        act = acts[opts.get("activation", "sigmoid")]
        assert isinstance(task.module[2], act)
        assert task.config()["hidden"] == hidden
    # the options that config() reports rebuild an equal task
    again = l2o.tasks.get(name, data_dir=tiny_data, **task.config())
    torch.testing.assert_close(again.loss(params, (x, y)), task.loss(params, (x, y)), rtol=0, atol=0)


def test_unknown_task_and_option_are_clear(tiny_data):
    with pytest.raises(ValueError, match="unknown task 'nope'.*mnist_mlp"):
        l2o.tasks.get("nope")
    with pytest.raises(ValueError, match="no option 'hiden'.*hidden"):
        l2o.tasks.get("mnist_mlp", hiden=[3], data_dir=tiny_data)
    with pytest.raises(ValueError, match="no option 'foo'.*dim"):
        l2o.tasks.get("quadratic", foo=1)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        l2o.tasks.get("mnist_mlp", activation="gelu", data_dir=tiny_data)
    with pytest.raises(ValueError, match="split"):
        l2o.tasks.get("mnist_mlp", data_dir=tiny_data, hidden=3).batch("val", torch.Generator())
    with pytest.raises(ValueError):
        l2o.tasks.get("quadratic", dim=0)


# ----------------------------------------------------------------------------- the pure loss
@pytest.mark.parametrize("name,opts", MODULE_TASKS[1:])
def test_higher_loss_equals_functional_call(tiny_data, name, opts):
    task = l2o.tasks.get(name, data_dir=tiny_data, **opts)
    params = task.init(torch.Generator().manual_seed(3))
    batch = task.batch("train", torch.Generator().manual_seed(4))
    ours, ref = task.loss(params, batch), _functional_loss(task, params, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)
    # gradients agree too (both paths are differentiable in the params)
    p1 = {k: v.clone().requires_grad_() for k, v in params.items()}
    p2 = {k: v.clone().requires_grad_() for k, v in params.items()}
    g1 = torch.autograd.grad(task.loss(p1, batch), list(p1.values()))
    g2 = torch.autograd.grad(_functional_loss(task, p2, batch), list(p2.values()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_loss_is_pure_on_plain_graph_and_dual_params(tiny_data):
    task = l2o.tasks.get("mnist_mlp", hidden=[6], data_dir=tiny_data)
    params = task.init(torch.Generator().manual_seed(0))
    batch = task.batch("train", torch.Generator().manual_seed(0))
    before, template = _snapshot(params), _snapshot(dict(task.module.named_parameters()))
    first = task.loss(params, batch)
    _assert_same(params, before)
    _assert_same(dict(task.module.named_parameters()), template)
    torch.testing.assert_close(task.loss(params, batch), first, rtol=0, atol=0)

    # params carrying a graph: theta = base * scale, the loss differentiates into `scale`
    scale = torch.tensor(1.0, requires_grad=True)
    graph_params = {k: v * scale for k, v in params.items()}
    loss = task.loss(graph_params, batch)
    torch.testing.assert_close(loss, first, rtol=1e-14, atol=0)
    (d_scale,) = torch.autograd.grad(loss, scale)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    gp = torch.autograd.grad(_functional_loss(task, p, batch), list(p.values()))
    expected = sum((g * params[k]).sum() for k, g in zip(p, gp))  # chain rule: d/ds L(s theta) at s=1
    torch.testing.assert_close(d_scale, expected, rtol=1e-12, atol=0)
    _assert_same(dict(task.module.named_parameters()), template)

    # forward-mode duals: the tangent equals torch.func.jvp of the functional reference
    gen = torch.Generator().manual_seed(5)
    tangents = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(v, tangents[k]) for k, v in params.items()}
        out = fwAD.unpack_dual(task.loss(duals, batch))
        primal, tangent = out.primal.clone(), out.tangent.clone()
    _, ref_tangent = torch.func.jvp(lambda ps: _functional_loss(task, ps, batch), (params,), (tangents,))
    torch.testing.assert_close(primal, first, rtol=1e-14, atol=0)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-11, atol=1e-14)
    _assert_same(params, before)


def test_loss_names_missing_params(tiny_data):
    task = l2o.tasks.get("mnist_mlp", hidden=[4], data_dir=tiny_data)
    params = task.init(torch.Generator().manual_seed(0))
    del params["3.bias"]
    with pytest.raises(KeyError, match="3.bias"):
        task.loss(params, task.batch("train", torch.Generator()))


# ----------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("name,opts", [MODULE_TASKS[1], MODULE_TASKS[4]])
def test_init_and_batches_reproducible_from_generator(tiny_data, name, opts):
    task = l2o.tasks.get(name, data_dir=tiny_data, **opts)
    global_state = torch.get_rng_state()
    a = task.init(torch.Generator().manual_seed(11))
    torch.manual_seed(12345)  # the global RNG must not matter ...
    b = task.init(torch.Generator().manual_seed(11))
    c = task.init(torch.Generator().manual_seed(12))
    _assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.set_rng_state(global_state)
    task.init(torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), global_state)  # ... and is left untouched
    x1, y1 = task.batch("train", torch.Generator().manual_seed(7))
    x2, y2 = task.batch("train", torch.Generator().manual_seed(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_batch_stream_replays_batches(tiny_data):
    task = l2o.tasks.get("mnist_mlp", hidden=[4], batch_size=4, data_dir=tiny_data)
    s1 = l2o.tasks.BatchStream(task, "train", torch.Generator().manual_seed(0))
    s2 = l2o.tasks.BatchStream(task, "train", torch.Generator().manual_seed(0))
    b3 = s1[3]
    assert torch.equal(s1[3][1], b3[1]) and torch.equal(s2[3][0], b3[0])  # random access is stable
    for t in range(4, 12):
        s1[t]
    with pytest.raises(IndexError, match="dropped"):
        s1[0]


# ----------------------------------------------------------------------------- offline data
@pytest.mark.parametrize("name,folder", [("mnist_mlp", "MNIST"), ("fashion_mnist_mlp", "FashionMNIST")])
def test_missing_idx_data_error_is_one_actionable_line(tmp_path, offline, name, folder):
    root = str(tmp_path / "nowhere")
    with pytest.raises(l2o.tasks.DataNotFoundError) as info:
        l2o.tasks.get(name, data_dir=root)
    msg = str(info.value)
    assert "\n" not in msg
    assert os.path.join(root, folder, "raw") in msg
    assert "--data-dir" in msg and "L2O_DATA_DIR" in msg and "train-images-idx3-ubyte" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_data_uses_env_root(tmp_path, offline, monkeypatch):
    root = str(tmp_path / "from_env")
    monkeypatch.setenv("L2O_DATA_DIR", root)
    with pytest.raises(l2o.tasks.DataNotFoundError, match=f"{root}.*L2O_DATA_DIR"):
        l2o.tasks.get("mnist_mlp")
    with pytest.raises(l2o.tasks.DataNotFoundError) as info:
        l2o.tasks.get("cifar10_conv")
    msg = str(info.value)
    assert "\n" not in msg and root in msg and "cifar-10-batches-py" in msg
    assert "--data-dir" in msg and "L2O_DATA_DIR" in msg


def test_incomplete_cifar_folder_names_the_missing_file(tmp_path, offline):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(str(folder), n_per_batch=3)
    os.remove(folder / "data_batch_4")
    with pytest.raises(l2o.tasks.DataNotFoundError, match="data_batch_4") as info:
        l2o.tasks.get("cifar10_conv", data_dir=str(tmp_path))
    assert "\n" not in str(info.value)


def test_cifar_subset_with_mismatching_md5_loads(tmp_path, offline):
    # the layout of a CIFAR-10 subset: <root>/cifar-10-subset/cifar-10-batches-py/
    folder = tmp_path / "cifar-10-subset" / "cifar-10-batches-py"
    write_cifar(str(folder), n_per_batch=5, seed=3)
    official = dict(tvd.CIFAR10.train_list + tvd.CIFAR10.test_list)
    for name, md5 in official.items():  # torchvision's integrity check would reject these files
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() != md5
    with pytest.raises(RuntimeError):
        tvd.CIFAR10(root=str(folder.parent), train=False, download=False)

    train = tdata.load("cifar10", "train", str(tmp_path))
    test = tdata.load("cifar10", "test", str(tmp_path))
    assert train.x.shape == (25, 3, 32, 32) and test.x.shape == (5, 3, 32, 32)
    with open(folder / "test_batch", "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    assert test.y.tolist() == entry["labels"]
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    raw = torch.from_numpy(np.asarray(entry["data"], dtype=np.float64).reshape(-1, 3, 32, 32)) / 255.0
    torch.testing.assert_close(test.x, (raw - mean) / std, rtol=1e-12, atol=1e-12)

    task = l2o.tasks.get("cifar10_conv", channels=2, hidden=4, batch_size=6, data_dir=str(tmp_path))
    x, y = task.full_batch("test")
    assert x.shape == (5, 3, 32, 32) and torch.equal(y, test.y)
    loss = task.loss(task.init(torch.Generator().manual_seed(0)), task.batch("train", torch.Generator()))
    assert torch.isfinite(loss)


def test_mnist_pixels_scaled_to_unit_interval(tiny_data):
    ds = tdata.load("mnist", "test", tiny_data)
    assert ds.x.shape == (64, 1, 28, 28) and ds.y.shape == (64,)
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) == 1.0  # the fixture's stripes are 255
