"""Training curves of several runs in one figure: one colour per method, so methods overlay."""
from __future__ import annotations

import math
from collections.abc import Sequence

from balora_diffusion.runlog import SCORE_PREFIX
from balora_diffusion.runs import RunInfo, read_metrics

# metric -> (panel title, log y axis)
PANELS = {
    "loss": ("training loss (moving average over 10 steps)", True),
    "heldout_loss": ("held-out loss", False),
    "balance/imbalance_median": ("imbalance |AA^T - B^T B| / |AA^T|, median over pairs", True),
    "balance/cond_A_median": ("condition number of A, median over pairs", True),
    "balance/cond_B_median": ("condition number of B, median over pairs", True),
}
SMOOTHED = {"loss": 10}


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` before it."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def figure(runs: Sequence[RunInfo]):
    """A matplotlib figure with one panel per metric in PANELS that any of `runs` logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {run.name: read_metrics(run.path) for run in runs}
    logged = {name for run in runs for name, points in metrics[run.name].items() if points}
    # the scores a training logged (train --eval-metrics), one panel each after the losses
    panels = [name for name in [*PANELS, *sorted(n for n in logged if n.startswith(SCORE_PREFIX))] if name in logged]
    fig, axes = plt.subplots(max(1, math.ceil(len(panels) / 2)), 2 if len(panels) > 1 else 1,
                             figsize=(11, 2.8 * max(1, math.ceil(len(panels) / 2))), squeeze=False)
    methods = sorted({run.method for run in runs})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    for ax, name in zip(axes.flat, panels):
        title, log_y = PANELS.get(name, (f"score {name.removeprefix(SCORE_PREFIX)} (w = 1, higher is better)", False))
        positive = True
        for i, run in enumerate(runs):
            points = metrics[run.name].get(name)
            if not points:
                continue
            steps = [s for s, _ in points]
            values = moving_average([v for _, v in points], SMOOTHED.get(name, 1))
            positive &= all(v > 0 for v in values)
            same_method = [r.name for r in runs if r.method == run.method]
            ax.plot(steps, values, color=colours[run.method], linestyle=styles[same_method.index(run.name) % 4],
                    label=f"{run.method}: {run.name}", marker="." if len(steps) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if log_y and positive:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if panels:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)  # gradio draws it from the object; pyplot need not keep it
    return fig
