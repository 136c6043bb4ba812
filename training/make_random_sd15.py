"""Write a randomly initialised Stable Diffusion 1.5 pipeline (the real sizes: 860 M UNet, CLIP-L
text encoder, 84 M VAE) as a diffusers folder, from the component configs in assets/sd15-config.

It draws nothing sensible; it is for measuring speed and memory of training at SD 1.5 scale
(`balora train --base-model DIR --resolution 512`) on a machine that has no SD weights.

    python training/make_random_sd15.py --out runs/sd15-random [--dtype fp16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from balora_diffusion.models import save_pipeline
from balora_diffusion.paths import SD15_CONFIG as CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="weights dtype on disk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(CONFIG / "tokenizer"),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG / "unet")),
        scheduler=DDIMScheduler.from_pretrained(CONFIG / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if args.dtype == "fp16":
        pipe.to(torch.float16)
    save_pipeline(pipe, args.out)
    print(f"wrote {args.out}: unet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
