"""`balora export`: an adapter (a run, any of its checkpoints, or any LoRA file) written in any
format of formats.registry (diffusers, kohya), with its token embedding beside it."""
from __future__ import annotations

import argparse
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.formats.registry import FORMATS, Format
from balora_diffusion.outputs import add_overwrite_flag, claim


def add_arguments(parser: argparse.ArgumentParser) -> None:
    folders = ", ".join(f.name for f in FORMATS.values() if f.folder_file)
    files = ", ".join(f.name for f in FORMATS.values() if not f.folder_file)
    parser.add_argument("source", type=Path, help="run folder (its final adapter, else its newest checkpoint), a "
                                                  "checkpoint folder (RUN/checkpoints/step-N) or a LoRA file")
    parser.add_argument("--format", required=True, choices=list(FORMATS),
                        help="; ".join(f"{f.name}: {f.description}" for f in FORMATS.values()))
    parser.add_argument("--out", type=Path, required=True,
                        help=f"a folder ({folders}) or a .safetensors file ({files}); the token embedding is written "
                             f"beside a {files} file, into a {folders} folder")
    add_overwrite_flag(parser, "the files already at --out (the adapter and its token embedding)")
    parser.epilog = ("A1111 / Forge: the kohya file goes to models/Lora (prompt: <lora:NAME:1>), the embedding "
                     "to embeddings/ (typed by its file name). ComfyUI: models/loras and models/embeddings "
                     "(prompt: embedding:NAME).")


def _targets(args: argparse.Namespace, fmt: Format, adapter) -> tuple[Path, list[Path]]:
    """What fmt.write takes (a folder or a file) and every file the export writes."""
    from balora_diffusion.formats.embedding import embedding_file_name

    out = args.out.expanduser()
    if fmt.folder_file is None:
        if out.suffix != ".safetensors" or out.is_dir():
            raise UserError(f"--out {out}: a {fmt.name} LoRA is one .safetensors file")
        folder, files = out.parent, [out]
    else:
        if out.suffix == ".safetensors" or out.is_file():
            raise UserError(f"--out {out}: a {fmt.name} adapter is a folder")
        folder, files = out, [out / fmt.folder_file]
    if adapter.embedding is not None:
        files.append(folder / embedding_file_name(adapter.tokens))
        if files[-1] == files[0]:
            raise UserError(f"--out {out} is the name the token embedding takes; choose another file name")
    claim(files, args.overwrite)
    return out, files


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.formats.embedding import write_embedding
    from balora_diffusion.formats.read import read_adapter

    adapter = read_adapter(args.source)
    if not adapter.modules():
        raise UserError(f"{args.source} holds a token embedding but no LoRA weights: nothing to export")
    fmt = FORMATS[args.format]
    target, files = _targets(args, fmt, adapter)
    fmt.write(target, adapter)
    if adapter.embedding is not None:
        write_embedding(files[1].parent, adapter.tokens, adapter.embedding, adapter.embedding_2)
    print(f"{adapter.format} adapter ({len(adapter.modules())} modules) written as {args.format}: "
          + ", ".join(str(f) for f in files))
    return 0
