"""The concept-training loop: read it top to bottom.

`train(cfg)` takes a TrainConfig and returns the run folder. It runs unchanged under
`accelerate launch` on several processes: each process draws its own share of every step's batch
(data.ConceptData is a pure function of the step), DDP averages the gradients, and the update rule
then sees identical factors and gradients on every replica, so replicas stay identical.
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from balora_diffusion import checkpoint as ckpt
from balora_diffusion import buckets as bucketing
from balora_diffusion.data import (ConceptData, check_caption_tokens, check_image_sizes, read_concept_folder,
                                   split_holdout)
from balora_diffusion.embeddings import add_placeholder_tokens
from balora_diffusion.errors import UserError
from balora_diffusion.text_encoding import encode_captions
from balora_diffusion.lora import balance_diagnostics, find_lora_pairs, inject_lora
from balora_diffusion.lora_node import use_single_node_forward
from balora_diffusion.masks import per_sample_mse
from balora_diffusion.prior import check_prior_prompt, prior_loss
from balora_diffusion.models import load_pipeline
from balora_diffusion.rules import build_optimizer
from balora_diffusion.formats.run_files import adapter_from_models, training_info, write_run_adapters
from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.generate import generate, write_grid
from balora_diffusion.latent_cache import LatentCache
from balora_diffusion.runfolder import RunFolder
from balora_diffusion.stop_request import StopRequest
from balora_diffusion.runlog import RunLog
from balora_diffusion.threads import use_cpu_threads
from balora_diffusion.train_config import TrainConfig
from balora_diffusion.versions import installed_version


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops, the last good checkpoint stays the latest."""


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    # One generator per (step, process): resuming at step k redraws exactly the noise of step k.
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 64 + rank)


def diffusion_target(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"unsupported prediction_type {kind!r} in the base model's scheduler config")


def loss_weights(scheduler, timesteps, gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al.), in the form that matches the prediction type."""
    if gamma <= 0:
        return None
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def denoising_loss(unet, text_encoder, scheduler, latents, noise, timesteps, input_ids, masks=None,
                   unmasked_weight=0.0):
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return unet_loss(unet, scheduler, latents, noise, noisy, timesteps, text_encoder(input_ids)[0], None, masks,
                     unmasked_weight)


def unet_loss(unet, scheduler, latents, noise, noisy, timesteps, cond, weights=None, masks=None, unmasked_weight=0.0):
    """The denoising loss of `noisy` (= scheduler.add_noise(latents, noise, timesteps)): with `masks`
    (B, 1, h, w) at latent resolution, weighted as masks.per_sample_mse says; `weights` per sample."""
    pred = unet(noisy, timesteps, cond).sample.float()
    target = diffusion_target(scheduler, latents, noise, timesteps).float()
    per_sample = per_sample_mse(pred, target, None if masks is None else masks.to(pred.device), unmasked_weight)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def make_noise(latents: torch.Tensor, gen: torch.Generator, offset: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen,
                                             device=latents.device, dtype=latents.dtype)
    return noise


def encode_latents(vae, pixels: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """VAE latents scaled like SD's (gen=None: the posterior mean, for deterministic evaluation)."""
    return sample_latents(vae, vae.encode(pixels).latent_dist, gen)


def sample_latents(vae, dist, gen: torch.Generator | None) -> torch.Tensor:
    latents = dist.mean if gen is None else dist.sample(generator=gen)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents.float() - shift) * vae.config.scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _trainable(module: torch.nn.Module, skip: torch.nn.Module | None = None) -> list[torch.nn.Parameter]:
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    return [p for p in module.parameters() if p.requires_grad and id(p) not in skipped]


def get_lr_schedule(cfg: TrainConfig, optimizer):
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.steps)


