"""The scores of runs for the runs table: CLIP-T, CLIP-I, DINO, fidelity and adherence, from
`balora eval`'s eval.json files anywhere in the runs folder (the entry of a run's final adapter, at
its largest fusion coefficient) or, where no eval scored a run, from the last scored checkpoint its
training logged (`balora train --eval-metrics`: "eval/METRIC" in metrics.jsonl, at w = 1).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from balora_diffusion.run_layout import EVAL_RECORD
from balora_diffusion.runlog import SCORE_PREFIX
from balora_diffusion.runs import RunInfo, own_file, read_metrics

METRICS = ["clip-t", "clip-i", "dino", "fidelity", "adherence"]  # balora eval's, in its order


def _eval_files(root: Path) -> list[Path]:
    """Every eval.json below `root` that is its own file (not a link out), hidden folders skipped."""
    return [found for path in sorted(Path(root).rglob(EVAL_RECORD))
            if not any(part.startswith(".") for part in path.relative_to(root).parts)
            and (found := own_file(root, path.relative_to(root)))]


def evaluated(root: Path, runs: list[RunInfo]) -> dict[str, dict[str, float]]:
    """Run name -> {metric: score} of its final adapter (else its latest step) at the largest
    fusion coefficient any eval.json below `root` scored it at; the newest file wins a tie."""
    folders = {run.path: run.name for run in runs}
    best: dict[str, tuple] = {}
    for path in sorted(_eval_files(root), key=lambda p: p.stat().st_mtime_ns):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            results = list(record.get("results") or [])
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # unreadable or half-written: the run is listed without it
        for result in results:
            if not isinstance(result, dict):
                continue
            source = Path(str(result.get("source") or "")).resolve()
            name = next((folders[p] for p in [source, *source.parents] if p in folders), None)
            if name is None:
                continue
            step = result.get("step")
            rank = (math.inf if step is None else float(step), float(result.get("fusion") or 0))
            scores = {m: float(result[m]) for m in METRICS if isinstance(result.get(m), (int, float))}
            if scores and (name not in best or rank >= best[name][0]):
                best[name] = (rank, scores)
    return {name: scores for name, (_, scores) in best.items()}


def logged(run: RunInfo) -> dict[str, float]:
    """{metric: score} at the last step the training scored (train --eval-metrics)."""
    metrics = read_metrics(run.path)
    return {m: metrics[SCORE_PREFIX + m][-1][1] for m in METRICS if metrics.get(SCORE_PREFIX + m)}


def scores(root: Path, runs: list[RunInfo]) -> dict[str, dict[str, float]]:
    """Run name -> its scores (eval.json's, else its training's own); runs without any left out."""
    from_eval = evaluated(root, runs)
    found = {run.name: from_eval.get(run.name) or logged(run) for run in runs}
    return {name: values for name, values in found.items() if values}


def columns(found: dict[str, dict[str, float]]) -> list[str]:
    """The score columns the table needs: the metrics any run has, in balora eval's order."""
    return [m for m in METRICS if any(m in values for values in found.values())]
