"""`balora export`: an adapter (a run, any of its checkpoints, or any LoRA file) written in the
diffusers or the kohya format, with its token embedding beside it."""
from __future__ import annotations

import argparse
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag, claim

FORMATS = ("diffusers", "kohya")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="run folder (its final adapter, else its newest checkpoint), a "
                                                  "checkpoint folder (RUN/checkpoints/step-N) or a LoRA file")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="diffusers: a folder for pipe.load_lora_weights; kohya: one .safetensors file for "
                             "A1111, ComfyUI, Forge")
    parser.add_argument("--out", type=Path, required=True,
                        help="a folder (diffusers) or a .safetensors file (kohya); the token embedding is written "
                             "beside a kohya file, into a diffusers folder")
    add_overwrite_flag(parser, "the files already at --out (the adapter and its token embedding)")
    parser.epilog = ("A1111 / Forge: the kohya file goes to models/Lora (prompt: <lora:NAME:1>), the embedding "
                     "to embeddings/ (typed by its file name). ComfyUI: models/loras and models/embeddings "
                     "(prompt: embedding:NAME).")


def _targets(args: argparse.Namespace, adapter) -> list[Path]:
    from balora_diffusion.formats.diffusers_lora import LORA_FILE
    from balora_diffusion.formats.embedding import embedding_file_name

    out = args.out.expanduser()
    if args.format == "kohya":
        if out.suffix != ".safetensors" or out.is_dir():
            raise UserError(f"--out {out}: a kohya LoRA is one .safetensors file")
        folder, files = out.parent, [out]
    else:
        if out.suffix == ".safetensors" or out.is_file():
            raise UserError(f"--out {out}: a diffusers adapter is a folder")
        folder, files = out, [out / LORA_FILE]
    if adapter.embedding is not None:
        files.append(folder / embedding_file_name(adapter.tokens))
        if files[-1] == files[0]:
            raise UserError(f"--out {out} is the name the token embedding takes; choose another file name")
    claim(files, args.overwrite)
    return files


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.formats.diffusers_lora import write_diffusers
    from balora_diffusion.formats.embedding import write_embedding
    from balora_diffusion.formats.kohya_lora import write_kohya
    from balora_diffusion.formats.read import read_adapter

    adapter = read_adapter(args.source)
    if not adapter.modules():
        raise UserError(f"{args.source} holds a token embedding but no LoRA weights: nothing to export")
    files = _targets(args, adapter)
    if args.format == "kohya":
        write_kohya(files[0], adapter)
    else:
        write_diffusers(files[0].parent, adapter)
    if adapter.embedding is not None:
        write_embedding(files[1].parent, adapter.tokens, adapter.embedding, adapter.embedding_2)
    print(f"{adapter.format} adapter ({len(adapter.modules())} modules) written as {args.format}: "
          + ", ".join(str(f) for f in files))
    return 0