def fixed_triples(cfg: TrainConfig, data: ConceptData, examples, vae, tokenizer, scheduler, device) -> dict:
    """Fixed (image, noise, timestep) triples of `examples` from `cfg.heldout_seed`, the same for
    every method and run seed, with timesteps stratified over the schedule so one draw does not
    dominate. The images are data.square_view's, masked as training is."""
    gen = torch.Generator().manual_seed(cfg.heldout_seed)
    n = cfg.heldout_size
    views = [data.square_view(examples[i % len(examples)]) for i in range(n)]
    pixels = torch.stack([px for px, _ in views])
    with torch.no_grad():
        latents = encode_latents(vae, pixels.to(device, vae.dtype), None)
    T = scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(n) + torch.rand(n, generator=gen)) * T / n).long().clamp(max=T - 1)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    ids = tokenize(tokenizer, [examples[i % len(examples)].caption for i in range(n)])
    masks = torch.stack([m for _, m in views]).to(device) if data.masked else None
    return {"latents": latents, "noise": noise, "timesteps": timesteps.to(device), "ids": ids.to(device),
            "masks": masks, "unmasked_weight": cfg.unmasked_weight, "batch": cfg.batch_size}


@torch.no_grad()
def fixed_noise_loss(heldout: dict, accelerator, unet, text_encoder, scheduler) -> float:
    total, n = 0.0, heldout["latents"].shape[0]
    for i in range(0, n, heldout["batch"]):
        sl = slice(i, i + heldout["batch"])
        masks = None if heldout["masks"] is None else heldout["masks"][sl]
        with accelerator.autocast():
            loss = denoising_loss(unet, text_encoder, scheduler, heldout["latents"][sl], heldout["noise"][sl],
                                  heldout["timesteps"][sl], heldout["ids"][sl], masks, heldout["unmasked_weight"])
        total += loss.item() * heldout["latents"][sl].shape[0]
    return total / n


