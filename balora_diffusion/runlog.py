"""A run's metrics: `metrics.jsonl` (one record per step and metric), TensorBoard, PNG plots.

On resume the JSONL is cut back to the resumed step, so a curve never holds the steps that the
killed run logged after its last checkpoint twice. The training flushes it every step before a
checkpoint can name that step, so a kill -9 loses no step a resumed run starts after; a last line
that the kill cut short is dropped.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import BALANCE_PLOT, HELDOUT_PLOT, LOSS_PLOT, METRICS, SCORES_PLOT, TENSORBOARD

# train --eval-metrics logs each metric as "eval/METRIC" and redraws its plot at every scored step
SCORE_PREFIX = "eval/"
# Plots written at the end of a run: file name -> (title, metric-name prefixes, log y axis)
PLOTS = {
    LOSS_PLOT: ("training loss", ("loss",), True),
    HELDOUT_PLOT: ("held-out denoising loss (fixed image, noise, timestep triples)", ("heldout_loss",), False),
    BALANCE_PLOT: ("balance diagnostics (median over pairs)", ("balance/",), True),
    SCORES_PLOT: ("scores of the adapter (w = 1) at the scored checkpoints", (SCORE_PREFIX,), False),
}


class RunLog:
    def __init__(self, out: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = out / METRICS
        self.out = out
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        for line, rec in self._records():
            if rec["step"] <= resume_step:
                kept.append(line)
                self.series[rec["name"]].append((rec["step"], rec["value"]))
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept))
        self.file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)

    def _records(self) -> list[tuple[str, dict]]:
        text = self.path.read_text() if self.path.is_file() else ""
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()  # every record is written with its newline: this one was cut short by a kill
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append((line, json.loads(line)))
            except ValueError:
                raise UserError(f"{self.path} line {number} is not a JSON record; repair or delete the line "
                                "to resume") from None
        return records

    def scalar(self, step: int, name: str, value: float) -> None:
        if not self.enabled:
            return
        self.series[name].append((step, float(value)))
        self.file.write(json.dumps({"step": step, "name": name, "value": float(value)}) + "\n")
        self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        """Hand what was logged to the OS, where a kill of this process cannot lose it."""
        if self.enabled:
            self.file.flush()
            self.writer.flush()

    def last_values(self) -> dict[str, float]:
        return {name: points[-1][1] for name, points in self.series.items() if points}

    def plots(self) -> None:
        for filename in PLOTS:
            self.plot(filename)

    def plot(self, filename: str) -> None:
        """One of PLOTS, from the series logged so far (none of its series: nothing is written)."""
        names = [n for n in sorted(self.series) if n.startswith(PLOTS[filename][1])]
        if not self.enabled or not names:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        title, _, log_y = PLOTS[filename]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name in names:
            steps, values = zip(*self.series[name])
            ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        if log_y and all(v > 0 for n in names for _, v in self.series[n]):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(self.out / filename) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()
