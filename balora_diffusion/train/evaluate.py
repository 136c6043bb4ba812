"""What a run measures while it trains: the loss on fixed (image, noise, timestep) triples, the
balance diagnostics, the validation grids and, with --eval-metrics, the scored checkpoints."""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from balora_diffusion import checkpoint as ckpt
from balora_diffusion import families
from balora_diffusion.data import ConceptData
from balora_diffusion.formats.names import FAMILY_INFO
from balora_diffusion.formats.run_files import adapter_from_models, training_info
from balora_diffusion.generate import write_grid
from balora_diffusion.lora import balance_diagnostics
from balora_diffusion.run_layout import BEST, BEST_TREE, SCORES_PLOT
from balora_diffusion.runlog import RunLog
from balora_diffusion.train.objective import denoising_loss, encode_latents
from balora_diffusion.train.state import set_trainable, trainable_parameters
from balora_diffusion.train.text import TextEncoders
from balora_diffusion.train_config import TrainConfig


def run_adapter(cfg: TrainConfig, step: int, name: str, accelerator, unet, text: TextEncoders):
    """The adapter of the trained models as they are at `step` (formats.Adapter): the LoRA of the UNet
    and of the adapted text encoders, the new tokens' rows."""
    encoders = [m if adapted else None for m, adapted in zip(text.unwrapped(accelerator).models, text.adapted)]
    second = (encoders[1], text.embeddings[1]) if len(encoders) > 1 else ()
    info = training_info(asdict(cfg), step, name)
    if text.family is not families.DEFAULT:  # the default family's files say nothing, as they always did
        info[FAMILY_INFO] = text.family.name
    return adapter_from_models(accelerator.unwrap_model(unet), encoders[0], text.embeddings[0], cfg.token, info,
                               *second)


def fixed_triples(cfg: TrainConfig, data: ConceptData, examples, vae, text: TextEncoders, scheduler, device) -> dict:
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
    ids = text.ids([examples[i % len(examples)].caption for i in range(n)])
    sizes = [data.square_size_condition(examples[i % len(examples)]) for i in range(n)]
    masks = torch.stack([m for _, m in views]).to(device) if data.masked else None
    return {"latents": latents, "noise": noise, "timesteps": timesteps.to(device), "ids": [t.to(device) for t in ids],
            "sizes": sizes, "masks": masks, "unmasked_weight": cfg.unmasked_weight, "batch": cfg.batch_size}


@torch.no_grad()
def fixed_noise_loss(heldout: dict, accelerator, unet, text: TextEncoders, scheduler) -> float:
    total, n = 0.0, heldout["latents"].shape[0]
    for i in range(0, n, heldout["batch"]):
        sl = slice(i, i + heldout["batch"])
        masks = None if heldout["masks"] is None else heldout["masks"][sl]
        with accelerator.autocast():
            cond = text.condition([ids[sl] for ids in heldout["ids"]], heldout["latents"].device,
                                  heldout["sizes"][sl], distinct=False)
            loss = denoising_loss(unet, cond, scheduler, heldout["latents"][sl], heldout["noise"][sl],
                                  heldout["timesteps"][sl], masks, heldout["unmasked_weight"])
        total += loss.item() * heldout["latents"][sl].shape[0]
    return total / n


def evaluate(log: RunLog, step: int, fixed: dict[str, dict], accelerator, unet, text: TextEncoders, scheduler,
             pairs) -> None:
    """`fixed`: the fixed triples of the training images ("fit") and of the held-out ones ("holdout",
    with --holdout). `heldout_loss` repeats fit_loss, the value it always held, for its readers."""
    for name, triples in fixed.items():
        value = fixed_noise_loss(triples, accelerator, unet, text, scheduler)
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