def evaluate(log: RunLog, step: int, fixed: dict[str, dict], accelerator, unet, text_encoder, scheduler,
             pairs) -> None:
    """`fixed`: the fixed triples of the training images ("fit") and of the held-out ones ("holdout",
    with --holdout). `heldout_loss` repeats fit_loss, the value it always held, for its readers."""
    for name, triples in fixed.items():
        value = fixed_noise_loss(triples, accelerator, unet, text_encoder, scheduler)
        log.scalar(step, f"{name}_loss", value)
        if name == "fit":
            log.scalar(step, "heldout_loss", value)
    diagnostics = balance_diagnostics(pairs)
    for key in ("imbalance", "ratio_over_rho", "cond_A", "cond_B"):
        values = sorted(v for v in (_diagnostic(d, key) for d in diagnostics.values()) if math.isfinite(v))
        if values:
            log.scalar(step, f"balance/{key}_median", values[len(values) // 2])


def _diagnostic(d: dict, key: str) -> float:
    return d["ratio"] / d["rho"] if key == "ratio_over_rho" else d[key]


class GpuPeaks:
    """Peak CUDA memory of the training steps alone and of the whole run: the validation grid
    (a VAE decode at full resolution) can outgrow a training step and would hide its cost."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device, self.train, self.overall = device, 0, 0

    def step_begins(self) -> None:
        """Fold the peak since the last step (its eval or grid included) into the run's, then restart it."""
        if self.cuda:
            self.overall = max(self.overall, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def step_ends(self) -> None:
        if self.cuda:
            self.train = max(self.train, torch.cuda.max_memory_allocated(self.device))

    def summary(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"peak_gpu_memory_mib": None, "peak_train_gpu_memory_mib": None}
        self.step_begins()  # the final grid's peak
        return {"peak_gpu_memory_mib": self.overall / 2**20, "peak_train_gpu_memory_mib": self.train / 2**20}


class ScoredCheckpoints:
    """--eval-metrics: the adapter scored (balora eval's metrics, checkpoint_scoring) at every scored step,
    each a checkpoint; with --best-by the best state so far exported into RUN/best/ as soon as it is
    scored, and kept in every checkpoint (tree BEST_TREE: its step, scores and trainable tensors), so
    that a resumed run goes on from the best of the steps before its checkpoint, whatever RUN/best/
    held when the run was killed. The scoring runs on the main process only."""

    BEST_TREE = "best_so_far"

    def __init__(self, cfg: TrainConfig, out: Path, models: dict, accelerator, trained, embedding):
        self.cfg, self.out, self.models, self.accelerator = cfg, out, models, accelerator
        self.trained, self.embedding = trained, embedding  # (unet, text_encoder) as prepared
        self.every = cfg.eval_metrics_every or cfg.checkpoint_every
        self.best: dict | None = None
        self._scorer = None
        self._new_best = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.cfg.steps

    def _adapter(self, step: int):
        unet, te = (self.accelerator.unwrap_model(m) for m in self.trained)
        return adapter_from_models(unet, te if self.cfg.train_text_encoder else None, self.embedding, self.cfg.token,
                                   training_info(asdict(self.cfg), step, self.out.name))

    def _scorer_of_run(self):
        if self._scorer is None:
            from balora_diffusion.checkpoint_scoring import AdapterScorer
            from balora_diffusion.commands.generate import DrawConfig

            draw = DrawConfig(seeds=self.cfg.eval_seeds, fusion=[1.0], steps=self.cfg.eval_sample_steps,
                              device=str(self.accelerator.device), cpu_threads=self.cfg.cpu_threads)
            self._scorer = AdapterScorer.for_run(self.out, self.cfg.token, self.cfg.eval_metrics, self.models, draw,
                                                 self.cfg.base_model, self.cfg.base_config)
        return self._scorer

    def score(self, log: RunLog, step: int) -> None:
        """Score the adapter as it is at `step`, log the scores and note a new best (exported by `export`
        once the step's checkpoint holds it)."""
        from balora_diffusion.checkpoint_scoring import better
        from balora_diffusion.runlog import SCORE_PREFIX, SCORES_PLOT

        adapter = self._adapter(step)
        scores = self._scorer_of_run().score(adapter)["1"]
        for metric, value in scores.items():
            if value is not None:
                log.scalar(step, SCORE_PREFIX + metric, value)
        log.plot(SCORES_PLOT)
        by = self.cfg.best_by
        if by and better(scores.get(by), self.best and self.best["value"]):
            trainable = {k: p.detach().cpu().clone()
                         for k, p in trainable_parameters(self.accelerator, self.trained).items()}
            self.best = {"by": by, "step": step, "value": scores[by], "scores": scores, "trainable": trainable}
            self._new_best = adapter

    def trees(self) -> dict:
        return {self.BEST_TREE: self.best} if self.best else {}

    def export(self) -> None:
        if self._new_best is not None:
            self._write(self._new_best)
            self._new_best = None

    def _write(self, adapter) -> None:
        from balora_diffusion.checkpoint_scoring import write_best

        b = self.best
        write_best(self.out, adapter, {"by": b["by"], "fusion": 1.0, "label": f"{self.out.name} step {b['step']}",
                                       "step": b["step"], "value": b["value"], **b["scores"], "source": "training"})

    def resume(self, folder: Path) -> None:
        """Take the best so far from checkpoint `folder` and make RUN/best/ hold it (the run may have been
        killed before exporting it, or after exporting a later step that it trains again)."""
        from balora_diffusion.atomic import temp_sibling
        from balora_diffusion.checkpoint_scoring import read_best
        from balora_diffusion.runfolder import BEST

        if not self.cfg.best_by:
            return
        self.best = ckpt.load_tree(folder, self.BEST_TREE) if (folder / f"{self.BEST_TREE}.json").is_file() else None
        if not self.accelerator.is_main_process:
            return
        held = read_best(self.out)
        if self.best is None:
            if (self.out / BEST).exists():  # a state this run has not reached yet
                trash = temp_sibling(self.out / BEST)
                os.replace(self.out / BEST, trash)
                shutil.rmtree(trash)
            return
        if held is not None and (held.get("step"), held.get("value")) == (self.best["step"], self.best["value"]):
            return
        live = {k: p.detach().clone() for k, p in trainable_parameters(self.accelerator, self.trained).items()}
        set_trainable(self.accelerator, self.trained, self.best["trainable"])
        try:  # the adapter's tensors may share the parameters' memory: written before they change back
            self._write(self._adapter(self.best["step"]))
        finally:
            set_trainable(self.accelerator, self.trained, live)

    def summary(self) -> dict | None:
        return None if self.best is None else {k: v for k, v in self.best.items() if k != "trainable"}


def validation_grid(path: Path, cfg: TrainConfig, pipe, accelerator) -> None:
    """Prompts x (fusion coefficient, seed): the LoRA's strength through diffusers' lora scale,
    which scales the UNet and text-encoder LoRA alike; the new token embedding stays in.

    Under autocast like training: the fp32 LoRA factors turn a half-precision layer's output into
    fp32, which the next half-precision layer refuses outside autocast."""
    prompts = cfg.grid_prompts or [cfg.caption_template.format(token=" ".join(cfg.token))]
    was_training = pipe.unet.training, pipe.text_encoder.training
    pipe.unet.eval(), pipe.text_encoder.eval()
    columns = [[] for _ in prompts]
    for w in cfg.fusion:
        with accelerator.autocast():
            images = generate(pipe, prompts, cfg.grid_seeds, steps=cfg.sample_steps,
                              guidance_scale=cfg.guidance_scale, progress=False, cross_attention_kwargs={"scale": w})
        for row, imgs in zip(columns, images):
            row.extend(imgs)
    pipe.unet.train(was_training[0]), pipe.text_encoder.train(was_training[1])
    labels = [f"w={w:g} seed {s}" for w in cfg.fusion for s in cfg.grid_seeds]
    write_grid(path, columns, row_labels=prompts, col_labels=labels,
               title=f"{cfg.method}: rows = prompts, columns = fusion coefficient x seed")


def trainable_parameters(accelerator, models) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of (unet, text_encoder) by checkpoint key ("unet.NAME", "text_encoder.NAME")."""
    trainable = {}
    for prefix, model in zip(("unet", "text_encoder"), models):
        for name, p in accelerator.unwrap_model(model).named_parameters():
            if p.requires_grad:
                trainable[f"{prefix}.{name}"] = p
    return trainable


@torch.no_grad()
def set_trainable(accelerator, models, tensors: dict[str, torch.Tensor]) -> None:
    for key, p in trainable_parameters(accelerator, models).items():
        p.copy_(tensors[key])


def save_training_state(out: Path, step: int, accelerator, models, optimizer, lr_schedule, cfg: TrainConfig,
                        extra: dict | None = None) -> None:
    """`extra`: more trees of the checkpoint (name -> tree), such as the best-scored state so far."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    ckpt.write_checkpoint(out / "checkpoints", step, {
        "trainable": trainable_parameters(accelerator, models), "optimizer": optimizer.state_dict(),
        "schedule": lr_schedule.state_dict(), "meta": {"step": step},
        "config": asdict(cfg), **(extra or {})})  # config: what a resume must not change (runfolder.check_resumable)


def drop_checkpoints_after(out: Path, step: int, accelerator) -> Path | None:
    """Delete checkpoints of >= `step` updates and return the newest one left."""
    found = ckpt.list_checkpoints(out / "checkpoints")
    if accelerator.is_main_process:
        for folder in found:
            if ckpt.checkpoint_step(folder) >= step:
                shutil.rmtree(folder)
    good = [f for f in found if ckpt.checkpoint_step(f) < step]
    return good[-1] if good else None


def load_training_state(folder: Path, accelerator, models, optimizer, lr_schedule) -> int:
    set_trainable(accelerator, models, ckpt.load_tree(folder, "trainable"))
    optimizer.load_state_dict(ckpt.load_tree(folder, "optimizer"))
    lr_schedule.load_state_dict(ckpt.load_tree(folder, "schedule"))
    return int(ckpt.load_tree(folder, "meta")["step"])


def replica_checksums(accelerator, models) -> list[float]:
    """A float64 fingerprint of the trainable weights on every process. The rules run on each
    replica separately, so a rule that depended on anything process-local would silently split
    the replicas; this makes that loud."""
    weights = [p for m in models for p in accelerator.unwrap_model(m).parameters() if p.requires_grad]
    local = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(weights))
    gathered = accelerator.gather(torch.as_tensor(local, dtype=torch.float64, device=accelerator.device).reshape(1))
    values = gathered.tolist()
    if any(v != values[0] for v in values):
        raise RuntimeError(f"replicas diverged: trainable-weight checksums {values}")
    return values


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "balora-diffusion"):
        if (version := installed_version(name)) is not None:
            found[name] = version
    return found


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


