"""The sections of ``benchmarks/speed.py``: each builds its problem, times ours against a reference, prints rows."""
from __future__ import annotations

import contextlib
import time

import torch

import l2o
from l2o.hypergrad import implicit as implicit_hypergrad
from l2o.hypergrad import reverse as reverse_hypergrad
from l2o.hypergrad import segments, unroll
from l2o.hypergrad.unroll import own
from l2o.optim import lstm_kernel
from l2o.tasks import seeded
from l2o.tasks.base import ModuleTask, cross_entropy
from l2o.tasks.mlp import build_mlp

STEPS = 100


def mnist(args, device):
    """The MNIST MLP task, its initial weights and 100 training batches (drawn once, shared by every loop)."""
    task = l2o.tasks.get("mnist_mlp", data_dir=args.data_dir, device=str(device))
    params = task.init(seeded(0, 0))
    gen = seeded(0, 1)
    batches = [task.batch("train", gen) for _ in range(STEPS)]
    return task, params, batches


def torch_loop(task, params, batches, make_opt):
    """A plain PyTorch training loop on a copy of the task's module: the reference."""
    module = build_copy(task, params)
    opt = make_opt(module.parameters())

    def run():
        for x, y in batches:
            opt.zero_grad()
            task.criterion(module(x), y).backward()
            opt.step()
    return run


def build_copy(task, params):
    import copy

    module = copy.deepcopy(task.module)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(params[n])
    return module


def l2o_loop(task, params, batches, opt, graph=False):
    return lambda: unroll(lambda q, h, t: task.loss(q, batches[t]), params, {}, opt, STEPS, graph=graph)


# ----------------------------------------------------------------------------- lstm
@contextlib.contextmanager
def recorded_reference(opt):
    """The reference LSTM path: every operation of the cell recorded by autograd, eager gates."""
    opt.recorded_cell = True
    try:
        with lstm_kernel.disabled():
            yield
    finally:
        opt.recorded_cell = False


def warm_lstm_state(task, params, batch, opt):
    """One real gradient and the optimizer's state after 5 steps on it (the step timings start there)."""
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = dict(zip(p, torch.autograd.grad(task.loss(p, batch), list(p.values()))))
    with torch.no_grad():
        state = opt.init(params)
        for _ in range(5):
            _, state = opt.step(params, grads, state)
    return grads, state