class ScoredCheckpoints:
    """--eval-metrics: the adapter scored (balora eval's metrics, checkpoint_scoring) at every scored step,
    each a checkpoint; with --best-by the best state so far exported into RUN/best/ as soon as it is
    scored, and kept in every checkpoint (tree BEST_TREE: its step, scores and trainable tensors), so
    that a resumed run goes on from the best of the steps before its checkpoint, whatever RUN/best/
    held when the run was killed. The scoring runs on the main process only."""

    def __init__(self, cfg: TrainConfig, out: Path, models: dict, accelerator, unet, text: TextEncoders):
        self.cfg, self.out, self.models, self.accelerator = cfg, out, models, accelerator
        self.unet, self.text = unet, text  # as prepared
        self.trained = {"unet": unet, **text.named()}
        self.every = cfg.eval_metrics_every or cfg.checkpoint_every
        self.best: dict | None = None
        self._scorer = None
        self._new_best = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.cfg.steps

    def _adapter(self, step: int):
        return run_adapter(self.cfg, step, self.out.name, self.accelerator, self.unet, self.text)

    def _scorer_of_run(self):
        if self._scorer is None:
            from balora_diffusion.checkpoint_scoring import AdapterScorer, scoring_drawing

            draw = scoring_drawing(seeds=self.cfg.eval_seeds, fusion=[1.0], steps=self.cfg.eval_sample_steps,
                                   device=str(self.accelerator.device), cpu_threads=self.cfg.cpu_threads)
            self._scorer = AdapterScorer.for_run(self.out, self.cfg.token, self.cfg.eval_metrics, self.models, draw,
                                                 self.cfg.base_model, self.cfg.base_config)
        return self._scorer

    def score(self, log: RunLog, step: int) -> None:
        """Score the adapter as it is at `step`, log the scores and note a new best (exported by `export`
        once the step's checkpoint holds it)."""
        from balora_diffusion.checkpoint_scoring import better
        from balora_diffusion.runlog import SCORE_PREFIX

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
        return {BEST_TREE: self.best} if self.best else {}

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

        if not self.cfg.best_by:
            return
        self.best = ckpt.load_tree(folder, BEST_TREE) if (folder / f"{BEST_TREE}.json").is_file() else None
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



class ValidationGrids:
    """Prompts x (fusion coefficient, seed) of the adapter as it is at a step, drawn by draw.Drawer on
    a copy of the base model of the grids' own (loaded at the first grid, in the training's dtype):
    the images the run's files draw at each strength, as `balora generate` draws them."""

    def __init__(self, cfg: TrainConfig, out: Path, accelerator, unet, text: TextEncoders, dtype: torch.dtype):
        self.cfg, self.out, self.accelerator = cfg, out, accelerator
        self.unet, self.text, self.dtype = unet, text, dtype
        self._drawer = None

    def _drawing(self):
        if self._drawer is None:
            from balora_diffusion.draw import Drawer, Sampling
            from balora_diffusion.models import load_pipeline

            pipe = load_pipeline(self.cfg.base_model or None, device=self.accelerator.device, dtype=self.dtype,
                                 single_file_config=self.cfg.base_config or None)
            self._drawer = Drawer(pipe, Sampling(steps=self.cfg.sample_steps, guidance=self.cfg.guidance_scale))
        return self._drawer

    def write(self, path: Path, step: int) -> None:
        cfg = self.cfg
        prompts = cfg.grid_prompts or [cfg.caption_template.format(token=" ".join(cfg.token))]
        adapter = run_adapter(cfg, step, self.out.name, self.accelerator, self.unet, self.text)
        with self._drawing().hold([(adapter, 1.0)]) as drawer:
            images = drawer.draw_strengths(prompts, cfg.grid_seeds, cfg.fusion, progress=False)
        columns = [[image for at_strength in images for image in at_strength[i]] for i in range(len(prompts))]
        labels = [f"w={w:g} seed {s}" for w in cfg.fusion for s in cfg.grid_seeds]
        write_grid(path, columns, row_labels=prompts, col_labels=labels,
                   title=f"{cfg.method}: rows = prompts, columns = fusion coefficient x seed")
