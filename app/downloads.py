"""A run's adapter files, staged where the app may serve them from.

The web server serves nothing from the runs folder itself: what a page may download is copied
into the cache first (the diffusers adapter folder as one zip, every other adapter file on its
own), in a folder named by the files' content, so a second request for the same files costs nothing.
"""
from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError
from balora_diffusion.formats.run_files import DIFFUSERS_FOLDER
from balora_diffusion.runs import adapter_files, own_file


def stage_downloads(run: Path, cache: Path, label: str) -> list[Path]:
    """The files to offer for `run`: `<label>-diffusers.zip` (its diffusers folder: what
    `load_lora_weights` and `load_textual_inversion` read) and every other adapter file under its
    own name (the kohya LoRA and the embedding A1111 and ComfyUI take, named as the run wrote them)."""
    files = adapter_files(run)
    diffusers = (run / DIFFUSERS_FOLDER).resolve()
    zipped = [p for p in files if p.parent == diffusers]
    if not zipped:
        raise UserError(f"run {label} has no adapter files yet (still training, or stopped before its end)")
    others: dict[str, Path] = {}
    for path in files:
        if path.parent != diffusers:
            others.setdefault(path.name, path)  # the kohya folder's copy of the embedding is the same file
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(run)).encode() + path.read_bytes())
    folder = cache / "downloads" / digest.hexdigest()[:16]
    safe = label.replace("/", "_")
    archive_name = f"{safe}-diffusers.zip"
    staged = [folder / archive_name] + [folder / name for name in others]
    if all(own_file(cache, p.relative_to(cache)) for p in staged):
        return staged
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        with zipfile.ZipFile(tmp / archive_name, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in zipped:
                archive.write(path, f"{safe}/{path.name}")
        for name, source in others.items():
            shutil.copyfile(source, tmp / name)
    return staged
