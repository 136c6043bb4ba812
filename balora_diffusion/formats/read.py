"""One entry point for every adapter a user can point at: a run folder, one of its checkpoints, a
diffusers or peft adapter folder, or a single LoRA / embedding .safetensors file."""
from __future__ import annotations

from pathlib import Path

from balora_diffusion import checkpoint as ckpt
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import INFO_PREFIX, Adapter
from balora_diffusion.formats.diffusers_lora import LORA_FILE, PEFT_FILE, read_diffusers
from balora_diffusion.formats.embedding import embedding_file_name, is_embedding, read_embeddings
from balora_diffusion.formats.registry import format_of
from balora_diffusion.formats.run_files import DIFFUSERS_FOLDER, adapter_from_checkpoint
from balora_diffusion.formats.safetensors_io import checked_file, read_header
from balora_diffusion.run_layout import CHECKPOINTS


def read_adapter(path: str | Path) -> Adapter:
    """The adapter at `path`, with its token embedding when one belongs to it."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_folder(path)
    shapes, _ = read_header(checked_file(path, "adapter file"))
    if is_embedding(shapes):
        tokens, vectors, vectors_2 = read_embeddings(path)
        return Adapter(tokens=tokens, embedding=vectors, embedding_2=vectors_2, format="token embedding",
                       source=str(path))
    adapter = format_of(shapes).read(path)
    tokens = _trained_tokens(adapter)
    if tokens and (beside := path.parent / embedding_file_name(tokens)).is_file():
        _attach(adapter, beside)
    return adapter


def _trained_tokens(adapter: Adapter) -> list[str]:
    """The tokens a LoRA file says it was trained with, whose embedding file may lie beside it."""
    tokens = adapter.info.get("token", [])
    if not (isinstance(tokens, list) and all(isinstance(token, str) and token for token in tokens)):
        raise UserError(f"{adapter.source}: its {INFO_PREFIX}token header entry {tokens!r} is not a list of tokens")
    return tokens


def _attach(adapter: Adapter, embedding_file: Path) -> None:
    adapter.tokens, adapter.embedding, adapter.embedding_2 = read_embeddings(embedding_file)
    adapter.__post_init__()


def _read_folder(folder: Path) -> Adapter:
    if (folder / ckpt.MANIFEST).is_file() and folder.name.startswith(ckpt.PREFIX):
        return adapter_from_checkpoint(folder)
    if (folder / DIFFUSERS_FOLDER / LORA_FILE).is_file():
        adapter = _read_folder(folder / DIFFUSERS_FOLDER)
        adapter.format = "balora run"
        return adapter
    if (folder / CHECKPOINTS).is_dir():
        newest, _ = ckpt.newest_intact(folder / CHECKPOINTS)
        if newest is None:
            raise UserError(f"run {folder} has neither a finished adapter nor an intact checkpoint")
        return adapter_from_checkpoint(newest)
    for name in (LORA_FILE, PEFT_FILE):
        if (folder / name).is_file():
            adapter = read_diffusers(folder / name)
            embeddings = [p for p in sorted(folder.glob("*.safetensors"))
                          if p.name != name and is_embedding(read_header(p)[0])]
            if len(embeddings) > 1:
                raise UserError(f"{folder} holds several token embeddings ({', '.join(p.name for p in embeddings)}); "
                                "name the LoRA file and the embedding file separately")
            if embeddings:
                _attach(adapter, embeddings[0])
            return adapter
    raise UserError(f"{folder} is not a run folder, a checkpoint or an adapter folder "
                    f"(no {DIFFUSERS_FOLDER}/{LORA_FILE}, checkpoints/, {LORA_FILE} or {PEFT_FILE})")