def lstm(args, device, compare, row, header):
    task, params, batches = mnist(args, device)
    opt = l2o.load_optimizer(args.checkpoint).to(device)
    n = sum(v.numel() for v in params.values())
    grads, state = warm_lstm_state(task, params, batches[0], opt)
    n_in = opt.cells[0].in_features - opt.hidden
    macs = sum(c.in_features * c.out_features for c in opt.cells) + opt.out.in_features * opt.out.out_features
    macs += opt.skip.in_features * opt.skip.out_features if opt.readout == "dir_mag" else 0
    a = torch.randn(n, 40, device=device)
    b = torch.randn(40, 80, device=device)

    owned = {"p": own(params), "s": own(state)}

    def steps10():  # in place, as unroll without a graph steps (the values drift; the work does not)
        with torch.no_grad():
            for _ in range(10):
                owned["p"], owned["s"] = opt.step_(owned["p"], grads, owned["s"])

    chained = {"p": params, "s": state}

    def out_of_place10():  # each step from the last one's result, as a run chains them
        with torch.no_grad():
            for _ in range(10):
                chained["p"], chained["s"] = opt.step(chained["p"], grads, chained["s"])

    def matmul10():
        for _ in range(10):
            a @ b

    print(f"MNIST MLP 784-20-10: {n} coordinates; LSTM {opt.layers}x{opt.hidden}, {n_in} input features, "
          f"{opt.readout} readout: {macs} multiply-adds per coordinate; the reference is one "
          f"[{n}, 40] @ [40, 80] matmul (3200 per coordinate) scaled by {macs}/3200\n")
    def eager10():  # the same step with the compiled gate kernel switched off
        with torch.no_grad(), lstm_kernel.disabled():
            for _ in range(10):
                opt.step(params, grads, state)

    fns = {"step": steps10, "mm": matmul10, "eager": eager10, "out_of_place": out_of_place10}
    compile_s = None
    if args.compile:
        twin = l2o.load_optimizer(args.checkpoint).to(device).use_compiled()
        t0 = time.perf_counter()
        with torch.no_grad():
            twin.step(params, grads, state)
        compile_s = time.perf_counter() - t0

        def compiled10():
            with torch.no_grad():
                for _ in range(10):
                    twin.step(params, grads, state)
        fns["compiled"] = compiled10
    adam_ref = torch_loop(task, params, batches, lambda ps: torch.optim.Adam(ps, lr=0.01))
    fns["lstm_run"] = l2o_loop(task, params, batches, opt)
    fns["torch_adam_run"] = adam_ref
    fns["l2o_adam_run"] = l2o_loop(task, params, batches, l2o.optim.Adam(lr=0.01))
    hp = dict(opt.named_parameters())

    def meta_unroll():
        for _ in segments(lambda q, h, t: task.loss(q, batches[t]), None, params, hp, opt, STEPS, 20,
                          second_order=False, meta_weights=[1.0] * STEPS):
            pass
    fns["meta"] = meta_unroll

    def meta_recorded():
        with recorded_reference(opt):
            meta_unroll()
    fns["meta_recorded"] = meta_recorded
    med = compare(fns)
    mm = med["mm"] * macs / 3200
    print(header)
    kern = "compiled gate kernel" if lstm_kernel.kernel() is not None else "kernel UNAVAILABLE, eager"
    print(row(f"LSTM step, no graph, fused, {kern}, in place (`step_`, 10 steps) / matmul of equal FLOPs",
              med["step"], mm, 3))
    print(row("same, out of place (`step`) / matmul of equal FLOPs", med["out_of_place"], mm, None))
    print(row("LSTM step, no graph, fused, eager gates, out of place (10 steps) / matmul of equal FLOPs",
              med["eager"], mm, None))
    if args.compile:
        print(row("LSTM step, no graph, torch.compile (10 steps) / matmul of equal FLOPs", med["compiled"], mm, 3))
    print(row("100-step run with the LSTM / torch.optim.Adam run", med["lstm_run"], med["torch_adam_run"], 6))
    print(row("meta-unroll T=100, K=20, with graph / 100 plain torch.optim.Adam steps", med["meta"],
              med["torch_adam_run"], None))
    print(row("meta-unroll T=100, K=20, with graph / 100 plain l2o Adam steps (unroll, no graph)", med["meta"],
              med["l2o_adam_run"], 10))
    print(row("meta-unroll with the recorded cell (autograd, eager gates) / 100 plain l2o Adam steps",
              med["meta_recorded"], med["l2o_adam_run"], None))
    if device.type == "cpu":
        print(row("meta-unroll, one-node cell / meta-unroll, recorded cell", med["meta"], med["meta_recorded"], None))
    else:  # the one-node cell is a CPU path: on a GPU both unrolls record the cell
        print(f"\n(on {device.type} the meta-unroll records the cell: the one-node cell runs on CPU only)")
    if compile_s is not None:
        print(f"\ntorch.compile of the LSTM step: first call (compilation) {compile_s:.1f} s")


# ----------------------------------------------------------------------------- loop
def loop(args, device, compare, row, header):
    task, params, batches = mnist(args, device)
    med = compare({"ours": l2o_loop(task, params, batches, l2o.optim.SGD(lr=0.1)),
                   "torch": torch_loop(task, params, batches, lambda ps: torch.optim.SGD(ps, lr=0.1))})
    print(header)
    print(row("unroll(graph=False), SGD, 100 steps / torch.optim.SGD loop", med["ours"], med["torch"], 1.05))


# ----------------------------------------------------------------------------- handcrafted
def problem_623k(device):
    torch.manual_seed(0)
    module = build_mlp(28 * 28, [784], 10, "relu").to(device)
    return {n: p.detach().clone() for n, p in module.named_parameters()}


PAIRS = {
    "SGD": (lambda s: l2o.optim.SGD(lr=0.01), lambda ps: torch.optim.SGD(ps, lr=0.01, foreach=True)),
    "Nesterov": (lambda s: l2o.optim.Momentum(lr=0.01, momentum=0.9, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, foreach=True)),
    "Adam": (lambda s: l2o.optim.Adam(lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
    "RMSprop": (lambda s: l2o.optim.RMSprop(lr=1e-3), lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True)),
    "WeightDecay(Adam), scalar decay": (
        lambda s: l2o.optim.WeightDecay(l2o.optim.Adam(lr=1e-3), 1e-3),
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-3, foreach=True)),
    "WeightDecay(Adam), one decay per weight": (
        lambda s: l2o.optim.WeightDecay(l2o.optim.Adam(lr=1e-3), 1e-3, shapes=s),
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-3, foreach=True)),
}


