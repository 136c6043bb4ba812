"""A run's adapter files, staged where the app may serve them from.

The web server serves nothing from the runs folder itself: what a page may download is copied
into the cache first (the diffusers adapter folder as one zip, every adapter file on its own),
named by the files' content, so a second request for the same files costs nothing.
"""
from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError
from balora_diffusion.runs import adapter_files


def stage_downloads(run: Path, cache: Path, label: str) -> list[Path]:
    """The files to offer for `run`: `<label>-diffusers.zip` (its adapter folder, what
    `load_lora_weights` + `load_textual_inversion` read) and a copy of each adapter file it holds."""
    files = adapter_files(run)
    if not files:
        raise UserError(f"run {label} has no adapter files yet (still training, or stopped before its end)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(run)).encode() + path.read_bytes())
    safe = label.replace("/", "_")
    folder = cache / "downloads" / digest.hexdigest()[:16]
    staged = [folder / f"{safe}-diffusers.zip"] + [folder / f"{safe}-{p.name}" for p in files]
    if all(p.is_file() for p in staged):
        return staged
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        adapter = (run / "adapter").resolve()
        with zipfile.ZipFile(tmp / staged[0].name, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                if path.parent == adapter:
                    archive.write(path, f"{safe}/{path.name}")
        for source, target in zip(files, staged[1:]):
            shutil.copyfile(source, tmp / target.name)
    return staged
