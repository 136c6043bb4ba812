"""What a run needs before its first step: the base model with the placeholder tokens and LoRA in,
the checks of the resolution and sampling steps against it, the optimizer and its learning-rate
schedule, the batches, the metric models of --eval-metrics, and the library versions it records."""
from __future__ import annotations

import platform

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from balora_diffusion import buckets as bucketing
from balora_diffusion import families
from balora_diffusion.data import ConceptData, check_caption_tokens, check_image_sizes
from balora_diffusion.embeddings import add_placeholder_tokens
from balora_diffusion.errors import UserError
from balora_diffusion.latent_cache import LatentCache
from balora_diffusion.lora import find_lora_pairs, inject_lora
from balora_diffusion.lora_node import use_single_node_forward
from balora_diffusion.models import load_pipeline
from balora_diffusion.rules import build_optimizer
from balora_diffusion.threads import use_cpu_threads
from balora_diffusion.train.text import TextEncoders
from balora_diffusion.train_config import TrainConfig
from balora_diffusion.versions import installed_version


def load_models(cfg: TrainConfig, accelerator, examples):
    """The base pipeline with the placeholder tokens and LoRA in, its frozen parts frozen, the
    dataset at the training resolution, the text side (train.text.TextEncoders) and the LoRA pairs."""
    device = accelerator.device
    base_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if device.type != "cuda":
        base_dtype = torch.float32
    pipe = load_pipeline(cfg.base_model or None, device=device, dtype=base_dtype,
                         single_file_config=cfg.base_config or None)
    family = families.of_pipeline(pipe)
    tokenizers, encoders, unet, vae = family.tokenizers_of(pipe), family.encoders(pipe), pipe.unet, pipe.vae
    use_cpu_threads(cfg.cpu_threads, [unet, *encoders, vae])
    resolution = cfg.resolution or unet.config.sample_size * pipe.vae_scale_factor
    check_resolution(resolution, pipe)
    check_sample_steps(cfg, pipe)
    check_image_sizes(examples, resolution, quiet=not accelerator.is_main_process)
    sizes = bucketing.choose_buckets(cfg.buckets, resolution, resolution_step(pipe))
    data = ConceptData(examples, resolution=resolution, repeats=cfg.repeats, seed=cfg.seed,
                       random_crop=cfg.random_crop, flip=cfg.flip, buckets=sizes, latent_factor=pipe.vae_scale_factor)
    if sizes and accelerator.is_main_process:
        print(f"buckets (width x height: images): {bucketing.describe(data.bucket_counts())}")
    for module in (vae, unet, *encoders):
        module.requires_grad_(False)
    embeddings = [add_placeholder_tokens(tokenizer, encoder, cfg.token, cfg.init_word)
                  for tokenizer, encoder in zip(tokenizers, encoders)]
    check_caption_tokens(examples, tokenizers[0], cfg.token)
    # the second encoder's LoRA is optional on its own; neither encoder has one without train_text_encoder
    adapted = [cfg.train_text_encoder and (i == 0 or cfg.train_text_encoder_2) for i in range(len(encoders))]
    text = TextEncoders(family, tokenizers, encoders, embeddings, adapted)
    torch.manual_seed(cfg.seed)
    inject_lora(unet, {name: m for (name, m), a in zip(text.named().items(), adapted) if a}, cfg)
    for model in (unet, *encoders):
        use_single_node_forward(model)
    # peft creates the factors in the base's dtype; fp16 factors cannot take AdamW's small steps.
    cast_training_params([unet, *encoders], dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders:
            encoder.gradient_checkpointing_enable()
    return pipe, data, text, find_lora_pairs(unet) + [p for m in encoders for p in find_lora_pairs(m)]


def resolution_step(pipe) -> int:
    """The pixels a training resolution must be a multiple of: the VAE halves the image once per
    block after its first, and the UNet the latents once per down block after its first. A side
    that does not halve evenly is rounded at some level, and the UNet's skip connections then
    meet features of another size than the model was trained on."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def check_resolution(resolution: int, pipe) -> None:
    step = resolution_step(pipe)
    if resolution % step:
        nearest = max(step, round(resolution / step) * step)
        raise UserError(f"resolution {resolution} px: this base model needs a multiple of {step} px "
                        f"(e.g. {nearest})")


def check_sample_steps(cfg: TrainConfig, pipe) -> None:
    """A sampler takes at most one step per timestep the model was trained on; more fail only when the
    first grid or score is drawn, after training."""
    most = pipe.scheduler.config.num_train_timesteps
    for name in ("sample_steps", "eval_sample_steps"):
        if getattr(cfg, name) > most:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: this base model's sampler has "
                            f"{most} timesteps, so at most {most} sampling steps")


def _trainable(module: torch.nn.Module, skip: torch.nn.Module | None = None) -> list[torch.nn.Parameter]:
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    return [p for p in module.parameters() if p.requires_grad and id(p) not in skipped]


def make_optimizer(cfg: TrainConfig, unet, text: TextEncoders, pairs):
    groups = [{"name": "unet", "lr": cfg.lr_unet, "params": _trainable(unet)}]
    for name, model, embedding, adapted in zip(text.names, text.models, text.embeddings, text.adapted):
        if adapted:
            groups.append({"name": name, "lr": cfg.lr_text, "params": _trainable(model, skip=embedding)})
    rows = [embedding.extra for embedding in text.embeddings]
    if cfg.lr_embedding > 0:
        groups.append({"name": "token_embedding", "lr": cfg.lr_embedding, "params": rows})
    else:
        for row in rows:
            row.requires_grad_(False)
    base_kwargs = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer != "sgd":
        base_kwargs["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer in ("adamw", "adam"):
        # torch's default Adam on the CPU loops over the parameters in Python, a few kernels each;
        # the fused one is one kernel per parameter, the same update.
        base_kwargs["fused"] = unet.device.type in ("cpu", "cuda")
    return build_optimizer(
        cfg.method, groups, pairs, base=cfg.optimizer, base_kwargs=base_kwargs,
        loraplus_ratio=cfg.loraplus_ratio, reg=cfg.precond_reg, lam=cfg.ilora_lambda,
        project_every=cfg.project_every, state=cfg.balora_state)


def get_lr_schedule(cfg: TrainConfig, optimizer):
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.steps)


def latent_batches(cfg: TrainConfig, data: ConceptData, vae, device, quiet: bool):
    """A LatentCache when cfg.cache_latents and the augmentation allow it, else the dataset itself."""
    if not (cfg.cache_latents and data.variants_are_finite):
        return data
    cache = LatentCache(data, vae, device, cfg.batch_size)
    if not quiet:
        print(f"cached the latents of {len(cache.row)} image variant(s)")
    return cache


def load_score_models(cfg: TrainConfig) -> dict | None:
    """The metric models of --eval-metrics (None: off), loaded before the run folder is touched: a model
    that is not here, or a pixel metric without concept.toml, fails before any training."""
    if not cfg.eval_metrics:
        return None
    from balora_diffusion.checkpoint_scoring import check_concept, load_models

    check_concept(cfg.eval_metrics, cfg.data_dir, "--eval-metrics")
    return load_models(cfg.eval_metrics, cfg.eval_clip, cfg.eval_dino, ("--eval-clip", "--eval-dino"))


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "balora-diffusion"):
        if (version := installed_version(name)) is not None:
            found[name] = version
    return found
