"""Training state: the trainable parameters by checkpoint key, saved into and loaded from a run's
checkpoints, and checked to agree across replicas."""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from balora_diffusion import checkpoint as ckpt
from balora_diffusion.run_layout import (CHECKPOINTS, CONFIG_TREE, META_TREE, OPTIMIZER_TREE, SCHEDULE_TREE,
                                         TRAINABLE_TREE)
from balora_diffusion.train_config import TrainConfig


def trainable_parameters(accelerator, models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of the models (part name -> model: unet, text_encoder, ...) by checkpoint
    key ("unet.NAME", "text_encoder.NAME", ...)."""
    trainable = {}
    for prefix, model in models.items():
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
    ckpt.write_checkpoint(out / CHECKPOINTS, step, {
        TRAINABLE_TREE: trainable_parameters(accelerator, models), OPTIMIZER_TREE: optimizer.state_dict(),
        SCHEDULE_TREE: lr_schedule.state_dict(), META_TREE: {"step": step},
        CONFIG_TREE: asdict(cfg), **(extra or {})})  # config: what a resume must not change (runfolder.check_resumable)


def drop_checkpoints_after(out: Path, step: int, accelerator) -> Path | None:
    """Delete checkpoints of >= `step` updates and return the newest one left."""
    found = ckpt.list_checkpoints(out / CHECKPOINTS)
    if accelerator.is_main_process:
        for folder in found:
            if ckpt.checkpoint_step(folder) >= step:
                shutil.rmtree(folder)
    good = [f for f in found if ckpt.checkpoint_step(f) < step]
    return good[-1] if good else None


def load_training_state(folder: Path, accelerator, models, optimizer, lr_schedule) -> int:
    set_trainable(accelerator, models, ckpt.load_tree(folder, TRAINABLE_TREE))
    optimizer.load_state_dict(ckpt.load_tree(folder, OPTIMIZER_TREE))
    lr_schedule.load_state_dict(ckpt.load_tree(folder, SCHEDULE_TREE))
    return int(ckpt.load_tree(folder, META_TREE)["step"])


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
