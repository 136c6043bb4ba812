"""One cell of a sweep: a `balora train` run folder, trained (or resumed) and scored.

`run_cell` is what every launcher runs, in this process, a local worker process or a SLURM job;
it takes and returns plain data only, so it pickles. A finished cell leaves `cell.json` beside the
run's own files (run.json, config.json, metrics.jsonl, adapter/, ...): its status, the held-out
loss curve, fidelity and prompt adherence, and wall time. Running a cell again returns that file;
a cell whose training was interrupted continues from its newest intact checkpoint.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.run_layout import CELL_LOG, CELL_RECORD, CHECKPOINTS, METRICS, RUN


def cell_result(folder: Path) -> dict | None:
    """The finished cell's record, or None if the cell has not finished."""
    path = Path(folder) / CELL_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _start_mode(out: Path) -> dict:
    """How a training into `out` starts: afresh, resumed from its newest intact checkpoint, or over
    the debris of a run killed before its first checkpoint."""
    from balora_diffusion import checkpoint as ckpt
    from balora_diffusion.runfolder import held_outputs

    if ckpt.newest_intact(out / CHECKPOINTS)[0] is not None:
        return {"resume": "latest"}
    return {"overwrite": bool(held_outputs(out))}


def _curve(out: Path, name: str) -> list[list[float]]:
    path = out / METRICS
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [[r["step"], r["value"]] for r in records if r["name"] == name]


def run_cell(name: str, labels: dict, values: dict, scoring: dict | None) -> dict:
    """Train the TrainConfig `values` (its output_dir is the cell's folder) unless run.json says it
    is trained, score it with `scoring` (see score_cell; None: no pixel scores), write cell.json.
    What the training prints goes to the cell's cell.log: a sweep shows one line per cell."""
    out = Path(values["output_dir"])
    if (done := cell_result(out)) is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    with (out / CELL_LOG).open("a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        record = _train_and_score(name, labels, values, scoring)
    write_json_atomic(out / CELL_RECORD, record)
    return record


def _train_and_score(name: str, labels: dict, values: dict, scoring: dict | None) -> dict:
    from balora_diffusion.train import TrainingDiverged, train
    from balora_diffusion.train_config import TrainConfig

    out = Path(values["output_dir"])
    started, cpu_started = time.perf_counter(), time.process_time()
    record = {"name": name, "labels": labels, "status": "done", "error": None, "fidelity": None, "adherence": None}
    if not (out / RUN).is_file():
        try:
            train(TrainConfig(**values, **_start_mode(out)))
        except TrainingDiverged as exc:
            record.update(status="diverged", error=str(exc))
            print(f"balora sweep: cell {name} diverged: {exc}", file=sys.stderr)
    run = json.loads((out / RUN).read_text()) if record["status"] == "done" else {}
    curve = _curve(out, "heldout_loss")
    record.update(final_heldout_loss=run.get("final", {}).get("heldout_loss"), heldout_loss=curve,
                  steps=values.get("steps"), training_seconds=run.get("seconds"), resumed_from=run.get("resumed_from"))
    if scoring is not None and record["status"] == "done":
        from balora_diffusion.experiments.cell_scores import score_cell

        record.update(score_cell(out, values, scoring))
    # CPU time too: on a shared machine it says what the cell costs, whatever else was running
    record.update(wall_seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started)
    return record
