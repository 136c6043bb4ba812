"""`balora merge`: adapters fused into the base model at their weights, saved as a model that loads
without this toolkit: a diffusers folder, or one original-layout .safetensors file."""
from __future__ import annotations

import argparse
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag, claim

DTYPES = ("fp16", "fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="extend", nargs="+", required=True, metavar="PATH[:WEIGHT]",
                        help="run folder, checkpoint or LoRA file, with its weight (default 1); repeat or list "
                             "several to merge them all")
    parser.add_argument("--out", type=Path, required=True,
                        help="a folder (diffusers: from_pretrained) or a .safetensors file (A1111 / ComfyUI "
                             "checkpoint; the token embedding is written beside it)")
    parser.add_argument("--base-model", default="", help="diffusers folder or single-file .safetensors; "
                                                         "default: the shipped tiny model")
    parser.add_argument("--base-config", default="", help="for a single-file base model: its config folder")
    parser.add_argument("--save-dtype", choices=DTYPES, default="fp16",
                        help="dtype of the floating-point weights of a .safetensors output (default fp16)")
    add_overwrite_flag(parser, "what is at --out and the token embedding file(s) beside a .safetensors output")


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.commands.generate import adapter_spec

    out = args.out.expanduser()
    single = out.suffix == ".safetensors"
    if not single and out.suffix:
        raise UserError(f"--out {out}: give a folder (diffusers) or a .safetensors file")
    specs = [adapter_spec(text) for text in args.adapter]

    import torch

    from balora_diffusion.atomic import atomic_path
    from balora_diffusion.formats.embedding import embedding_file_name, write_embedding
    from balora_diffusion.formats.fuse import Fused
    from balora_diffusion.formats.ldm_checkpoint import save_single_file
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.models import load_pipeline, save_pipeline

    adapters = [(read_adapter(path), weight) for path, weight in specs]
    with_tokens = [a for a, _ in adapters if a.embedding is not None] if single else []
    beside = [out.parent / embedding_file_name(a.tokens) for a in with_tokens]
    if out in beside or len(set(beside)) < len(beside):
        raise UserError(f"--out {out}: the token embeddings of the adapters would be written to "
                        f"{', '.join(str(p) for p in beside)}, and no two files may share a name")
    claim([out, *beside], args.overwrite)
    # merged on the CPU in fp32: the sum of small updates would round away in half precision
    pipe = load_pipeline(args.base_model or None, device="cpu", dtype="fp32",
                         single_file_config=args.base_config or None)
    Fused(pipe, adapters, tokens=not single)
    written = [out]
    if single:
        dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
        save_single_file(pipe, out, dtype=dtype)
        written += [write_embedding(out.parent, a.tokens, a.embedding, a.embedding_2) for a in with_tokens]
    else:
        with atomic_path(out) as tmp:
            save_pipeline(pipe, tmp)
    print(f"merged {len(adapters)} adapter(s) into {', '.join(str(w) for w in written)}")
    return 0