def handcrafted(args, device, compare, row, header):
    sizes = {"16k": mnist(args, device)[1], "623k": problem_623k(device)}
    print(header)
    for size, params in sizes.items():
        gen = torch.Generator().manual_seed(1)
        grads = {k: torch.randn(v.shape, generator=gen).to(device) * 1e-2 for k, v in params.items()}
        shapes = {k: list(v.shape) for k, v in params.items()}
        fns = {}
        for name, (ours_f, theirs_f) in PAIRS.items():
            ours = ours_f(shapes).to(device)
            leaves = [v.clone().requires_grad_() for v in params.values()]
            for leaf, g in zip(leaves, grads.values()):
                leaf.grad = g.clone()
            theirs = theirs_f(leaves)
            box = {"p": params, "s": ours.init(params)}
            owned = {"p": own(params), "s": own(ours.init(params))}

            def run_ours(ours=ours, box=owned):  # in place, as unroll without a graph and the adapter step
                with torch.no_grad():
                    for _ in range(100):
                        box["p"], box["s"] = ours.step_(box["p"], grads, box["s"])

            def run_out_of_place(ours=ours, box=box):
                with torch.no_grad():
                    for _ in range(100):
                        box["p"], box["s"] = ours.step(box["p"], grads, box["s"])

            def run_theirs(theirs=theirs):
                for _ in range(100):
                    theirs.step()
            fns[name, "ours"], fns[name, "theirs"], fns[name, "oop"] = run_ours, run_theirs, run_out_of_place
        med = compare(fns)
        for name in PAIRS:
            print(row(f"{name}, {size} params, 100 steps without graph (`step_`) / torch.optim foreach",
                      med[name, "ours"], med[name, "theirs"], 1.1))
            print(row(f"{name}, {size} params, out of place (`step`) / torch.optim foreach",
                      med[name, "oop"], med[name, "theirs"], None))


# ----------------------------------------------------------------------------- reverse
def reverse(args, device, compare, row, header):
    try:
        import torchopt
    except ImportError:
        print("torchopt is not installed in this environment: section skipped "
              "(`pip install torchopt==0.7.3` to compare).")
        return
    task, params, batches = mnist(args, device)
    val = task.batch("test", seeded(0, 2))
    ours_fn, theirs_fn = reverse_pair(torchopt, task, params, batches, val)
    fns = {}
    for k in (1, 2):
        fns[k, "ours"] = lambda k=k: ours_fn(k)
        fns[k, "theirs"] = lambda k=k: theirs_fn(k)
    med = compare(fns)
    print(f"torchopt {torchopt.__version__}; MNIST MLP, T={STEPS} steps of SGD with momentum 0.9, "
          f"second-order reverse mode, outer loss on one test batch\n")
    print(header)
    for k, what in ((1, "lr"), (2, "lr + momentum")):
        print(row(f"reverse hypergradient ({what}) / torchopt functional sgd", med[k, "ours"], med[k, "theirs"], 0.9))
    print("\n" + float64_agreement(torchopt))


def reverse_pair(torchopt, task, params, batches, val, steps=STEPS):
    keys = list(params)

    def hparams(k, like):
        h = {"lr": torch.tensor(0.1, dtype=like.dtype, device=like.device, requires_grad=True)}
        if k == 2:
            h["momentum"] = torch.tensor(0.9, dtype=like.dtype, device=like.device, requires_grad=True)
        return h

    def ours(k):
        h = hparams(k, params[keys[0]])
        opt = l2o.optim.Momentum(lr=h["lr"], momentum=h.get("momentum", 0.9))
        return reverse_hypergrad(lambda q, hh, t: task.loss(q, batches[t]), lambda q, hh: task.loss(q, val),
                                 params, h, opt, steps=steps)

    def theirs(k):
        h = hparams(k, params[keys[0]])
        opt = torchopt.sgd(lr=h["lr"], momentum=h.get("momentum", 0.9))
        p = tuple(params[n].detach().requires_grad_() for n in keys)
        state = opt.init(p)
        for t in range(steps):
            g = torch.autograd.grad(task.loss(dict(zip(keys, p)), batches[t]), p, create_graph=True)
            updates, state = opt.update(g, state, inplace=False)
            p = torchopt.apply_updates(p, updates, inplace=False)
        gs = torch.autograd.grad(task.loss(dict(zip(keys, p)), val), list(h.values()))
        return dict(zip(h, gs))
    return ours, theirs