def load_models(cfg: TrainConfig, accelerator, examples):
    """The base pipeline with the placeholder tokens and LoRA in, its frozen parts frozen, the
    dataset at the training resolution, the token embedding and the LoRA pairs."""
    device = accelerator.device
    base_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if device.type != "cuda":
        base_dtype = torch.float32
    pipe = load_pipeline(cfg.base_model or None, device=device, dtype=base_dtype,
                         single_file_config=cfg.base_config or None)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    use_cpu_threads(cfg.cpu_threads, [unet, text_encoder, vae])
    resolution = cfg.resolution or unet.config.sample_size * pipe.vae_scale_factor
    check_resolution(resolution, pipe)
    check_sample_steps(cfg, pipe)
    check_image_sizes(examples, resolution, quiet=not accelerator.is_main_process)
    sizes = bucketing.choose_buckets(cfg.buckets, resolution, resolution_step(pipe))
    data = ConceptData(examples, resolution=resolution, repeats=cfg.repeats, seed=cfg.seed,
                       random_crop=cfg.random_crop, flip=cfg.flip, buckets=sizes, latent_factor=pipe.vae_scale_factor)
    if sizes and accelerator.is_main_process:
        print(f"buckets (width x height: images): {bucketing.describe(data.bucket_counts())}")
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    embedding = add_placeholder_tokens(tokenizer, text_encoder, cfg.token, cfg.init_word)
    check_caption_tokens(examples, tokenizer, cfg.token)
    torch.manual_seed(cfg.seed)
    inject_lora(unet, text_encoder, cfg)
    use_single_node_forward(unet)
    use_single_node_forward(text_encoder)
    # peft creates the factors in the base's dtype; fp16 factors cannot take AdamW's small steps.
    cast_training_params([unet, text_encoder], dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    return pipe, data, embedding, find_lora_pairs(unet) + find_lora_pairs(text_encoder)


def make_optimizer(cfg: TrainConfig, unet, text_encoder, embedding, pairs):
    groups = [{"name": "unet", "lr": cfg.lr_unet, "params": _trainable(unet)}]
    if cfg.train_text_encoder:
        groups.append({"name": "text_encoder", "lr": cfg.lr_text, "params": _trainable(text_encoder, skip=embedding)})
    if cfg.lr_embedding > 0:
        groups.append({"name": "token_embedding", "lr": cfg.lr_embedding, "params": [embedding.extra]})
    else:
        embedding.extra.requires_grad_(False)
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


def _no_mark(phase: str) -> None:
    pass


def step_loss(cfg: TrainConfig, step: int, accelerator, batches, vae, tokenizer, text_encoder, unet, scheduler,
              mark=_no_mark) -> torch.Tensor:
    """The loss of training step `step`. `batches` is the LatentCache or the ConceptData; `mark(phase)`
    is called as each phase ends (the loop benchmark times them)."""
    device = accelerator.device
    gen = _step_generator(cfg.seed, step, accelerator.process_index, device)
    if isinstance(batches, LatentCache):
        dist, captions, masks = batches.batch(step, cfg.batch_size, accelerator.process_index,
                                              accelerator.num_processes)
        mark("data")
    else:
        pixels, captions, masks = batches.batch(step, cfg.batch_size, accelerator.process_index,
                                                accelerator.num_processes)
        mark("data")
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    latents = sample_latents(vae, dist, gen)
    mark("vae_encode")
    noise = make_noise(latents, gen, cfg.noise_offset)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=gen, device=device)
    ids = tokenize(tokenizer, captions)
    weights = loss_weights(scheduler, timesteps, cfg.min_snr_gamma)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with accelerator.autocast():
        cond = encode_captions(text_encoder, ids, device)
        mark("text_encoder")
        loss = unet_loss(unet, scheduler, latents, noise, noisy, timesteps, cond, weights, masks, cfg.unmasked_weight)
        if cfg.prior_prompt and cfg.prior_weight > 0:
            prior_ids = tokenize(tokenizer, [cfg.prior_prompt] * len(captions))
            loss = loss + cfg.prior_weight * prior_loss(
                unet, accelerator.unwrap_model(unet), text_encoder, accelerator.unwrap_model(text_encoder),
                prior_ids, noisy, timesteps, weights)
    mark("unet_forward")
    return loss


