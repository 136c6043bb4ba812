"""Reading and writing the .safetensors files every format here is made of.

Only safetensors is ever opened: pickled files (.ckpt, .pt, .bin, ...) run code when unpickled.
Writes go to a temporary name and are renamed when complete, and the header's metadata is sorted,
so the same adapter always gives the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from balora_diffusion.atomic import atomic_path
from balora_diffusion.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def checked_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path if it names an existing .safetensors file; one clear UserError otherwise."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: pickled files ({', '.join(PICKLE_SUFFIXES)}) can run code when opened and are "
                        "not read; convert it to .safetensors first")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a .safetensors {what}")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and the `__metadata__` of a safetensors file, without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    path = checked_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable .safetensors file: {str(exc).splitlines()[0]}") from None


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the `__metadata__` of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = checked_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path} is not a readable .safetensors file: {str(exc).splitlines()[0]}") from None


def sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors file with its `__metadata__` keys sorted.

    safetensors 0.8 writes them in a random order on every save (safetensors issue 584), so two
    identical adapters would differ byte for byte. The tensors' offsets count from the end of the
    header, so only the header changes; it stays padded to 8 bytes like safetensors pads it.
    """
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


def write_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """`tensors` (moved to the CPU, made contiguous) and string `metadata` as one safetensors file,
    written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata={"format": "pt", **metadata})
        sort_header_metadata(tmp)
    return path
