"""Build the tiny Stable-Diffusion-architecture base model (assets/tiny-sd) from nothing.

Same classes and code paths as SD 1.5 (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel with the real CLIP BPE tokenizer and its full 49,408-token vocabulary), trained on the
procedural world of balora_diffusion.world:

  stage 1  the VAE: L1 reconstruction + an edge (image-gradient) term + a small KL term;
           then the latent scaling factor is measured (1 / std of the latents, SD's 0.18215)
  stage 2  UNet + text encoder together, from scratch, through the diffusion loss, on VAE latents,
           with v-prediction on a zero-terminal-SNR schedule (without it the background colour
           follows the starting noise instead of the prompt) and ~10 % caption dropout so that
           classifier-free guidance works; the exported weights are an EMA of the trained ones.

Seeded; checkpoints are written atomically every N steps and `--resume` continues an interrupted
build exactly where it stopped. Weights train in fp32 (bf16 autocast on CUDA) and ship in fp16.

    python training/build_tiny_model.py --config training/tiny_model.toml --out assets/tiny-sd
    python training/build_tiny_model.py --quick --out /tmp/tiny      # seconds, for tests / CI
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from balora_diffusion import paths, world
from balora_diffusion.checkpoint import checkpoint_step, list_checkpoints, load_tree, write_checkpoint
from balora_diffusion.config import add_config_arguments, config_from_args, field
from balora_diffusion.devices import pick_device
from balora_diffusion.errors import UserError
from balora_diffusion.models import quiet_diffusers, save_pipeline

REPO = Path(__file__).resolve().parent.parent
QUICK_CONFIG = REPO / "training" / "tiny_model_quick.toml"
EXIT_STOPPED = 3  # stopped at --time-limit with a checkpoint; rerun with --resume
# Options that may change between an interrupted build and its resumption.
RUN_ONLY = {"device", "workers", "time_limit", "out"}


@dataclass
class BuildConfig:
    out: str = field("runs/tiny-sd", "folder the finished diffusers pipeline is written to "
                     "(checkpoints go to the sibling folder <out>-state, removed when the build completes)")
    tokenizer: str = field("assets/tokenizer", "folder with the CLIP BPE tokenizer files (relative to the repo)")
    seed: int = field(0, "seed of the data, the initialisation, batches and noise")
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    resolution: int = field(64, "image side in pixels")
    pool_size: int = field(40000, "jittered training-split renders drawn once and sampled from at every step")
    workers: int = field(0, "render processes for the pool (0 = render in this process)")
    # --- VAE
    vae_channels: list[int] = field([32, 64, 64], "VAE block widths; n blocks downsample by 2^(n-1)")
    vae_layers_per_block: int = field(1, "ResNet layers per VAE block")
    latent_channels: int = field(4, "latent channels (4 as in SD)")
    vae_steps: int = field(3000, "VAE optimizer steps")
    vae_batch_size: int = field(64, "VAE images per step")
    vae_lr: float = field(1e-3, "VAE peak learning rate (AdamW, warm-up then cosine decay)")
    vae_kl_weight: float = field(1e-5, "weight of the KL term (per latent element) against per-pixel L1")
    vae_edge_weight: float = field(1.0, "weight of the L1 between image gradients of output and input (sharp edges)")
    vae_random_fraction: float = field(0.5, "share of each VAE batch drawn from world.render_random images "
                                       "(arbitrary colours and shapes), so the VAE encodes what users bring")
    random_pool_size: int = field(20000, "random-shape images drawn once for the VAE")
    # --- text encoder
    text_hidden: int = field(64, "text-encoder width = cross-attention width; costs 49,408 x this in the embedding")
    text_layers: int = field(4, "text-encoder transformer layers")
    text_heads: int = field(4, "text-encoder attention heads")
    # --- UNet
    unet_channels: list[int] = field([64, 128, 128], "UNet block widths (the latent is downsampled between blocks)")
    unet_layers_per_block: int = field(1, "ResNet (+ attention) layers per UNet block")
    unet_attention_levels: int = field(2, "how many of the highest-resolution UNet levels have cross-attention")
    unet_heads: int = field(4, "attention heads in the UNet transformer blocks")
    unet_steps: int = field(8000, "UNet + text-encoder optimizer steps")
    unet_batch_size: int = field(256, "latents per UNet step")
    unet_lr: float = field(5e-4, "UNet peak learning rate (AdamW, warm-up then cosine decay)")
    text_lr: float = field(5e-4, "text-encoder peak learning rate")
    caption_dropout: float = field(0.1, "fraction of captions replaced by the empty prompt (for guidance)")
    attribute_dropout: float = field(0.2, "chance that each of the dropout_attributes is left out of a training "
                                     "caption, independently (teaches each word on its own)")
    # A caption that leaves out the background still shows one, never green under a purple object
    # when that pair is held out: the model learnt "purple -> not green" and drew the held-out pairs
    # on gray (64 % held-out backgrounds with all four omissible, 100 % with size and position only).
    dropout_attributes: list[str] = field(["size", "position"],
                                          f"which of {', '.join(world.CAPTION_ATTRIBUTES)} attribute_dropout may omit "
                                          "(leaving out a colour or the background entangles the colours)")
    ema_decay: float = field(0.999, "EMA decay of the exported UNet / text-encoder weights; 0 exports the raw ones")
    warmup_steps: int = field(200, "linear learning-rate warm-up steps of each stage")
    max_grad_norm: float = field(1.0, "gradient clipping norm")
    # --- run
    checkpoint_every: int = field(1000, "write a resumable checkpoint every N steps (in stage 2 also a "
                                  "usable pipeline into --out)")
    time_limit: float = field(0.0, "minutes after which to checkpoint and stop (exit code 3); 0 = no limit")


# --- models ----------------------------------------------------------------------------------

MIN_CHANNELS_PER_GROUP = 8


def _groups(channels: list[int]) -> int:
    """GroupNorm groups: the most (at most SD's 32) that divide every block width and keep at least
    MIN_CHANNELS_PER_GROUP channels per group. A group norm removes each group's mean over the
    image; with one or two channels per group (32 groups of a 32-wide block) that is nearly an
    instance norm, which on a flat-coloured image erases the absolute colour: the first VAE built
    that way decoded red and yellow objects as orange."""
    groups = gcd(32, *channels)
    while groups > 1 and min(channels) // groups < MIN_CHANNELS_PER_GROUP:
        groups //= 2
    return groups


def build_vae(cfg: BuildConfig):
    from diffusers import AutoencoderKL
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
                         layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=_groups(cfg.vae_channels), sample_size=cfg.resolution)


def build_text_encoder(cfg: BuildConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
                            intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                            num_attention_heads=cfg.text_heads, max_position_embeddings=tokenizer.model_max_length,
                            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def build_unet(cfg: BuildConfig):
    from diffusers import UNet2DConditionModel
    n, attn = len(cfg.unet_channels), cfg.unet_attention_levels
    if not 0 < attn <= n:
        raise UserError(f"unet_attention_levels must be in 1..{n}, got {attn}")
    return UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * attn + ("DownBlock2D",) * (n - attn),
        up_block_types=("UpBlock2D",) * (n - attn) + ("CrossAttnUpBlock2D",) * attn,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,
        norm_num_groups=_groups(cfg.unet_channels))


def train_scheduler():
    """SD 1.5's scaled-linear betas, rescaled to zero terminal SNR, with v-prediction and
    trailing timesteps (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed")."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)


def sampling_scheduler():
    """The shipped sampler: DDIM on the training schedule; the last step lands on the clean image."""
    from diffusers import DDIMScheduler
    # steps_offset is unused by trailing spacing; 1 keeps diffusers' "outdated config" warning quiet
    return DDIMScheduler.from_config(train_scheduler().config, set_alpha_to_one=True, steps_offset=1)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- data ------------------------------------------------------------------------------------

def to_pixels(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return images[index].float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> 0..255 uint8, the inverse of to_pixels."""
    return ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Pool:
    images: torch.Tensor       # (N, 3, H, W) uint8
    scene_ids: torch.Tensor    # (N,) which of the U unique scenes each image shows
    tokens: torch.Tensor       # (U * VARIANTS + 1, 77) token ids: row u * VARIANTS + m is scene u's caption
                               # omitting the attributes in bit mask m (omit_set); the last row is ""
    random_images: torch.Tensor  # (M, 3, H, W) uint8: world.render_random, for the VAE only

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        return to_pixels(self.images, index)


VARIANTS = 2 ** len(world.CAPTION_ATTRIBUTES)


def omit_set(mask: int) -> tuple[str, ...]:
    return tuple(a for bit, a in enumerate(world.CAPTION_ATTRIBUTES) if mask >> bit & 1)


def _collate(items: list[dict]) -> tuple[torch.Tensor, list[world.Scene]]:
    pixels = torch.stack([it["pixel_values"] for it in items])
    return to_uint8(pixels), [it["scene"] for it in items]


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, resolution: int, seed: int, length: int):
        self.resolution, self.seed, self.length = resolution, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        image = world.render_random(self.resolution, seed=self.seed * 1_000_003 + i)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def render_pool(cfg: BuildConfig, tokenizer, device: torch.device) -> Pool:
    data = world.WorldDataset(resolution=cfg.resolution, seed=cfg.seed, length=cfg.pool_size, split="train")
    loader = torch.utils.data.DataLoader(data, batch_size=256, num_workers=cfg.workers, collate_fn=_collate)
    images, scenes = [], []
    for pixels, batch_scenes in tqdm(loader, desc="rendering world", unit="batch"):
        images.append(pixels)
        scenes.extend(batch_scenes)
    unique = sorted(set(scenes), key=world.Scene.caption)
    index = {s: i for i, s in enumerate(unique)}
    captions = [s.caption(omit_set(m)) for s in unique for m in range(VARIANTS)]
    tokens = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    random_images = torch.zeros((0, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8)
    if cfg.vae_random_fraction > 0 and cfg.random_pool_size > 0:
        loader = torch.utils.data.DataLoader(RandomImages(cfg.resolution, cfg.seed, cfg.random_pool_size),
                                             batch_size=256, num_workers=cfg.workers)
        random_images = torch.cat([b for b in tqdm(loader, desc="rendering random shapes", unit="batch")])
    return Pool(images=torch.cat(images).to(device), scene_ids=torch.tensor([index[s] for s in scenes], device=device),
                tokens=tokens.to(device), random_images=random_images.to(device))


# --- training pieces -------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae, pixels: torch.Tensor, cfg: BuildConfig, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample.float()
    loss = F.l1_loss(recon, pixels)
    if cfg.vae_edge_weight:
        loss = loss + cfg.vae_edge_weight * sum(F.l1_loss(a, b) for a, b in zip(image_gradients(recon),
                                                                                image_gradients(pixels)))
    kl_per_element = posterior.kl().float().mean() / posterior.mean[0].numel()
    return loss + cfg.vae_kl_weight * kl_per_element


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    for e, p in zip(ema, live):
        e.lerp_(p, 1.0 - decay)


def as_arrays(pixels: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, H, W) in [-1, 1] -> N (H, W, 3) uint8 arrays, what world.classify and fidelity read."""
    return list(to_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def roundtrip(vae, pixels: torch.Tensor, batch: int = 256) -> list[np.ndarray]:
    """Encode (posterior mean) and decode (N, 3, H, W) images in [-1, 1]; uint8 arrays back."""
    out = []
    for chunk in pixels.split(batch):
        out.extend(as_arrays(vae.decode(vae.encode(chunk.to(vae.device)).latent_dist.mean).sample.float()))
    return out


def vae_roundtrip_report(vae, resolution: int) -> dict[str, float]:
    """What survives an encode/decode: world.classify accuracies over every scene of the world, and
    the demo concept's fidelity score before and after. The UNet cannot draw what the VAE loses."""
    from balora_diffusion.concept import fidelity, load_concept
    from balora_diffusion.data import load_image, prepare

    scenes = world.all_scenes()
    pixels = torch.stack([world.image_to_tensor(world.render(s, resolution)) for s in scenes])
    measured = [world.classify(image) for image in roundtrip(vae, pixels)]
    report = {f"world_{key}_accuracy": float(np.mean([m[key] == getattr(s, field) for s, m in zip(scenes, measured)]))
              for key, field in (("background", "background"), ("object", "colour"), ("shape", "shape"))}
    concept = load_concept(paths.DEMO_CONCEPT)
    # prepared as concept training prepares them (centre crop, no flip)
    prepared = torch.stack([prepare(load_image(p), resolution, torch.Generator(), random_crop=False, flip=False)
                            for p in concept.images])
    decoded = roundtrip(vae, prepared)
    report["concept_fidelity_input"] = float(np.mean([fidelity(i, concept) for i in as_arrays(prepared)]))
    report["concept_fidelity_roundtrip"] = float(np.mean([fidelity(i, concept) for i in decoded]))
    return report


def ema_decay_at(step: int, decay: float) -> float:
    """The usual warm-up of the EMA: early weights are forgotten quickly."""
    return min(decay, (1 + step) / (10 + step))


@dataclass
class Latents:
    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * noise) * self.scaling_factor


@torch.no_grad()
def encode_pool(vae, pool: Pool, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in tqdm(range(0, len(pool.images), batch), desc="encoding latents", unit="batch"):
        dist = vae.encode(pool.pixels(torch.arange(start, min(start + batch, len(pool.images)),
                                                   device=pool.images.device))).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def measure_scaling_factor(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> float:
    """1 / std of sampled latents, as SD's 0.18215 was measured: the UNet then sees unit-variance data."""
    sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    return float(1.0 / sample.std())


# --- checkpoints and export ------------------------------------------------------------------

def state_dir(cfg: BuildConfig) -> Path:
    out = Path(cfg.out)
    return out.with_name(out.name + "-state")


def comparable(cfg: BuildConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}


def start(build, resume: bool) -> None:
    """A recipe's build resumed from its state folder, or started there only if that holds no checkpoint:
    a fresh start must not silently mix with an interrupted build's state."""
    if resume:
        build.restore()
    elif list_checkpoints(build.state):
        raise UserError(f"{build.state} holds the checkpoint of an interrupted build: pass --resume to "
                        "continue it, or delete the folder to start again")


def newest_state(state: Path, config: dict) -> tuple[Path, dict]:
    """A recipe's newest checkpoint and its meta tree, refused unless it was made with `config`."""
    found = list_checkpoints(state)
    if not found:
        raise UserError(f"--resume: no checkpoint in {state}")
    folder = found[-1]
    meta = load_tree(folder, "meta")
    if meta["config"] != config:
        changed = sorted(k for k in config if meta["config"].get(k) != config[k])
        raise UserError(f"--resume: the checkpoint in {folder} was made with other options ({', '.join(changed)})")
    return folder, meta


def export_pipeline(out: Path, vae, unet, text_encoder, tokenizer_dir: Path, info: dict) -> None:
    """Write the fp16 diffusers folder next to `out`, then swap it in: a reader never sees half a model."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    def half(module):
        return copy.deepcopy(module).to("cpu", torch.float16).eval()

    tmp = out.with_name(f".{out.name}.tmp")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_diffusers():
        pipe = StableDiffusionPipeline(vae=half(vae), text_encoder=half(text_encoder),
                                       tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=half(unet),
                                       scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    save_pipeline(pipe, tmp)
    # ship the real BPE files (vocab.json + merges.txt) as vendored, not a re-serialisation of them
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    (tmp / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- the build -------------------------------------------------------------------------------

class Build:
    """Both stages, with the state a checkpoint must hold to resume bit-for-bit."""

    def __init__(self, cfg: BuildConfig):
        from transformers import CLIPTokenizer

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.tokenizer_dir = (REPO / cfg.tokenizer) if not Path(cfg.tokenizer).is_absolute() else Path(cfg.tokenizer)
        if not (self.tokenizer_dir / "vocab.json").is_file():
            raise UserError(f"no CLIP tokenizer (vocab.json) in {self.tokenizer_dir}")
        self.tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_dir)
        self.out, self.state = Path(cfg.out), state_dir(cfg)
        self.started = time.monotonic()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.vae = build_vae(cfg).to(self.device)
        self.text_encoder = build_text_encoder(cfg, self.tokenizer).to(self.device)
        self.unet = build_unet(cfg).to(self.device)
        self.vae_opt = self._adamw([(self.vae.parameters(), cfg.vae_lr)])
        self.opt = self._adamw([(self.unet.parameters(), cfg.unet_lr), (self.text_encoder.parameters(), cfg.text_lr)])
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.meta = {"step": 0, "scaling_factor": None, "vae_roundtrip": None, "vae_loss": [], "unet_loss": [],
                     "seconds": {"vae": 0.0, "unet": 0.0}, "config": comparable(cfg)}
        self.noise_scheduler = train_scheduler()
        unknown = set(cfg.dropout_attributes) - set(world.CAPTION_ATTRIBUTES)
        if unknown:
            raise UserError(f"dropout_attributes: unknown {sorted(unknown)}; expected some of {world.CAPTION_ATTRIBUTES}")
        self.may_omit = torch.tensor([a in cfg.dropout_attributes for a in world.CAPTION_ATTRIBUTES], device=self.device)

    def _adamw(self, groups) -> torch.optim.AdamW:
        return torch.optim.AdamW([{"params": list(p), "lr": lr, "peak_lr": lr} for p, lr in groups],
                                 betas=(0.9, 0.99), weight_decay=0.01)

    # -- checkpoints
    def _trees(self) -> dict:
        meta = dict(self.meta, rng=self.generator.get_state())
        return {"meta": meta, "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                "ema_unet": self.ema_unet.state_dict(), "ema_text_encoder": self.ema_text_encoder.state_dict(),
                "opt": self.opt.state_dict()}

    def save(self) -> None:
        write_checkpoint(self.state, self.meta["step"], self._trees())

    def restore(self) -> None:
        folder, meta = newest_state(self.state, comparable(self.cfg))
        for name in ("vae", "unet", "text_encoder", "ema_unet", "ema_text_encoder"):
            getattr(self, name).load_state_dict(load_tree(folder, name, self.device))
        self.vae_opt.load_state_dict(load_tree(folder, "vae_opt", self.device))
        self.opt.load_state_dict(load_tree(folder, "opt", self.device))
        self.generator.set_state(meta.pop("rng"))
        self.meta = meta
        print(f"resumed from {folder} (step {checkpoint_step(folder)})")

    def out_of_time(self) -> bool:
        return self.cfg.time_limit > 0 and time.monotonic() - self.started > 60 * self.cfg.time_limit

    def info(self, complete: bool) -> dict:
        vae_steps = min(self.meta["step"], self.cfg.vae_steps)
        unet_steps = max(0, self.meta["step"] - self.cfg.vae_steps)
        return {"complete": complete, "config": dataclasses.asdict(self.cfg),
                "vae_steps_done": vae_steps, "unet_steps_done": unet_steps,
                "scaling_factor": self.meta["scaling_factor"], "vae_roundtrip": self.meta["vae_roundtrip"],
                "seconds": self.meta["seconds"],
                "seconds_per_step": {"vae": self.meta["seconds"]["vae"] / max(1, vae_steps),
                                     "unet": self.meta["seconds"]["unet"] / max(1, unet_steps)},
                "parameters": {"vae": count_params(self.vae), "unet": count_params(self.unet),
                               "text_encoder": count_params(self.text_encoder)},
                "loss_log": {"vae": self.meta["vae_loss"], "unet": self.meta["unet_loss"]},
                "hardware": torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
                "versions": {"torch": torch.__version__, "python": platform.python_version()}}

    def export(self, complete: bool) -> None:
        unet, text_encoder = ((self.ema_unet, self.ema_text_encoder) if self.cfg.ema_decay > 0
                              else (self.unet, self.text_encoder))
        export_pipeline(self.out, self.vae, unet, text_encoder, self.tokenizer_dir, self.info(complete))

    # -- stages
    def _loop(self, stage: str, first: int, total: int, step_fn) -> bool:
        """Run steps first..total-1 of a stage; False if stopped by the time limit."""
        cfg = self.cfg
        bar = tqdm(range(first, total), desc=f"stage {stage}", initial=first, total=total, unit="step")
        running = None
        for local in bar:
            tick = time.monotonic()
            loss = step_fn(local)
            if not math.isfinite(loss):
                raise RuntimeError(f"{stage} loss became {loss} at step {local}; the last good checkpoint is in "
                                   f"{self.state} (lower the learning rate and --resume)")
            self.meta["seconds"][stage] += time.monotonic() - tick
            self.meta["step"] += 1
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if local % 50 == 0 or local == total - 1:
                bar.set_postfix(loss=f"{running:.4f}")
                self.meta[f"{stage}_loss"].append([local, round(running, 6)])
            done = local == total - 1
            if (local + 1) % cfg.checkpoint_every == 0 or done or self.out_of_time():
                self.save()
                if stage == "unet":
                    self.export(complete=done)
                if not done and self.out_of_time():
                    bar.close()
                    return False
        bar.close()
        return True

    def vae_step(self, step: int) -> float:
        cfg = self.cfg
        set_lr(self.vae_opt, lr_factor(step, cfg.vae_steps, cfg.warmup_steps))
        n_random = round(cfg.vae_batch_size * cfg.vae_random_fraction) if len(self.pool.random_images) else 0
        index = torch.randint(len(self.pool.images), (cfg.vae_batch_size - n_random,), generator=self.generator,
                              device=self.device)
        random_index = torch.randint(max(1, len(self.pool.random_images)), (n_random,), generator=self.generator,
                                     device=self.device)
        pixels = torch.cat([self.pool.pixels(index), to_pixels(self.pool.random_images, random_index)])
        with self.autocast:
            loss = vae_loss(self.vae, pixels, cfg, self.generator)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.max_grad_norm)
        self.vae_opt.step()
        return float(loss.detach())

    def caption_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of pool.tokens for the images `index`: partial captions, some empty (for guidance)."""
        cfg, b = self.cfg, len(index)
        omitted = (torch.rand((b, len(world.CAPTION_ATTRIBUTES)), generator=self.generator,
                              device=self.device) < cfg.attribute_dropout) & self.may_omit
        bits = 2 ** torch.arange(len(world.CAPTION_ATTRIBUTES), device=self.device)
        caption = self.pool.scene_ids[index] * VARIANTS + (omitted.long() * bits).sum(1)
        dropped = torch.rand(b, generator=self.generator, device=self.device) < cfg.caption_dropout
        return torch.where(dropped, len(self.pool.tokens) - 1, caption)

    def unet_step(self, step: int) -> float:
        cfg = self.cfg
        set_lr(self.opt, lr_factor(step, cfg.unet_steps, cfg.warmup_steps))
        b = cfg.unet_batch_size
        index = torch.randint(len(self.pool.images), (b,), generator=self.generator, device=self.device)
        latents = self.latents.sample(index, self.generator)
        caption = self.caption_rows(index)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=self.generator,
                          device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = self.noise_scheduler.get_velocity(latents, noise, t)
        with self.autocast:
            context = self.text_encoder(self.pool.tokens[caption])[0]
            pred = self.unet(noisy, t, context).sample
        loss = F.mse_loss(pred.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.opt.step()
        decay = ema_decay_at(step, cfg.ema_decay)
        ema_update(list(self.ema_unet.parameters()) + list(self.ema_text_encoder.parameters()),
                   list(self.unet.parameters()) + list(self.text_encoder.parameters()), decay)
        return float(loss.detach())

    def run(self) -> int:
        cfg = self.cfg
        self.pool = render_pool(cfg, self.tokenizer, self.device)
        if self.meta["step"] < cfg.vae_steps:
            self.vae.train()
            if not self._loop("vae", self.meta["step"], cfg.vae_steps, self.vae_step):
                return self.stopped()
        self.vae.eval().requires_grad_(False)
        mean, std = encode_pool(self.vae, self.pool)
        if self.meta["scaling_factor"] is None:
            self.meta["scaling_factor"] = measure_scaling_factor(mean, std, self.generator)
        self.vae.register_to_config(scaling_factor=self.meta["scaling_factor"])
        self.latents = Latents(mean, std, self.meta["scaling_factor"])
        print(f"latent scaling factor {self.meta['scaling_factor']:.5f}")
        if self.meta["vae_roundtrip"] is None:
            self.meta["vae_roundtrip"] = vae_roundtrip_report(self.vae, cfg.resolution)
        print("VAE round trip: " + ", ".join(f"{k} {v:.3f}" for k, v in self.meta["vae_roundtrip"].items()))
        first = self.meta["step"] - cfg.vae_steps
        if first < cfg.unet_steps:
            self.unet.train()
            self.text_encoder.train()
            if not self._loop("unet", first, cfg.unet_steps, self.unet_step):
                return self.stopped()
        else:
            self.export(complete=True)
        shutil.rmtree(self.state, ignore_errors=True)
        info = self.info(complete=True)
        print(f"wrote {self.out}: {json.dumps(info['parameters'])} parameters; seconds/step "
              f"vae {info['seconds_per_step']['vae']:.4f}, unet {info['seconds_per_step']['unet']:.4f}")
        return 0

    def stopped(self) -> int:
        print(f"stopped at the time limit after step {self.meta['step']}; continue with --resume "
              f"(checkpoint in {self.state})")
        return EXIT_STOPPED


def parse_args(argv: list[str] | None) -> tuple[BuildConfig, bool]:
    """(config, resume): defaults < --config (or --quick's file) < flags given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"use {QUICK_CONFIG.relative_to(REPO)} (a tiny model in seconds, for tests / CI) "
                        "unless --config is given")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted build from the newest checkpoint in <out>-state")
    add_config_arguments(parser, BuildConfig)
    args = parser.parse_args(argv)
    if args.quick and args.config is None:
        args.config = QUICK_CONFIG
    return config_from_args(BuildConfig, args), args.resume


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume = parse_args(argv)
        build = Build(cfg)
        start(build, resume)
        return build.run()
    except UserError as exc:
        print(f"build_tiny_model: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
