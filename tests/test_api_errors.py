"""Public API calls with wrong arguments: one clear TypeError / ValueError naming the argument,
not a deep error from torch or os (and never a NaN run from a non-finite hyperparameter)."""
from __future__ import annotations

import pytest
import torch

import l2o
from l2o import optim


@pytest.mark.parametrize("name", [None, 3, ["quadratic"]])
def test_task_name_of_the_wrong_type(name):
    with pytest.raises(TypeError, match="a task name must be a str"):
        l2o.tasks.get(name)


@pytest.mark.parametrize("dim", ["a", 2.5, 0, True])
def test_quadratic_dim_must_be_a_positive_integer(dim):
    with pytest.raises(ValueError, match="quadratic dim must be an integer >= 1"):
        l2o.tasks.get("quadratic", dim=dim)


def test_task_device_and_data_dir_are_checked_before_torch_sees_them():
    with pytest.raises(ValueError, match="device must be a torch device"):
        l2o.tasks.get("quadratic", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA, which is not available"):
            l2o.tasks.get("quadratic", device="cuda")
    with pytest.raises(TypeError, match="data_dir must be a str or os.PathLike, got int"):
        l2o.tasks.get("mnist_mlp", data_dir=3)
    assert l2o.tasks.get("quadratic", device=torch.device("cpu")).dim == 10


@pytest.mark.parametrize("spec", [None, 3])
def test_family_spec_of_the_wrong_type(spec):
    with pytest.raises(TypeError, match="a family spec must be a str"):
        l2o.tasks.family(spec)


@pytest.mark.parametrize("name, opts, fragment", [
    ("adam", {"lr": float("nan")}, "lr must be a finite number"),
    ("adam", {"lr": float("inf")}, "lr must be a finite number"),
    ("sgd", {"lr": float("nan")}, "lr must be a finite number"),
    ("momentum_inv_decay", {"decay": float("inf")}, "decay must be a finite number"),
    ("adam", {"eps": -1.0}, "eps must be a finite number >= 0"),
    ("rmsprop", {"eps": float("nan")}, "eps must be a finite number >= 0"),
])
def test_non_finite_hyperparameters_are_refused(name, opts, fragment):
    with pytest.raises(ValueError, match=fragment):
        optim.make(name, **opts)
    with pytest.raises(ValueError, match=fragment):
        l2o.LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], name, **opts)


def test_adaptive_scale_beta_must_be_finite():
    with pytest.raises(ValueError, match="beta must be a finite number"):
        optim.AdaptiveScale(optim.SGD(lr=0.1), beta=float("nan"))


@pytest.mark.parametrize("sub", ["MNIST", "MNIST/raw", "FashionMNIST", "FashionMNIST/raw"])
def test_data_dir_may_name_the_dataset_folder_itself(tiny_data, sub):
    """``--data-dir DATA/MNIST`` (or its raw/ folder) is read as DATA, as a cifar-10-batches-py
    folder is; it was refused as missing (after torchvision made an empty DATA/MNIST/MNIST/raw)."""
    import os

    name = "fashion_mnist_mlp" if sub.startswith("Fashion") else "mnist_mlp"
    before = sorted(os.walk(tiny_data))
    task = l2o.tasks.get(name, data_dir=os.path.join(tiny_data, sub))
    ref = l2o.tasks.get(name, data_dir=tiny_data)
    for split in ("train", "test"):
        assert all(torch.equal(a, b) for a, b in zip(task.full_batch(split), ref.full_batch(split)))
    assert l2o.tasks.data.on_disk(name.replace("_mlp", ""), os.path.join(tiny_data, sub))
    assert sorted(os.walk(tiny_data)) == before


def test_per_weight_decays_are_checked_against_each_task_before_work():
    """meta_eval.py ran the baselines' tuning, then failed with a KeyError on a per-weight checkpoint."""
    from l2o import suite

    built = suite.build_tasks(suite.select(["quadratic"]))
    same = optim.WeightDecay(optim.SGD(lr=0.1), 1e-3, shapes={"x": [10]})  # the quadratic's own parameters
    suite.check_portable({"same": ("same.pt", same), "plain": ("lstm.pt", optim.LSTMOptimizer(hidden=4))}, built)
    other = optim.WeightDecay(optim.SGD(lr=0.1), 1e-3, shapes={"x": [12]})
    with pytest.raises(ValueError, match=r"'other.pt' learned one weight decay per weight .* x \[12\]; "
                                         r"task 'quadratic' has x \[10\]"):
        suite.check_portable({"other": ("other.pt", other)}, built)


