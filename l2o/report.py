"""Turning evaluation runs into figures: summaries, results.json / results.md, plots, TensorBoard.

Everything here works on plain dicts of numbers (the content of ``results.json``), so
a saved results file can be re-plotted or re-tabulated without re-running anything:
``markdown(load_results(path))`` gives back the table that was written next to it.
Non-finite numbers are stored as ``None`` (strict JSON).
"""
from __future__ import annotations

import glob
import json
import math
import os
import tempfile
import warnings
from typing import Any, Sequence

import numpy as np

from .evaluate import Rollout
from .speedup import add_speedups, format_speedup, geomean_speedups  # noqa: F401 (suite calls them from here)

FORMAT, VERSION = "l2o-eval", 1


def clean(x: Any) -> Any:
    """A JSON-ready copy of ``x``: non-finite floats become None, tuples lists, numpy scalars Python ones."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _stats(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and standard deviation over the finite values (None if there are none)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std())}


def summarize(runs: Sequence[Rollout], seeds: Sequence[int]) -> dict[str, Any]:
    """Per-optimizer figures over seeds: final loss, test loss/accuracy, curve mean and quartiles.

    Statistics are over the runs that did not diverge; ``diverged`` counts the others.
    """
    curves = np.array([r.curve for r in runs], dtype=float)
    curves[~np.isfinite(curves)] = np.nan
    with warnings.catch_warnings():  # all-NaN steps (every seed diverged) are expected to give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, axis=0)
        q25, q75 = np.nanpercentile(curves, 25, axis=0), np.nanpercentile(curves, 75, axis=0)
    steps = sorted({t for r in runs for t in r.extra.get("test", {})})
    last = [r.extra.get("test", {}).get(max(steps, default=-1), {}) for r in runs]
    checkpoints = []
    for t in steps:
        at = [r.extra["test"].get(t, {}) for r in runs]
        checkpoints.append({"step": t, "test_loss": _stats([m.get("loss") for m in at])["mean"],
                            "test_accuracy": _stats([m.get("accuracy") for m in at])["mean"]})
    return clean({
        "seeds": list(seeds),
        "diverged": sum(r.diverged for r in runs),
        "final_loss": {**_stats([r.final_loss for r in runs]), "per_seed": [r.final_loss for r in runs]},
        "test_loss": _stats([None if r.diverged else m.get("loss") for r, m in zip(runs, last)]),
        "test_accuracy": _stats([None if r.diverged else m.get("accuracy") for r, m in zip(runs, last)]),
        "checkpoints": checkpoints,
        "curve": {"mean": mean.tolist(), "q25": q25.tolist(), "q75": q75.tolist()},
    })


# ---------------------------------------------------------------------------- results files
def save_results(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` as strict JSON, atomically (a reader never sees half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.json.tmp-", suffix=".json", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are shared like every other output
        with os.fdopen(fd, "w") as fh:
            json.dump(clean({"format": FORMAT, "version": VERSION, **results}), fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_results(path: str) -> dict[str, Any]:
    """Read a ``results.json`` written by :func:`save_results` (ValueError if it is not one)."""
    with open(path) as fh:
        results = json.load(fh)
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an l2o evaluation results file")
    return results


def _pm(stat: dict | None, scale: float = 1.0, fmt: str = "{:.4g}", std_fmt: str = "{:.2g}") -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{fmt.format(stat['mean'] * scale)} ± {std_fmt.format(stat['std'] * scale)}"


def _lr(opt: dict) -> str:
    if opt.get("lr") is None:
        return "—"
    text = f"{opt['lr']:.3g}"
    if opt.get("kind") == "learned":
        return f"{text} (learned)"
    return f"{text} (grid edge)" if opt.get("lr_at_edge") else text


def markdown(results: dict[str, Any]) -> str:
    """The results table, one section per task (what ``results.md`` holds and the CLI prints)."""
    cfg = results.get("config", {})
    lines = ["# Evaluation results", ""]
    if cfg:
        lines.append(f"{len(cfg.get('seeds', []))} evaluation seeds; baselines' learning rates tuned on "
                     f"{len(cfg.get('tuning_seeds', []))} other seeds. Mean ± std over seeds.")
        lines.append("")
    for note in results.get("notes", []):
        lines += [f"- {note}", ""]
    header = ("| optimizer | lr | final train loss | test loss | test accuracy (%) | steps to Adam's loss | "
              "speedup vs Adam | diverged |")
    for name, task in results.get("tasks", {}).items():
        lines += [f"## {name}: {task.get('description', task['task'])}, {task['steps']} steps", "",
                  header, "|---|---|---|---|---|---|---|---|"]
        for opt_name, o in task["optimizers"].items():
            reach = "—" if o.get("steps_to_adam") is None else f"{o['steps_to_adam']:.1f}"
            accuracy = _pm(o["test_accuracy"], 100.0, "{:.2f}", "{:.2f}")
            lines.append(f"| {opt_name} | {_lr(o)} | {_pm(o['final_loss'])} | {_pm(o['test_loss'])} | {accuracy} | "
                         f"{reach} | {format_speedup(o.get('speedup_vs_adam'), task['steps'])} | "
                         f"{o['diverged']}/{len(o['seeds'])} |")
        lines.append("")
    lines += _geomean_section(results.get("speedup_vs_adam"))
    if cfg.get("runtime_s") is not None:
        lines.append(f"Evaluated in {cfg['runtime_s']:.0f} s.")
    return "\n".join(lines).rstrip() + "\n"


def _geomean_section(geo: dict[str, Any] | None) -> list[str]:
    """The summary table of :func:`geomean_speedups` (nothing when there is none, e.g. Adam not evaluated)."""
    if not geo:
        return []
    lines = ["## Speedup over tuned Adam, geometric mean over tasks", "",
             "| optimizer | geometric mean | tasks | ahead of Adam | at a bound (≥ T or ≤ 1/T) |",
             "|---|---|---|---|---|"]
    for name, g in geo.items():
        mean = "—" if g["geomean"] is None else f"{g['geomean']:.3g}x"
        tasks = f"{g['tasks']}" + (f" ({g['undefined']} undefined: both diverged)" if g["undefined"] else "")
        lines.append(f"| {name} | {mean} | {tasks} | {g['ahead']}/{g['tasks']} | {g['bounds']} |")
    return lines + [""]


def write_tables(out: str, results: dict[str, Any]) -> str:
    """Write ``out/results.json`` and ``out/results.md``; returns the markdown."""
    save_results(os.path.join(out, "results.json"), results)
    text = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    return text


# ---------------------------------------------------------------------------- plots and TensorBoard
def plot_task(path: str, name: str, task: dict[str, Any]) -> None:
    """``path``: training loss vs step on a log scale, seed mean and interquartile band per optimizer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for opt_name, o in task["optimizers"].items():
        mean, lo, hi = (np.array([np.nan if v is None else v for v in o["curve"][k]], dtype=float)
                        for k in ("mean", "q25", "q75"))
        steps = np.arange(len(mean))
        label = opt_name + (f" (lr {o['lr']:.3g})" if o.get("lr") is not None else "")
        if o.get("speedup_vs_adam") is not None and opt_name != "adam":
            label += f", {format_speedup(o['speedup_vs_adam'], task['steps'])} vs Adam"
        if o["diverged"]:
            label += f", {o['diverged']}/{len(o['seeds'])} diverged"
        line, = ax.plot(steps, mean, label=label, lw=1.5)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    adam_final = task["optimizers"].get("adam", {}).get("final_loss", {}).get("mean")
    if adam_final is not None:  # the loss the speedups are measured against
        ax.axhline(adam_final, color="0.3", ls=":", lw=1, label="Adam's final loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    ax.set_title(f"{name}: {task.get('description', task['task'])}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_speedups(path: str, results: dict[str, Any]) -> None:
    """``path``: each optimizer's speedup over tuned Adam per task (log scale), its geometric mean in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    geo = results.get("speedup_vs_adam") or {}
    names = list(results.get("tasks", {}))
    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(names)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(geo))
    for k, (opt_name, g) in enumerate(geo.items()):
        values = [results["tasks"][n]["optimizers"].get(opt_name, {}).get("speedup_vs_adam") for n in names]
        x = [i + (k - (len(geo) - 1) / 2) * width for i in range(len(names))]
        mean = "—" if g["geomean"] is None else f"{g['geomean']:.3g}x"
        heights = [np.nan if v is None else v - 1.0 for v in values]  # bars from 1 up (ahead) or down (behind)
        bars = ax.bar(x, heights, width, bottom=1.0, label=f"{opt_name} (geometric mean {mean})")
        ax.bar_label(bars, [format_speedup(v, results["tasks"][n]["steps"]) for v, n in zip(values, names)],
                     fontsize=7)
    ax.axhline(1.0, color="0.3", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup (log scale)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_title("speedup over tuned Adam per task\n> 1: fewer steps to Adam's final loss; "
                 "< 1: Adam needs fewer to this one's final loss", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if geo:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_tensorboard(folder: str, opt: dict[str, Any]) -> None:
    """One TensorBoard run for one optimizer on one task (the same tags in every run, so they overlay).

    ``train/loss`` per step (seed mean), ``test/loss`` and ``test/accuracy`` at the
    checkpoints, ``final/train_loss`` at the last step. Event files of an earlier
    evaluation in ``folder`` are replaced, not doubled.
    """
    from torch.utils.tensorboard import SummaryWriter

    for old in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        os.remove(old)
    with SummaryWriter(folder) as w:
        for t, v in enumerate(opt["curve"]["mean"]):
            if v is not None:
                w.add_scalar("train/loss", v, t)
        for c in opt["checkpoints"]:
            for tag in ("test_loss", "test_accuracy"):
                if c[tag] is not None:
                    w.add_scalar(tag.replace("_", "/", 1), c[tag], c["step"])
        if opt["final_loss"]["mean"] is not None:
            w.add_scalar("final/train_loss", opt["final_loss"]["mean"], len(opt["curve"]["mean"]))
        w.add_text("optimizer", f"{opt['kind']}: {opt['source']}; lr {opt.get('lr')}")