def update(cfg: TrainConfig, accelerator, optimizer, loss: torch.Tensor, mark=_no_mark) -> None:
    """Backward, clipping and the optimizer step (the rules included)."""
    accelerator.backward(loss)
    mark("backward")
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    mark("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer")


def latent_batches(cfg: TrainConfig, data: ConceptData, vae, device, quiet: bool):
    """A LatentCache when cfg.cache_latents and the augmentation allow it, else the dataset itself."""
    if not (cfg.cache_latents and data.variants_are_finite):
        return data
    cache = LatentCache(data, vae, device, cfg.batch_size)
    if not quiet:
        print(f"cached the latents of {len(cache.row)} image variant(s)")
    return cache


def train(cfg: TrainConfig) -> Path:
    on_gpu = torch.cuda.is_available()
    # cpu=True is what lets accelerate see a torch.distributed launch on CPUs as MULTI_CPU.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision if on_gpu else "no", cpu=not on_gpu,
                              step_scheduler_with_optimizer=False)
    # ---- data first: a bad folder must fail before the run folder is touched or the model loaded
    if not cfg.data_dir:
        raise UserError("no concept folder: give --data-dir FOLDER (or data_dir in the config)")
    check_prior_prompt(cfg.prior_prompt, cfg.token)
    examples = read_concept_folder(cfg.data_dir, cfg.token, cfg.caption_template, with_masks=cfg.masked_loss)
    examples, held_out = split_holdout(examples, cfg.holdout, cfg.heldout_seed)
    score_models = _score_models(cfg)
    with StopRequest() as stop, RunFolder(cfg, accelerator) as run_folder:
        return _train(cfg, accelerator, examples, held_out, run_folder, stop, score_models)


