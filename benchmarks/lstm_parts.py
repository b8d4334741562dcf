#!/usr/bin/env python
"""Where the LSTM optimizer's no-graph step spends its time, part by part, against this CPU's floors.

The shipped 2x20 LSTM (``checkpoints/lstm_mnist.pt``) on the MNIST MLP's 15,910
coordinates. Each part of :func:`l2o.optim.lstm_fused.forward_cm` (the path of
``opt.step_``) is timed on its own, with the same shapes, operand layouts and kernels,
interleaved with the whole step and with two references taken in the same process:

* the product ``[N, 40] @ [40, 80]`` that ``benchmarks/speed.py`` divides the step by
  (its FLOPs scaled to the step's: 5,414 multiply-adds per coordinate);
* ``torch.sigmoid`` over ``[N, 80]``: PyTorch's own vectorised ``exp`` + division per
  element. The gate pass computes five such per hidden unit (four gates and
  ``tanh(c) = 2 sigmoid(2c) - 1``), so ``5 x`` that per-element time is what the same
  arithmetic costs in PyTorch's fastest kernel.

Values do not change the timings (no branches), so inputs are random. CPU time of this
process, median of ``--repeats`` interleaved rounds, one thread.

    python benchmarks/lstm_parts.py --repeats 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import l2o
from l2o.hypergrad.unroll import own
from l2o.optim import lstm_fused, lstm_kernel

N = 15910  # coordinates of the MNIST MLP 784-20-10


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="lstm_mnist", help="learned optimizer (default: lstm_mnist)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--inner", type=int, default=20, help="calls per timed block (default 20)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.inner < 1:
        ap.error("--repeats and --inner must be positive")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    opt = l2o.load_optimizer(args.checkpoint)
    if lstm_kernel.kernel() is None:
        ap.error("the compiled gate kernel is unavailable here (no C compiler?): the parts would be eager ones")
    H, ws = opt.hidden, [w.detach() for w in opt._weights()]
    params = {"w": torch.randn(N)}
    grads = {"w": torch.randn(N) * 1e-3}
    with torch.no_grad():
        state = opt.init(params)
        for _ in range(5):
            _, state = opt.step(params, grads, state)
    owned = {"p": own(params), "s": own(state)}
    a, b = torch.randn(N, 40), torch.randn(40, 80)
    z = torch.randn(N, 4 * H)
    pre = torch.empty(N, 4 * H)
    rest = ws[4:]
    clock = time.process_time

    def step():
        with torch.no_grad():
            owned["p"], owned["s"] = opt.step_(owned["p"], grads, owned["s"])

    def replica(acc: dict[str, float]) -> None:
        """forward_cm's no-graph path with its inputs, scratch and states as step_ passes them, each part timed."""
        st = owned["s"]
        with torch.no_grad():
            t0 = clock()
            x, feat = opt._features(grads["w"], st)  # [N, 7] view of [7, N] storage, read in place
            t1 = clock()
            acc["input features"] += t1 - t0
            inp = x
            for i, (h, c) in enumerate(zip(st["h"], st["c"])):
                w, k = ws[2 * i], inp.shape[1]
                t0 = clock()
                lstm_kernel.layer_forward_cm(inp, h, w, ws[2 * i + 1], c, h)
                t1 = clock()
                acc[f"layer {i + 1}: products and gates in one pass"] += t1 - t0
                # the same layer as the path with a graph computes it, on copies (the states move on above)
                hc, cc = h.clone(), c.clone()
                xin = inp.contiguous()  # that path's products read contiguous features
                t0 = clock()
                torch.mm(xin, w[:, :k].t(), out=pre)
                pre.addmm_(hc, w[:, k:].t())
                t1 = clock()
                lstm_kernel.gates_forward_cm(pre, ws[2 * i + 1], cc, hc)
                t2 = clock()
                acc[f"layer {i + 1} as two products"] += t1 - t0
                acc[f"layer {i + 1} as a separate gate pass"] += t2 - t1
                inp = h
            t0 = clock()
            update, _ = lstm_fused._readout(x, inp, rest, opt.readout, opt.output_scale, opt.skip_gain, False)
            owned["p"]["w"].add_(update)
            st["feat"] = feat
            acc["readout and update"] += clock() - t0

    parts = ["input features", "layer 1: products and gates in one pass",
             "layer 2: products and gates in one pass", "readout and update"]
    apart = ["layer 1 as two products", "layer 1 as a separate gate pass", "layer 2 as two products",
             "layer 2 as a separate gate pass"]
    refs = {"whole step (step_, in place)": step,
            "reference product [N,40]@[40,80]": lambda: torch.mm(a, b),
            "torch.sigmoid over [N,80]": lambda: torch.sigmoid(z)}
    for f in refs.values():  # warm-up (the kernel's build, the scratch matrix, the allocator)
        f()
    ts: dict[str, list[float]] = {k: [] for k in [*refs, *parts, *apart]}
    for _ in range(args.repeats):
        for k, f in refs.items():
            t0 = clock()
            for _ in range(args.inner):
                f()
            ts[k].append((clock() - t0) / args.inner * 1e3)
        acc = dict.fromkeys(parts + apart, 0.0)
        for _ in range(args.inner):
            replica(acc)
        for k in parts + apart:
            ts[k].append(acc[k] / args.inner * 1e3)
    m = {k: statistics.median(v) for k, v in ts.items()}
    step_ms = m["whole step (step_, in place)"]
    mmeq = m["reference product [N,40]@[40,80]"] * 5414 / 3200
    units = 2 * N * H  # hidden units per step (both layers)
    sig_per_unit = m["torch.sigmoid over [N,80]"] / (N * 80) * 5  # five exp + divisions per unit
    print(f"LSTM {opt.layers}x{H}, {N} coordinates, one thread, CPU ms per step (median of {args.repeats} "
          f"rounds of {args.inner})\n")
    print("| part (timed inside a replica of the step) | ms | share of `step_` |\n|---|---:|---:|")
    for k in parts:
        print(f"| {k} | {m[k]:.3f} | {m[k] / step_ms:.0%} |")
    total = sum(m[k] for k in parts)
    print(f"| the parts' sum (the rest: the gradient's concatenation, Python) | {total:.3f} | {total / step_ms:.0%} |")
    print(f"| **`opt.step_`**, timed whole | **{step_ms:.3f}** | 100% |\n")
    one = m["layer 1: products and gates in one pass"] + m["layer 2: products and gates in one pass"]
    prods = m["layer 1 as two products"] + m["layer 2 as two products"]
    gates = m["layer 1 as a separate gate pass"] + m["layer 2 as a separate gate pass"]
    prod_eq = m["reference product [N,40]@[40,80]"] * (27 + 40) * 80 / 3200
    print(f"step / matmul of equal FLOPs: {step_ms / mmeq:.2f}x (the reference product at "
          f"{2 * N * 40 * 80 / m['reference product [N,40]@[40,80]'] / 1e6:.1f} GFLOP/s)")
    print(f"the two layers in one pass each: {one:.3f} ms; as BLAS products + a gate pass (the path with a graph): "
          f"{prods:.3f} + {gates:.3f} = {prods + gates:.3f} ms ({one / (prods + gates):.2f}x)")
    print(f"PyTorch's own floor for the same work: the reference product for the products' FLOPs "
          f"{prod_eq:.3f} ms + five torch.sigmoid elements per hidden unit {sig_per_unit * units:.3f} ms = "
          f"{prod_eq + sig_per_unit * units:.3f} ms -> one pass / that floor {one / (prod_eq + sig_per_unit * units):.2f}x")
    print(f"separate gate pass: {gates / units * 1e6:.2f} ns per hidden unit (five torch.sigmoid elements: "
          f"{sig_per_unit * 1e6:.2f} ns)")
    return {**m, "step_over_mm": step_ms / mmeq, "one_pass_over_separate": one / (prods + gates),
            "one_pass_over_floor": one / (prod_eq + sig_per_unit * units)}


if __name__ == "__main__":
    main()
