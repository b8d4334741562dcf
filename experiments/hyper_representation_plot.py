"""The hyper-representation experiment's figure: accuracy vs meta-steps per test shot, and the final bars."""
from __future__ import annotations


def shots_text(k: int | list[int]) -> str:
    """``5`` or, for mixed meta-training, ``1+5``."""
    return "+".join(map(str, k)) if isinstance(k, (list, tuple)) else str(k)


def plot(results: dict, shots: list[int]):
    """Per test shot: the picked meta-training runs' test-class and validation curves (the picked point
    marked) against the baselines' final accuracy; last panel: final accuracy with 95% intervals."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(5.5 * (len(shots) + 1), 4))
    for ax, k in zip(axes, shots):
        r = results[str(k)]
        for key, color in (("hyper_reverse", "C0"), ("hyper_truncated", "C1")):
            c, v, m = r["curves"][key], r["val_curves"][key], r["methods"][key]
            trained = shots_text(m["meta_trained_shots"])
            ax.plot([p[0] for p in c], [p[1] for p in c], "-", color=color,
                    label=f"{key.replace('_', ' ')}, test classes (meta-trained {trained}-shot, "
                          f"meta lr {m['meta_lr']:g})")
            ax.plot([p[0] for p in v], [p[1] for p in v], ":", color=color, label="  validation (selects)")
            ax.plot([m["meta_steps_picked"]], [m["val_accuracy"]], "o", color=color)
        for j, key in enumerate(("supervised", "random", "pixels")):
            ax.axhline(r["methods"][key]["mean"], color=f"C{j + 2}", ls="--", label=f"{key} (final)")
        ax.set(xlabel="meta-step", ylabel="episode accuracy", title=f"{k}-shot: accuracy vs meta-steps")
        ax.legend(fontsize=7)
    names = ["hyper_reverse", "hyper_truncated", "supervised", "random", "pixels"]
    width = 0.8 / len(names)
    for j, m in enumerate(names):
        means = [results[str(k)]["methods"][m]["mean"] for k in shots]
        cis = [results[str(k)]["methods"][m]["ci95"] for k in shots]
        axes[-1].bar([i + (j - 2) * width for i in range(len(shots))], means, width, yerr=cis, capsize=3,
                     label=m.replace("_", " "), color=f"C{j}")
    axes[-1].set_xticks(range(len(shots)), [f"{k}-shot" for k in shots])
    low = min(m["mean"] for k in shots for m in results[str(k)]["methods"].values())
    axes[-1].set(ylabel="test accuracy (mean, 95% interval)", ylim=(max(0.0, low - 0.1), 1),
                 title="final, same test episodes")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig
