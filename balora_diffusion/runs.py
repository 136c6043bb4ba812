"""The run folders under a runs folder: which there are, what each trained, and what it holds.

Names of runs come from outside (a web page, a script): `resolve_run` accepts only a name that
leads, with every symlink followed, to a run folder inside the runs folder, so that neither `..`,
an absolute path nor a link out of the folder reaches anything else. Every file read or handed
out is checked the same way (`inside`, `own_file`): a file of a run that links out of it is
treated as absent.
"""
from __future__ import annotations

import fcntl
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import (CONFIG, DIFFUSERS_FOLDER, KOHYA_FOLDER, LOCK, MANIFEST, METRICS, RUN,
                                         RUN_MARKERS)

# A sweep keeps its cells in a folder of its own, and runs folders are often grouped by project:
# runs are looked for this many folders down, no further.
MAX_DEPTH = 3
# run.json's "final" keys and the metrics' names: what the listing shows of a run's training
HELDOUT = "heldout_loss"


@dataclass
class RunInfo:
    name: str                 # path below the runs folder, with "/" between folders
    path: Path                # resolved
    state: str                # "finished", "training" or "stopped" (interrupted or failed)
    method: str = "?"
    lr_unet: float = math.nan
    lr_text: float = math.nan
    lr_embedding: float = math.nan
    rank: int = 0
    seed: int = 0
    steps: int = 0            # the steps it was asked for
    step: int = 0             # the last step it logged
    heldout_loss: float = math.nan
    tokens: list[str] = field(default_factory=list)
    init_word: str = ""       # the word its tokens' embeddings started from
    prompt: str = ""          # its first validation prompt: a sensible default to draw it with

    def row(self) -> list:
        """The run as one row of a table: what the app lists and `list_runs` returns."""
        return [self.name, self.method, self.lr_unet, self.lr_text, self.rank, self.seed,
                f"{self.step}/{self.steps}", None if math.isnan(self.heldout_loss) else round(self.heldout_loss, 5),
                self.state]


COLUMNS = ["run", "method", "lr_unet", "lr_text", "rank", "seed", "steps", "heldout_loss", "state"]


def inside(root: Path, path: Path) -> Path:
    """`path` with every symlink followed, if that lies inside `root` (also resolved); else a UserError."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if not real.is_relative_to(real_root):
        raise UserError(f"{path} lies outside {root}")
    return real


def own_file(folder: Path, name: str | Path) -> Path | None:
    """`folder`/`name` resolved, if it is a file that stays inside `folder` once symlinks are
    followed; else None."""
    try:
        real = inside(folder, Path(folder) / name)
    except UserError:
        return None
    return real if real.is_file() else None


def is_run(folder: Path) -> bool:
    """Whether `folder` holds a run. A checkpoint folder holds a config.json too (its training state's
    config tree): one with a checkpoint's manifest is a checkpoint, never a run."""
    return not own_file(folder, MANIFEST) and any(own_file(folder, marker) for marker in RUN_MARKERS)


def _run_path(root: Path, name: str) -> Path:
    """`root` / `name` for a name of one to MAX_DEPTH plain folder names separated by "/"."""
    parts = str(name).split("/")
    if not name or len(parts) > MAX_DEPTH or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p
                                                  or "\0" in p for p in parts):
        raise UserError(f"not a run name: {name!r} (folder names separated by /, none hidden, at most "
                        f"{MAX_DEPTH})")
    return Path(root, *parts)


def resolve_run(root: Path, name: str) -> Path:
    """The run folder that `name` (as `list_runs` gives it) names inside `root`, resolved."""
    folder = inside(root, _run_path(root, name))
    if not folder.is_dir() or not is_run(folder):
        raise UserError(f"no run {name!r} in {root}")
    return folder


def new_run_folder(root: Path, name: str) -> Path:
    """Where a new run `name` goes inside `root`: refused if anything is there already."""
    path = _run_path(root, name)
    if path.exists() or path.is_symlink():
        raise UserError(f"{name!r} exists in {root} already: choose another run name")
    for folder in path.parents:  # the nearest folder there is on the way must not be a link out
        if folder.exists():
            inside(root, folder)
            break
        if folder == Path(root):
            break
    return path


def list_runs(root: Path) -> list[RunInfo]:
    """Every run folder below `root` (a folder holding config.json or run.json), by name. Hidden
    folders (the app's cache) are skipped, and so is a symlink that leads out of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs folder not found: {root}")
    found: list[RunInfo] = []
    pending = [(root, ())]
    while pending:
        folder, parts = pending.pop()
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                inside(root, child)
            except UserError:
                continue
            name = (*parts, child.name)
            if is_run(child):
                found.append(read_run(root, "/".join(name)))
            elif len(name) < MAX_DEPTH:
                pending.append((child, name))
    return sorted(found, key=lambda run: run.name)


def read_json(folder: Path, name: str) -> dict:
    path = own_file(folder, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}  # unreadable or half-written by a run that is starting: listed with what else is known
    return data if isinstance(data, dict) else {}


def _training(folder: Path) -> bool:
    """Whether a training holds the run folder's lock (runfolder.RunFolder) right now."""
    lock = own_file(folder, LOCK)
    if lock is None:
        return False
    try:
        with lock.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        pass
    return False


def read_run(root: Path, name: str) -> RunInfo:
    folder = resolve_run(root, name)
    run = read_json(folder, RUN)
    config = run.get("config") or read_json(folder, CONFIG)
    metrics = read_metrics(folder)
    last = {key: points[-1][1] for key, points in metrics.items() if points}
    state = "finished" if run else "training" if _training(folder) else "stopped"
    tokens = list(config.get("token") or [])
    prompts = config.get("grid_prompts") or []
    template = config.get("caption_template") or ""
    try:
        default_prompt = prompts[0] if prompts else template.format(token=" ".join(tokens))
    except (KeyError, IndexError, ValueError):
        default_prompt = ""
    final = run.get("final") or last
    return RunInfo(
        name=name, path=folder, state=state, method=str(run.get("method") or config.get("method") or "?"),
        lr_unet=_number(config.get("lr_unet")), lr_text=_number(config.get("lr_text")),
        lr_embedding=_number(config.get("lr_embedding")), rank=int(config.get("rank") or 0),
        seed=int(config.get("seed") or 0), steps=int(config.get("steps") or 0),
        step=max((points[-1][0] for points in metrics.values() if points), default=0),
        heldout_loss=_number(final.get(HELDOUT)), tokens=tokens, init_word=str(config.get("init_word") or ""),
        prompt=default_prompt)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def read_metrics(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {name: [(step, value), ...]}. A line that does not parse is skipped: a
    training that is running may be half-way through writing it."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = own_file(folder, METRICS)
    if path is None:
        return series
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            step, name, value = int(rec["step"]), str(rec["name"]), rec["value"]
        except (ValueError, KeyError, TypeError):
            continue
        series.setdefault(name, []).append((step, _number(value)))
    return series


def adapter_files(folder: Path) -> list[Path]:
    """The adapter files a run holds, whatever formats it was written or exported in: every
    safetensors file in its diffusers and kohya folders and beside them (never its checkpoints,
    which are training state), each inside the run folder once symlinks are followed."""
    folder = Path(folder)
    found = [p for sub in (DIFFUSERS_FOLDER, KOHYA_FOLDER, ".") for p in sorted((folder / sub).glob("*.safetensors"))]
    return [real for path in found if (real := own_file(folder, path.relative_to(folder)))]
