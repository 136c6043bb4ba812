"""The synthetic benchmark's figure: median gap curves with inter-quartile bands, one panel per experiment."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from balora_diffusion.bench.outputs import save_figure

# Gaps at or below this are drawn at it: a log axis cannot show 0, and float64
# round-off makes gaps of ~1e-12 * loss meaningless anyway.
GAP_FLOOR = 1e-12


def _drawable(values) -> np.ndarray:
    """Floored at GAP_FLOOR; inf / None (diverged) become NaN, which matplotlib leaves undrawn."""
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    return np.where(np.isfinite(x), np.maximum(x, GAP_FLOOR), np.nan)


def plot_gap_curves(path: Path, panels: Mapping[str, Mapping[str, Mapping[str, list]]]) -> Path:
    """panels: experiment -> method -> {"median_curve", "q25_curve", "q75_curve"} (lists over steps)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for per_method in panels.values() for m in per_method))
    # tab20's saturated colours first, then its light ones: the first ten methods stay distinct
    palette = plt.get_cmap("tab20").colors
    palette = palette[0::2] + palette[1::2]
    colors = {m: "black" if m == "lora" else palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (experiment, per_method) in zip(axes[0], panels.items()):
        medians = []
        for method, stats in per_method.items():
            med, lo, hi = (_drawable(stats[k]) for k in ("median_curve", "q25_curve", "q75_curve"))
            medians.append(med)
            steps = np.arange(len(med))
            style = "--" if "balora" in method or method == "hilora" else "-"
            ax.plot(steps, med, style, color=colors[method], lw=2.0 if method == "lora" else 1.3, label=method)
            ax.fill_between(steps, lo, hi, color=colors[method], alpha=0.15, lw=0)
        ax.set_yscale("log")
        # Diverging runs reach 1e270 and more: show from the best median to 10x the starting gap.
        finite = np.concatenate(medians)
        finite = finite[np.isfinite(finite)]
        if finite.size:
            ax.set_ylim(max(GAP_FLOOR, 0.3 * finite.min()), 10 * np.nanmax([m[0] for m in medians]))
        ax.set_title(experiment.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss - optimal loss (median, IQR band)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    try:
        return save_figure(path, fig)
    finally:
        plt.close(fig)