def float64_agreement(torchopt) -> str:
    """Both hypergradients on a float64 MLP (784-20-10 on random data, 20 steps): the same answer."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        task = ModuleTask(lambda: build_mlp(28 * 28, [20], 10, "sigmoid"), cross_entropy)
        gen = torch.Generator().manual_seed(0)
        params = task.init(gen)
        batches = [(torch.rand(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen))
                   for _ in range(21)]
        ours, theirs = reverse_pair(torchopt, task, params, batches[:20], batches[20], steps=20)
        a, b = ours(2), theirs(2)
        rel = max(float((a[k] - b[k]).abs() / b[k].abs()) for k in a)
        return (f"float64 check (20 steps, lr + momentum): ours {float(a['lr']):.15e}, {float(a['momentum']):.15e}; "
                f"torchopt {float(b['lr']):.15e}, {float(b['momentum']):.15e}; largest relative difference {rel:.1e}")
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- implicit
def implicit(args, device, compare, row, header):
    task = ModuleTask(lambda: build_mlp(28 * 28, [784], 10, "relu"), cross_entropy).to(device)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (50,), generator=g).to(device)
    val = torch.rand(50, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (50,), generator=g).to(device)
    params = task.init(g)
    opt = l2o.optim.WeightDecay(l2o.optim.Adam(lr=1e-3), 1e-3, shapes={k: list(v.shape) for k, v in params.items()})
    opt.to(device)
    hp = dict(opt.raw_weight_decay.named_parameters())
    res = unroll(lambda q, h, t: task.loss(q, train), params, {}, opt, 20, graph=False)
    params = res.params

    def inner(q, h, t):
        return task.loss(q, train) + opt.penalty(q)

    def outer(q, h):
        return task.loss(q, val)

    leaves = [v.detach().clone().requires_grad_() for v in params.values()]
    sgd = torch.optim.SGD(leaves, lr=0.01)

    def sgd_step():
        sgd.zero_grad()
        task.loss(dict(zip(params, leaves)), train).backward()
        sgd.step()

    def first_call():  # a new inner problem: the default step size is estimated
        return implicit_hypergrad(lambda q, h, t: inner(q, h, t), outer, params, hp, method="neumann", iters=3)

    # The floor of any exact Neumann-3 hypergradient here: its products with the 784x784
    # layer. Outer gradient 2 (forward, weight gradient), inner gradient with graph 2, each
    # of the 3 Hessian-vector products 2 (the forward tangent x V^T, the weight gradient's
    # tangent) = 10 (9 if the inner gradient's unused value were skipped); an SGD step has 2.
    # Timed into preallocated outputs: arithmetic only, no allocation.
    x, w = train[0].reshape(len(train[0]), -1), next(iter(params.values()))
    gz = torch.randn(x.shape[0], w.shape[0], generator=g).to(device)
    fwd, wgrad = torch.empty(x.shape[0], w.shape[0], device=device), torch.empty_like(w)

    def products(n):
        for _ in range(n):
            torch.mm(x, w.t(), out=fwd)
            torch.mm(gz.t(), x, out=wgrad)

    med = compare({"sgd": sgd_step, "default": lambda: implicit_hypergrad(inner, outer, params, hp,
                                                                          method="neumann", iters=3),
                   "first": first_call, "products10": lambda: products(5), "products2": lambda: products(1)})
    n = sum(v.numel() for v in hp.values())
    print(f"MLP 784-784-10 (ReLU), 50 examples, {n} weight decays (WeightDecay(Adam), one per weight)\n")
    print(header)
    print(row("implicit Neumann-3, default arguments / plain torch.optim.SGD step", med["default"], med["sgd"], 4))
    print(row("same, first call of an inner problem (20 power iterations) / SGD step", med["first"], med["sgd"],
              None))
    print(row("floor: the 10 layer products of exact Neumann-3 / SGD step", med["products10"], med["sgd"], None))
    print(row("the SGD step's own 2 layer products / SGD step", med["products2"], med["sgd"], None))
    if device.type == "cpu":  # on a shared machine: CPU time (immune to time slicing) and page faults per call
        cpu, faults = cpu_and_faults({"sgd": sgd_step, "default": lambda: implicit_hypergrad(
            inner, outer, params, hp, method="neumann", iters=3)}, args.repeats)
        print(f"\nCPU time per call (median of {args.repeats}): implicit {1e3 * cpu['default']:.2f} ms, SGD step "
              f"{1e3 * cpu['sgd']:.2f} ms, ratio {cpu['default'] / cpu['sgd']:.2f}x; minor page faults per call: "
              f"implicit {faults['default']:.0f}, SGD step {faults['sgd']:.0f} (a 784x784 float32 tensor spans "
              f"600 pages)")


def cpu_and_faults(fns, repeats):
    """Median thread CPU time and mean minor page faults per call of each callable, interleaved."""
    import resource
    import statistics

    cpu, faults = {n: [] for n in fns}, {n: 0 for n in fns}
    for r in range(repeats):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
            fns[n]()
            cpu[n].append(time.thread_time() - c0)
            faults[n] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {n: statistics.median(v) for n, v in cpu.items()}, {n: v / repeats for n, v in faults.items()}
