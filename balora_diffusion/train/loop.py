"""The concept-training loop: read it top to bottom.

`train(cfg)` takes a TrainConfig and returns the run folder. It runs unchanged under
`accelerate launch` on several processes: each process draws its own share of every step's batch
(data.ConceptData is a pure function of the step), DDP averages the gradients, and the update rule
then sees identical factors and gradients on every replica, so replicas stay identical.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.data import read_concept_folder, split_holdout
from balora_diffusion.errors import UserError
from balora_diffusion.formats.run_files import write_run_adapters
from balora_diffusion.latent_cache import LatentCache
from balora_diffusion.lora import balance_diagnostics
from balora_diffusion.prior import check_prior_prompt
from balora_diffusion.run_layout import CONFIG, GRID, RUN, step_grid
from balora_diffusion.runfolder import RunFolder
from balora_diffusion.runlog import RunLog
from balora_diffusion.stop_request import StopRequest
from balora_diffusion.train.evaluate import ScoredCheckpoints, ValidationGrids, evaluate, fixed_triples, run_adapter
from balora_diffusion.train.measure import GpuPeaks
from balora_diffusion.train.objective import step_loss, update
from balora_diffusion.train.setup import (get_lr_schedule, latent_batches, library_versions, load_models,
                                          load_score_models, make_optimizer)
from balora_diffusion.train.state import (drop_checkpoints_after, load_training_state, replica_checksums,
                                          save_training_state)
from balora_diffusion.train_config import TrainConfig


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops, the last good checkpoint stays the latest."""


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
    score_models = load_score_models(cfg)
    with StopRequest() as stop, RunFolder(cfg, accelerator) as run_folder:
        return _train(cfg, accelerator, examples, held_out, run_folder, stop, score_models)


def _train(cfg: TrainConfig, accelerator, examples, held_out, run_folder: RunFolder, stop: StopRequest,
           score_models: dict | None = None) -> Path:
    device, world = accelerator.device, accelerator.num_processes
    out = Path(cfg.output_dir)

    # ---- base model, placeholder tokens, LoRA
    pipe, data, text, pairs = load_models(cfg, accelerator, examples)
    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = make_optimizer(cfg, unet, text, pairs)
    lr_schedule = get_lr_schedule(cfg, optimizer)
    unet, *encoders, optimizer = accelerator.prepare(unet, *text.models, optimizer)
    text = replace(text, models=encoders)
    trained = {"unet": unet, **text.named()}  # the checkpoint's parts
    scored = None if score_models is None else ScoredCheckpoints(cfg, out, score_models, accelerator, unet, text)
    grids = ValidationGrids(cfg, out, accelerator, unet, text, dtype=vae.dtype)

    # ---- resume
    start_step = 0
    if run_folder.resume_from:
        start_step = load_training_state(run_folder.resume_from, accelerator, trained, optimizer, lr_schedule)
        # later checkpoints hold steps that this run does again; left, `--resume latest` would pick them
        drop_checkpoints_after(out, start_step + 1, accelerator)
        if scored:
            scored.resume(run_folder.resume_from)
        accelerator.print(f"resumed from {run_folder.resume_from} at step {start_step}")

    log = run_folder.closing(RunLog(out, enabled=accelerator.is_main_process, resume_step=start_step))
    if accelerator.is_main_process:
        write_json_atomic(out / CONFIG, asdict(cfg))
    fixed = {"fit": fixed_triples(cfg, data, examples, vae, text, scheduler, device)}
    if held_out:
        fixed["holdout"] = fixed_triples(cfg, data, held_out, vae, text, scheduler, device)
    batches = latent_batches(cfg, data, vae, device, quiet=not accelerator.is_main_process)

    # ---- loop
    if start_step == 0:
        evaluate(log, 0, fixed, accelerator, unet, text, scheduler, pairs)
    text.train()
    unet.train()
    bar = run_folder.closing(tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="train",
                                  disable=not accelerator.is_local_main_process))
    started = time.perf_counter()
    memory = GpuPeaks(device)
    step_seconds = 0.0  # training steps alone: the loop's time also holds evals, grids and checkpoints
    for step in bar:
        memory.step_begins()
        step_started = time.perf_counter()
        loss = step_loss(cfg, step, accelerator, batches, vae, text, unet, scheduler)
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
            evaluate(log, done, fixed, accelerator, unet, text, scheduler, pairs)
        if cfg.grid_every and done % cfg.grid_every == 0 and done != cfg.steps and accelerator.is_main_process:
            grids.write(out / step_grid(done), done)
        scoring = scored is not None and scored.due(done)
        if scoring and accelerator.is_main_process:
            scored.score(log, done)
        log.flush()  # before a checkpoint can name this step
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.asked or scoring:
            save_training_state(out, done, accelerator, trained, optimizer, lr_schedule, cfg,
                                scored.trees() if scored else None)
        if scoring and accelerator.is_main_process:
            scored.export()  # after the checkpoint that holds it: a kill in between is mended on resume
        if stop.asked and done < cfg.steps:
            raise KeyboardInterrupt  # RunFolder says how to go on from the checkpoint just written
    elapsed = time.perf_counter() - started

    # ---- outputs
    checksums = replica_checksums(accelerator, list(trained.values()))
    if accelerator.is_main_process:
        write_run_adapters(out, run_adapter(cfg, cfg.steps, out.name, accelerator, unet, text))
        grids.write(out / GRID, cfg.steps)
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
        write_json_atomic(out / RUN, run)
    return out
