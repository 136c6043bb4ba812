"""Resumable training checkpoints without pickle.

An optimizer's `state_dict()` is a tree of dicts (with int keys), lists, tuples, numbers, strings
and tensors. It is stored as one safetensors file holding the tensors and one JSON file holding the
tree with each tensor replaced by a reference, with key and container types kept so that
`load_state_dict` sees exactly what `state_dict` gave.

A checkpoint folder is written under a temporary name and renamed when complete, so a run killed
mid-write leaves the previous checkpoint as the latest one. Its manifest records the size and
SHA-256 of every file, so that a checkpoint damaged afterwards (a disk that filled, a file cut
short by a copy) is recognised before anything is loaded from it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from balora_diffusion.atomic import atomic_path
from balora_diffusion.run_layout import CHECKPOINT_PREFIX as PREFIX, MANIFEST, checkpoint_name


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # safetensors refuses views that share storage; a 0-d tensor round-trips as 0-d.
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_tree(folder: Path, name: str, tree: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(folder: Path, name: str, device: torch.device | str = "cpu") -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"), device=str(device))
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def write_checkpoint(root: Path, step: int, trees: dict[str, Any], keep: int = 2) -> Path:
    """Write `trees` (name -> state tree) as checkpoint `step` under `root`; keep the newest `keep`."""
    final = root / checkpoint_name(step)
    with atomic_path(final) as tmp:  # a dot-name while written: list_checkpoints never sees it
        tmp.mkdir()
        for name, tree in trees.items():
            save_tree(tmp, name, tree)
        (tmp / MANIFEST).write_text(json.dumps({f.name: _fingerprint(f) for f in sorted(tmp.iterdir())}))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(PREFIX):])


def _fingerprint(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def damage(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (a missing, cut or altered file), or None if it is
    exactly what `write_checkpoint` wrote."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    for name, written in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        found = _fingerprint(path)
        if found["bytes"] != written["bytes"]:
            return f"{name} has {found['bytes']} of its {written['bytes']} bytes"
        if found != written:
            return f"{name} differs from what was written"
    return None


def newest_intact(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under `root` that `damage` finds nothing wrong with (None if there is
    none), and a note "step-N (what is wrong)" on each newer one it passed over."""
    skipped = []
    for folder in reversed(list_checkpoints(root)):
        problem = damage(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name} ({problem})")
    return None, skipped