def test_hypergradient_problem_of_the_wrong_types():
    """A torch.optim optimizer or a list of parameters failed with an AttributeError deep in the unroll."""
    def inner(params, hparams, step):
        return ((params["w"] - 1) ** 2).sum() * hparams["wd"]

    def outer(params, hparams):
        return (params["w"] ** 2).sum()

    h = {"wd": torch.tensor(1.0, requires_grad=True)}
    sgd = optim.SGD(lr=0.1)
    w = torch.zeros(3)
    for fn in (l2o.hypergrad.reverse, l2o.hypergrad.forward):
        with pytest.raises(TypeError, match="params must be a non-empty dict of tensors, got list"):
            fn(inner, outer, [w], h, sgd, steps=3)
        with pytest.raises(TypeError, match="opt must be an l2o optimizer .* got SGD"):
            fn(inner, outer, {"w": w}, h, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), steps=3)
        with pytest.raises(TypeError, match="opt must be an l2o optimizer .* got NoneType"):
            fn(inner, outer, {"w": w}, h, None, steps=3)
        assert set(fn(inner, outer, {"w": w}, h, sgd, steps=3)) == {"wd"}
    with pytest.raises(TypeError, match="params must be a non-empty dict of tensors, got dict"):
        l2o.hypergrad.unroll(inner, {}, h, sgd, 3, graph=False)


def test_from_module_builder_must_return_a_module_with_parameters():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match="the model builder returned a int, not an nn.Module"):
        l2o.tasks.from_module(lambda: 3, (x, y))  # was an AttributeError on 'named_parameters'
    with pytest.raises(ValueError, match=r"the model \(ReLU\) has no parameters to optimize"):
        l2o.tasks.from_module(lambda: torch.nn.ReLU(), (x, y))


def test_a_task_factory_missing_a_required_argument_is_named(tmp_path, monkeypatch):
    """meta_eval.py printed a TypeError traceback for a user task whose function needs an argument."""
    (tmp_path / "needs_arg.py").write_text("def make(width):\n    raise AssertionError('not called')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="task 'needs_arg.py:make' needs a value for 'width'"):
        l2o.tasks.get("needs_arg.py:make")


def test_train_config_seed_range():
    from l2o.config import TrainConfig, UsageError

    with pytest.raises(UsageError, match=r"--seed must be an integer with \|seed\| < 2\*\*40"):
        TrainConfig(task="quadratic", seed=10 ** 13).validate()
    TrainConfig(task="quadratic", seed=-5).validate()


@pytest.mark.parametrize("name, opts, fragment", [
    ("quadratic", {"init_std": float("nan")}, "init_std must be a finite number >= 0"),  # was a task of nan losses
    ("quadratic", {"init_std": -1.0}, "init_std must be a finite number >= 0"),
    ("mnist_mlp", {"hidden": [2.5]}, "hidden sizes must be positive integers, got 2.5"),  # was 2 units
    ("mnist_mlp", {"batch_size": 2.5}, "hidden sizes must be positive integers, got 2.5"),
    ("cifar10_conv", {"hidden": [32]}, "must be positive integers, got \\[32\\]"),  # was a TypeError on '<'
    ("cifar10_conv", {"hidden": 2.5}, "must be positive integers, got 2.5"),  # was 2 units
])
def test_task_numbers_are_checked_not_truncated(tiny_data, name, opts, fragment):
    extra = {"data_dir": tiny_data} if name != "quadratic" else {}
    with pytest.raises(ValueError, match=fragment):
        l2o.tasks.get(name, **extra, **opts)


def test_a_partial_mnist_copy_names_the_missing_file(tmp_path):
    import os

    from conftest import write_idx

    raw = tmp_path / "MNIST" / "raw"
    write_idx(str(raw), n_train=8, n_test=4)
    os.remove(raw / "t10k-labels-idx1-ubyte")
    with pytest.raises(l2o.tasks.DataNotFoundError, match="is incomplete: t10k-labels-idx1-ubyte missing from"):
        l2o.tasks.get("mnist_mlp", data_dir=str(tmp_path))
