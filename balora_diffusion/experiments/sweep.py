"""Sweeps: the cross product of methods, learning rates, seeds and any training option, one
`balora train` run folder per cell, run here or on a SLURM cluster, then summarised.

A sweep is resumable as a whole: a finished cell (its cell.json) is kept, an interrupted one
continues from its newest checkpoint, so rerunning the same command finishes the sweep.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from balora_diffusion import paths
from balora_diffusion.atomic import atomic_path, is_leftover, write_json_atomic
from balora_diffusion.experiments.cell import cell_result, run_cell
from balora_diffusion.checkpoint_scoring import MODEL_METRICS as SWEEP_METRICS
from balora_diffusion.checkpoint_scoring import twice_problem
from balora_diffusion.config import field, parse_flag, read_toml
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import check_writable
from balora_diffusion.run_layout import (CELL_LOG, CELL_RECORD, CELL_SAMPLE, GRID, SUBMITIT, SUMMARY, SUMMARY_TABLE,
                                         SWEEP_FILES, cell_name)
from balora_diffusion.train_config import SEED, TrainConfig

# Set by the cell itself, never by --set.
CELL_KEYS = ("method", "lr_unet", "lr_text", "seed", "output_dir", "resume", "overwrite")
POLL_SECONDS = 1.0
DEFAULT_FUSIONS = [0.7, 1.0]
SORT_KEYS = ("heldout-loss", "fidelity", "adherence", *SWEEP_METRICS)


def _first_problem(parse, texts: list[str]) -> str | None:
    """What `parse` says about the first of `texts` it refuses (a config field's check)."""
    for text in texts:
        try:
            parse(text)
        except (UserError, ValueError) as exc:
            return str(exc)
    return None


def _parse_method(method: str):
    from balora_diffusion.rules.registry import parse_method  # imports torch

    return parse_method(method)


def parse_lr(text: str) -> tuple[float, float] | float:
    """A factor ("0.5") or an explicit UNet:text pair ("1e-4:1e-5"); ValueError if neither."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 2 or not all(math.isfinite(p) and p > 0 for p in parts):
        raise ValueError(f"{text!r} is neither a positive factor (0.5) nor a UNET:TEXT pair of positive rates "
                         "(1e-4:1e-5)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_set(text: str) -> tuple[str, list]:
    """"key=v1,v2" -> (key, checked values); a list option's elements are separated by spaces."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    options = {f for f in TrainConfig.__dataclass_fields__}
    if not sep or key not in options:
        raise UserError(f"--set {text!r}: expected KEY=V1,V2 with KEY a training option")
    if key in CELL_KEYS:
        raise UserError(f"--set {key}: the sweep sets it in every cell; use --methods / --lrs / --seeds / --out")
    is_list = TrainConfig.__dataclass_fields__[key].default_factory is not dataclasses.MISSING
    return key, [parse_flag(TrainConfig, key, v.split() if is_list else v.strip(), f"--set {key}")
                 for v in values.split(",")]


@dataclass
class SweepConfig:
    def __post_init__(self) -> None:
        from balora_diffusion.config import check_config

        check_config(self)

    config: str = field("", "training config every cell starts from: a TOML file or a shipped config's name "
                            "(as for balora train); empty = the training defaults", path=True,
                        not_paths=paths.shipped_configs())
    methods: list[str] = field(["lora", "balora"], "update rules, one column of cells each", nonempty=True,
                               check=lambda v: _first_problem(_parse_method, v))
    lrs: list[str] = field(["1"], "learning rates: a factor on the config's lr_unet and lr_text (0.5), or an "
                                  "explicit UNET:TEXT pair (1e-4:1e-5)", nonempty=True,
                                  check=lambda v: _first_problem(parse_lr, v))
    seeds: list[int] = field([0], "training seeds", nonempty=True, **SEED)
    set: list[str] = field([], "any other training option: KEY=V1,V2 sweeps it, KEY=V sets it in every cell "
                               "(a list option's elements separated by spaces)",
                               check=lambda v: _first_problem(parse_set, v))
    out: str = field("runs/sweep", "sweep folder: a run folder per cell, summary.json, summary.md, grid.png",
                     nonempty=True, path=True)
    workers: int = field(1, "cells at once: local worker processes, or jobs queued with --launcher submitit", ge=1)
    launcher: str = field("local", "local (this machine) or submitit (SLURM through submitit: pip install "
                                   "'balora-diffusion[slurm]')", choices=["local", "submitit"])
    score: bool = field(True, "score each cell's final adapter: fidelity and prompt adherence when data_dir holds a "
                              "concept.toml, and the metrics (see metrics)")
    metrics: list[str] = field([], "balora eval's metrics of each cell's final adapter: clip-t, clip-i, dino; empty = "
                                   "clip-t and clip-i on a concept without concept.toml where a CLIP model is at hand "
                                   "(clip, else balora eval's default), none on the world concept",
                               choices=list(SWEEP_METRICS), check=twice_problem)
    clip: str = field("", "CLIP model of clip-t and clip-i: a folder or a hub id in the local cache; empty = "
                          "balora eval's default")
    dino: str = field("", "DINO / DINOv2 model of dino: a folder or a hub id in the local cache; empty = balora "
                          "eval's default")
    sort_by: str = field("", "order summary.md's rows by this score at the highest fusion coefficient, best first "
                             "(heldout-loss: lowest first); empty = the cells' order", choices=["", *SORT_KEYS])
    fusions: list[float] = field(DEFAULT_FUSIONS, "fusion coefficients (LoRA strength) of the scored images",
                                 nonempty=True, ge=0)
    score_seeds: list[int] = field([1], "sampling seeds of the scored images", nonempty=True, **SEED)
    unseen_contexts: int = field(6, "contexts the concept never appeared in, scored beside its eval prompts", ge=0)
    cluster: str = field("auto", "submitit executor: auto (SLURM where sbatch exists, else local processes), "
                                 "slurm, local", choices=["auto", "slurm", "local"])
    slurm_partition: str = field("", "SLURM partition (empty: the cluster's default)")
    timeout_min: int = field(120, "SLURM time limit per cell in minutes", ge=1)
    gpus_per_node: int = field(1, "GPUs per SLURM job", ge=0)
    cpus_per_task: int = field(4, "CPUs per SLURM job", ge=1)
    mem_gb: float = field(32.0, "memory per SLURM job in GiB", gt=0)


@dataclass(frozen=True)
class Cell:
    name: str
    labels: dict
    values: dict  # TrainConfig keyword arguments


def _label(value) -> str:
    text = " ".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("/", "_").replace(" ", "_")


def expand(sweep: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, each one's TrainConfig checked; methods vary slowest, seeds fastest."""
    base = read_toml(TrainConfig, Path(sweep.config)) if sweep.config else {}
    defaults = TrainConfig()
    sets = dict(parse_set(text) for text in sweep.set)
    constant = {k: v[0] for k, v in sets.items() if len(v) == 1}
    swept = {k: v for k, v in sets.items() if len(v) > 1}
    base = {**base, **constant}
    if sweep.workers > 1 and sweep.launcher == "local" and not base.get("cpu_threads"):
        base["cpu_threads"] = max(1, (os.cpu_count() or 1) // sweep.workers)  # workers must not fight for cores
    if not Path(base.get("data_dir", "")).is_dir() or not base.get("data_dir"):
        raise UserError(f"data_dir {base.get('data_dir', '')!r} is no folder: name the concept's images in the training "
                        "config or with --set data_dir=FOLDER")
    lr_unet, lr_text = base.get("lr_unet", defaults.lr_unet), base.get("lr_text", defaults.lr_text)
    cells = []
    for method, lr_text_arg, combo, seed in itertools.product(
            sweep.methods, sweep.lrs, itertools.product(*swept.values()), sweep.seeds):
        lr = parse_lr(lr_text_arg)
        rates = (lr * lr_unet, lr * lr_text) if isinstance(lr, float) else lr
        lr_label = f"x{lr:g}" if isinstance(lr, float) else f"{rates[0]:g}:{rates[1]:g}"
        options = dict(zip(swept, combo))
        name = cell_name(method, lr_label, {k: _label(v) for k, v in options.items()}, seed)
        values = {**base, **options, "method": method, "lr_unet": rates[0], "lr_text": rates[1], "seed": seed,
                  "output_dir": str(Path(sweep.out) / name)}
        TrainConfig(**values)  # every cell's problem before the first one trains
        labels = {"method": method, "lr": lr_label, "lr_unet": rates[0], "lr_text": rates[1],
                  **{k: _label(v) for k, v in options.items()}, "seed": seed}
        cells.append(Cell(name, labels, values))
    if len({c.name for c in cells}) < len(cells):
        raise UserError("two cells of the sweep would share a run folder: a method, lr or seed is given twice")
    return cells


def check_sweep_folder(out: Path, cells: list[Cell]) -> None:
    """Refuse an --out that is a file, cannot be written in, or holds anything but a sweep's own
    output: this sweep's cells, cells of an earlier grid in the same folder (a sweep grows by
    rerunning it with more values), its summary files, and the debris of killed writes. Where the
    folder holds someone's run or files, the cells' run folders and the summary would be mixed in."""
    check_writable(out / SWEEP_FILES[0])
    names = {c.name for c in cells} | set(SWEEP_FILES)
    for entry in sorted(out.iterdir()) if out.is_dir() else ():
        if not (entry.name in names or is_leftover(entry) or _is_cell(entry)):
            raise UserError(f"--out {out} holds {entry.name}, which no sweep wrote: a sweep writes only into a new "
                            "folder or its own (give another --out)")


def _is_cell(folder: Path) -> bool:
    return folder.is_dir() and ((folder / CELL_RECORD).is_file() or (folder / CELL_LOG).is_file())


def scoring_settings(sweep: SweepConfig, cells: list[Cell]) -> dict | None:
    """How cells are scored (see cell_scores.score_cell), or None where there is nothing to score: no
    concept.toml for the pixel scores and no metric asked for or CLIP model at hand. A metric model
    that was named and is not here fails now, before any cell trains."""
    if not sweep.score:
        return None
    values = cells[0].values
    data_dir = values.get("data_dir", "")
    world = (Path(data_dir) / "concept.toml").is_file()
    metrics, models = list(sweep.metrics), {}
    if metrics:
        models = _metric_models(metrics, sweep)
    elif not world:
        try:
            models = _metric_models(["clip-t", "clip-i"], sweep)
            metrics = ["clip-t", "clip-i"]
        except UserError as exc:
            if sweep.clip:
                raise
            print(f"balora: warning: no CLIP model at hand to score the cells ({exc}); give --clip MODEL",
                  file=sys.stderr)
    if not world and not metrics:
        return None
    defaults = TrainConfig()
    return {"concept": data_dir if world else "", "fusions": sweep.fusions, "seeds": sweep.score_seeds,
            "unseen": sweep.unseen_contexts,
            "sample_steps": values.get("sample_steps", defaults.sample_steps),
            "guidance_scale": values.get("guidance_scale", defaults.guidance_scale),
            "metrics": {"names": metrics, **{name: loaded.source for name, loaded in models.items()}} if metrics
            else None}


def check_sort_by(sort_by: str, scoring: dict | None) -> None:
    """Refuse, before any cell trains, to sort summary.md by a score that no cell will have."""
    scored = ["heldout-loss"]
    if scoring and scoring["concept"]:
        scored += ["fidelity", "adherence"]
    if scoring and scoring["metrics"]:
        scored += scoring["metrics"]["names"]
    if sort_by and sort_by not in scored:
        raise UserError(f"--sort-by {sort_by}: the cells are not scored by it (they get {', '.join(scored)}); "
                        + ("fidelity and adherence need a concept.toml in data_dir" if sort_by in ("fidelity", "adherence")
                           else "add it to --metrics, with --score true"))


def _metric_models(metrics: list[str], sweep: SweepConfig) -> dict:
    from balora_diffusion.checkpoint_scoring import load_models

    return load_models(metrics, sweep.clip, sweep.dino)


class _Done:
    """A cell run in this process, shaped like a launcher's handle."""

    def __init__(self, result: dict):
        self._result = result

    def done(self) -> bool:
        return True

    def result(self) -> dict:
        return self._result


def _submitit_executor(sweep: SweepConfig):
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher submitit needs the submitit package: pip install 'balora-diffusion[slurm]'") from None
    executor = submitit.AutoExecutor(folder=Path(sweep.out) / SUBMITIT,
                                     cluster=None if sweep.cluster == "auto" else sweep.cluster)
    executor.update_parameters(name="balora-sweep", timeout_min=sweep.timeout_min, gpus_per_node=sweep.gpus_per_node,
                               cpus_per_task=sweep.cpus_per_task, mem_gb=sweep.mem_gb,
                               **({"slurm_partition": sweep.slurm_partition} if sweep.slurm_partition else {}))
    return executor


def _submitter(sweep: SweepConfig, scoring: dict | None):
    """submit(cell) -> a handle with done() and result(), and a shutdown(cancel) for the end."""
    if sweep.launcher == "submitit":
        executor = _submitit_executor(sweep)
        jobs = []

        def submit(cell: Cell):
            jobs.append(executor.submit(run_cell, cell.name, cell.labels, cell.values, scoring))
            return jobs[-1]

        def shutdown(cancel: bool) -> None:
            for job in jobs if cancel else ():
                if not job.done():
                    job.cancel(check=False)
        return submit, shutdown
    if sweep.workers == 1:
        return (lambda cell: _Done(run_cell(cell.name, cell.labels, cell.values, scoring))), (lambda cancel: None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=sweep.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker)

    def shutdown(cancel: bool) -> None:
        pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if cancel:
            # an interrupt sent to this process alone (kill -INT PID, a scheduler) reaches no worker, and
            # cancel_futures stops only the cells not started: end the running trainings here; their
            # checkpoints are written whole (temporary name, then rename), so they resume from the last
            for worker in multiprocessing.active_children():
                worker.terminate()
            for worker in multiprocessing.active_children():
                worker.join(timeout=60)
    return (lambda cell: pool.submit(run_cell, cell.name, cell.labels, cell.values, scoring)), shutdown


def _start_worker() -> None:
    """A worker drops the notices the command drops (it never runs cli.main), and gives tqdm a
    thread lock: tqdm's default also takes a multiprocessing lock, a named semaphore registered with
    the pool's resource tracker, which a killed worker (by the OOM killer, say) never unlinks, so the
    tracker would warn about leaked semaphores when the sweep ends. A worker draws its bars alone."""
    import threading

    from tqdm import tqdm

    from balora_diffusion.cli import drop_known_notices

    drop_known_notices()
    tqdm.set_lock(threading.RLock())


def _folder(cell: Cell) -> Path:
    return Path(cell.values["output_dir"]).resolve()


def run_cells(sweep: SweepConfig, cells: list[Cell], scoring: dict | None,
              deadline: float | None = None) -> list[dict | None]:
    """Run the unfinished cells, at most `sweep.workers` at once; the records of all cells, in order.
    Past `deadline` (a time.monotonic() value) no new cell starts: the running ones finish, the
    others stay None for a later run."""
    from tqdm.auto import tqdm

    # keyed by folder: two sweeps run together (one per concept or arm) reuse the same cell names
    results = {_folder(c): cell_result(_folder(c)) for c in cells}
    todo = deque(c for c in cells if results[_folder(c)] is None)
    submit, shutdown = _submitter(sweep, scoring)
    running: list[tuple[Cell, object]] = []
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep", unit="cell")
    try:
        while running or (todo and not _past(deadline)):
            while todo and len(running) < sweep.workers and not _past(deadline):
                cell = todo.popleft()
                running.append((cell, submit(cell)))
            finished = [(c, h) for c, h in running if h.done()]
            if not finished:
                time.sleep(POLL_SECONDS)
                continue
            for cell, handle in finished:
                running.remove((cell, handle))
                try:
                    results[_folder(cell)] = handle.result()
                except Exception as exc:  # a cell's own failure: name it, the finished cells stay
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    raise UserError(f"cell {cell.name} failed ({first}); its log: "
                                    f"{Path(cell.values['output_dir']) / CELL_LOG}. Finished cells are kept: "
                                    "rerun the same command to continue") from None
                bar.update()
                bar.write(describe(results[_folder(cell)]))
        shutdown(False)
    except KeyboardInterrupt:
        shutdown(True)
        raise KeyboardInterrupt("interrupted; run the same command again to continue the sweep: finished cells "
                                "are kept, interrupted ones resume from their last checkpoint") from None
    except BaseException:
        shutdown(True)
        raise
    finally:
        bar.close()
    return [results[_folder(c)] for c in cells]


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def describe(record: dict) -> str:
    parts = [record["name"], record["status"]]
    if record.get("final_heldout_loss") is not None:
        parts.append(f"held-out {record['final_heldout_loss']:.4f}")
    for key in ("fidelity", "adherence", *SWEEP_METRICS):
        for w in (record.get(key) or {}):
            score = _score(record, key, w)
            parts.append(f"{key} w={w} {'-' if score is None else f'{score:.2f}'}")
    parts.append(f"{record['wall_seconds']:.0f} s")
    return ", ".join(parts)


def _score(record: dict, key: str, w: str) -> float | None:
    value = (record.get(key) or {}).get(w)
    return value["all"] if isinstance(value, dict) else value


def sort_records(records: list[dict], key: str, fusions: list[float]) -> list[dict]:
    """`records` best first by `key` (a score at the highest fusion coefficient, or the final held-out
    loss, lowest first); a cell without the value (diverged, unscored) last."""
    if key == "heldout-loss":
        value, sign = (lambda r: r.get("final_heldout_loss")), 1
    else:
        top = f"{max(fusions):g}"
        value, sign = (lambda r: _score(r, key, top)), -1
    return sorted(records, key=lambda r: (value(r) is None, sign * (value(r) or 0.0)))


def summary_markdown(records: list[dict], fusions: list[float], sort_by: str = "") -> str:
    label_keys = list(dict.fromkeys(k for r in records for k in r["labels"] if k not in ("lr_unet", "lr_text")))
    ws = [f"{w:g}" for w in fusions]
    scores = [k for k in ("fidelity", "adherence", *SWEEP_METRICS) if any(r.get(k) for r in records)]
    head = [*label_keys, "status", "final held-out loss", *(f"{k} w={w}" for k in scores for w in ws), "wall s"]

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    if sort_by:
        records = sort_records(records, sort_by, fusions)
    rows = [[*(fmt(r["labels"].get(k)) for k in label_keys), r["status"], fmt(r.get("final_heldout_loss")),
             *(fmt(_score(r, k, w)) for k in scores for w in ws), f"{r['wall_seconds']:.0f}"] for r in records]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    order = f"Rows by {sort_by} (best first).\n\n" if sort_by else ""
    return order + "\n".join(lines) + "\n"


def sweep_grid(path: Path, cells: list[Cell], records: list[dict], prompt: str = "one prompt") -> Path | None:
    """Fig.-1-style grid of one prompt (see run_layout.CELL_SAMPLE): rows = learning rates, columns =
    methods (with any swept option), the first seed of each; None when no cell was scored."""
    from PIL import Image

    from balora_diffusion.generate import write_grid

    first_seed = cells[0].labels["seed"]
    picked = [(c, r) for c, r in zip(cells, records) if c.labels["seed"] == first_seed]
    samples = {c.name: Path(c.values["output_dir"]) / CELL_SAMPLE for c, _ in picked}
    found = [p for p in samples.values() if p.is_file()]
    if not found:
        return None
    with Image.open(found[0]) as im:
        blank = Image.new("RGB", im.size, (200, 200, 200))
    column = lambda c: " ".join([c.labels["method"], *(f"{k}={v}" for k, v in c.labels.items()  # noqa: E731
                                                       if k not in ("method", "lr", "lr_unet", "lr_text", "seed"))])
    rows = list(dict.fromkeys(c.labels["lr"] for c, _ in picked))
    cols = list(dict.fromkeys(column(c) for c, _ in picked))
    table = {(c.labels["lr"], column(c)): c for c, _ in picked}
    images = [[Image.open(samples[table[(r, k)].name]).convert("RGB")
               if (r, k) in table and samples[table[(r, k)].name].is_file() else blank for k in cols] for r in rows]
    return write_grid(path, images, row_labels=[f"lr {r}" for r in rows], col_labels=cols,
                      title=f"{prompt}, one image per cell (the first seed); grey: diverged or unscored")


def write_summary(out: Path, protocol: dict, cells: list[Cell], records: list[dict], fusions: list[float],
                  sort_by: str = "") -> None:
    """OUT/summary.json (the protocol and every cell's record), summary.md (rows by `sort_by`) and grid.png."""
    write_json_atomic(out / SUMMARY, {"protocol": protocol, "cells": records})
    with atomic_path(out / SUMMARY_TABLE) as tmp:
        tmp.write_text(summary_markdown(records, fusions, sort_by), encoding="utf-8")
    scoring = protocol.get("scoring")
    sweep_grid(out / GRID, cells, records, sample_prompt(scoring, cells))


def sample_prompt(scoring: dict | None, cells: list[Cell]) -> str:
    """The prompt of the grid's images (run_layout.CELL_SAMPLE), quoted: the world concept's first scored prompt,
    else the first of the prompts eval's metrics scored the first cell with."""
    from balora_diffusion.experiments.cell_scores import concept_prompts
    from balora_diffusion.concept import load_concept
    from balora_diffusion.concept_eval import Entry, load_subject

    if scoring and scoring["concept"]:
        return repr(concept_prompts(load_concept(scoring["concept"]), scoring["unseen"])[0][0][0])
    folder = Path(cells[0].values["output_dir"])
    try:
        return repr(load_subject(Entry(folder.name, folder, folder), list(cells[0].values.get("token") or [])).prompts[0])
    except (UserError, OSError):  # the first cell never started: its folder holds no config
        return "the first evaluation prompt"


def run_sweep(sweep: SweepConfig) -> list[dict]:
    cells = expand(sweep)
    check_sweep_folder(Path(sweep.out), cells)
    scoring = scoring_settings(sweep, cells)
    check_sort_by(sweep.sort_by, scoring)
    records = run_cells(sweep, cells, scoring)
    write_summary(Path(sweep.out), {"sweep": asdict(sweep), "scoring": scoring}, cells, records, sweep.fusions,
                  sweep.sort_by)
    return records