def _score_models(cfg: TrainConfig) -> dict | None:
    """The metric models of --eval-metrics (None: off), loaded before the run folder is touched: a model
    that is not here, or a pixel metric without concept.toml, fails before any training."""
    if not cfg.eval_metrics:
        return None
    from balora_diffusion.checkpoint_scoring import check_concept, load_models

    check_concept(cfg.eval_metrics, cfg.data_dir, "--eval-metrics")
    return load_models(cfg.eval_metrics, cfg.eval_clip, cfg.eval_dino, ("--eval-clip", "--eval-dino"))


def _train(cfg: TrainConfig, accelerator, examples, held_out, run_folder: RunFolder, stop: StopRequest,
           score_models: dict | None = None) -> Path:
    device, world = accelerator.device, accelerator.num_processes
    out = Path(cfg.output_dir)

    # ---- base model, placeholder tokens, LoRA
    pipe, data, embedding, pairs = load_models(cfg, accelerator, examples)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = make_optimizer(cfg, unet, text_encoder, embedding, pairs)
    lr_schedule = get_lr_schedule(cfg, optimizer)
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    scored = None if score_models is None else ScoredCheckpoints(cfg, out, score_models, accelerator,
                                                                 (unet, text_encoder), embedding)

    # ---- resume
    start_step = 0
    if run_folder.resume_from:
        start_step = load_training_state(run_folder.resume_from, accelerator, [unet, text_encoder], optimizer,
                                         lr_schedule)
        # later checkpoints hold steps that this run does again; left, `--resume latest` would pick them
        drop_checkpoints_after(out, start_step + 1, accelerator)
        if scored:
            scored.resume(run_folder.resume_from)
        accelerator.print(f"resumed from {run_folder.resume_from} at step {start_step}")

    log = run_folder.closing(RunLog(out, enabled=accelerator.is_main_process, resume_step=start_step))
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", asdict(cfg))
    fixed = {"fit": fixed_triples(cfg, data, examples, vae, tokenizer, scheduler, device)}
    if held_out:
        fixed["holdout"] = fixed_triples(cfg, data, held_out, vae, tokenizer, scheduler, device)
    batches = latent_batches(cfg, data, vae, device, quiet=not accelerator.is_main_process)

    # ---- loop
    if start_step == 0:
        evaluate(log, 0, fixed, accelerator, unet, text_encoder, scheduler, pairs)
    text_encoder.train(cfg.train_text_encoder)
    unet.train()
    bar = run_folder.closing(tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="train",
                                  disable=not accelerator.is_local_main_process))
    started = time.perf_counter()
    memory = GpuPeaks(device)
    step_seconds = 0.0  # training steps alone: the loop's time also holds evals, grids and checkpoints
    for step in bar:
        memory.step_begins()
        step_started = time.perf_counter()
        loss = step_loss(cfg, step, accelerator, batches, vae, tokenizer, text_encoder, unet, scheduler)
        if not torch.isfinite(loss):
            raise TrainingDiverged(  # the checkpoints from `step` on hold the weights that gave this loss
                f"loss became {loss.item()} at step {step}; stopped. Last good checkpoint: "
                f"{drop_checkpoints_after(out, step, accelerator) or 'none'}. "
                + (f"Lower --prior-weight {cfg.prior_weight:g}, the learning rate"
                   if cfg.prior_prompt and cfg.prior_weight > 1 else "Lower the learning rate")
                + ", or use mixed_precision bf16 or no.")
        update(cfg, accelerator, optimizer, loss)
        lr_schedule.step()
        memory.step_ends()

        done = step + 1
        loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()  # .item() waits for the GPU
        step_seconds += time.perf_counter() - step_started
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        log.scalar(done, "loss", loss_value)
        for group in optimizer.param_groups:
            log.scalar(done, f"lr/{group.get('name', 'group')}", group["lr"])
        if done % cfg.eval_every == 0 or done == cfg.steps:
            evaluate(log, done, fixed, accelerator, unet, text_encoder, scheduler, pairs)
        if cfg.grid_every and done % cfg.grid_every == 0 and done != cfg.steps and accelerator.is_main_process:
            validation_grid(out / f"grid-step{done:06d}.png", cfg, pipe, accelerator)
        scoring = scored is not None and scored.due(done)
        if scoring and accelerator.is_main_process:
            scored.score(log, done)
        log.flush()  # before a checkpoint can name this step
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.asked or scoring:
            save_training_state(out, done, accelerator, [unet, text_encoder], optimizer, lr_schedule, cfg,
                                scored.trees() if scored else None)
        if scoring and accelerator.is_main_process:
            scored.export()  # after the checkpoint that holds it: a kill in between is mended on resume
        if stop.asked and done < cfg.steps:
            raise KeyboardInterrupt  # RunFolder says how to go on from the checkpoint just written
    elapsed = time.perf_counter() - started

    # ---- outputs
    checksums = replica_checksums(accelerator, [unet, text_encoder])
    if accelerator.is_main_process:
        unet_u, te_u = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        write_run_adapters(out, adapter_from_models(
            unet_u, te_u if cfg.train_text_encoder else None, embedding, cfg.token,
            training_info(asdict(cfg), cfg.steps, out.name)))
        validation_grid(out / "grid.png", cfg, pipe, accelerator)
        log.plots()
        run = {
            "config": asdict(cfg), "method": cfg.method, "seed": cfg.seed,
            "steps": cfg.steps, "resumed_from": start_step or None,
            "seconds": elapsed, "steps_per_second": (cfg.steps - start_step) / max(elapsed, 1e-9),
            "training_steps_per_second": (cfg.steps - start_step) / max(step_seconds, 1e-9),
            "device": str(device), "processes": world, "cpu_threads": torch.get_num_threads(),
            "mixed_precision": accelerator.mixed_precision, "latents_cached": isinstance(batches, LatentCache),
            **memory.summary(), "replica_checksums": checksums,
            "final": log.last_values(), "best": scored.summary() if scored else None, "holdout_images": sorted(e.path.name for e in held_out),
            "diagnostics": balance_diagnostics(pairs),
            "versions": library_versions(),
        }
        write_json_atomic(out / "run.json", run)
    return out
