"""Every option of `balora train`: one dataclass that is both the TOML schema and the flag list.

Each option's rules (type, range, choices) sit in its metadata next to its help text (see config.py);
a TrainConfig is checked whenever it is built, so a bad value fails before any model loads.
"""
from __future__ import annotations

from dataclasses import dataclass

from balora_diffusion.checkpoint_scoring import METRICS, twice_problem
from balora_diffusion.config import check_config, field
from balora_diffusion.draw import DEFAULT_GUIDANCE, DEFAULT_STEPS
from balora_diffusion import threads
from balora_diffusion.errors import UserError

# The loop derives per-step seeds by multiplying the seed: 32 bits keep them inside torch's 64.
SEED = {"ge": 0, "lt": 2**32}
# Image sides in pixels: SD 1.x was trained at 512 px (768 for 2.x-sized fine-tunes); past 2048 its
# images fall apart into repeated tiles, while the memory of a step grows with the side's fourth
# power through attention. 0 stands for the base model's native size.
MAX_SIDE = 2048
IMAGE_SIDE = {"ge": 0, "le": MAX_SIDE}


def _method_problem(method: str) -> str | None:
    from balora_diffusion.rules.registry import parse_method  # imports torch

    try:
        parse_method(method)
    except UserError as exc:
        return str(exc)
    return None


def _kind_problem(name: str) -> str | None:
    from balora_diffusion.adapters import KINDS  # imports torch

    return None if name in KINDS else f"unknown adapter kind {name!r}; expected one of {', '.join(KINDS)}"


def _optimizer_problem(name: str) -> str | None:
    from balora_diffusion.rules.build import BASES  # imports torch

    # exact names: the loop picks SGD's arguments by comparing with "sgd"
    return None if name in BASES else f"unknown base optimizer {name!r}; expected one of {', '.join(BASES)}"


def _buckets_problem(values: list[str]) -> str | None:
    from balora_diffusion.buckets import option_problem

    return option_problem(values, MAX_SIDE)


def _template_problem(template: str) -> str | None:
    try:
        template.format(token="")
    except (KeyError, IndexError, ValueError):
        return f"only {{token}} may stand in braces (write {{{{ and }}}} for literal ones), got {template!r}"
    return None


@dataclass
class TrainConfig:
    def __post_init__(self) -> None:
        check_config(self)
        if self.best_by and self.best_by not in self.eval_metrics:
            raise UserError(f"best_by {self.best_by} is not among eval_metrics ({' '.join(self.eval_metrics) or 'none'}): "
                            f"add it, e.g. --eval-metrics {' '.join([*self.eval_metrics, self.best_by])}")

    # --- data
    data_dir: str = field("", "folder of concept images with optional same-name .txt captions",
                          path=True)
    token: list[str] = field(["<sks>"], "placeholder token(s) added to the tokenizer, each with a trainable embedding",
                             nonempty=True)
    init_word: str = field("object", "real word whose embedding initialises the new token(s)",
                           nonempty=True)
    caption_template: str = field("a photo of a {token}", "caption for images without a .txt file; {token} = the token(s)",
                                  check=_template_problem)
    resolution: int = field(0, "training resolution in pixels, a multiple of what the base model halves its "
                               "images by; 0 = the base model's native resolution", **IMAGE_SIDE)
    repeats: int = field(1, "times each image appears per epoch", ge=1)
    random_crop: bool = field(False, "random instead of centre square crop")
    flip: bool = field(True, "random horizontal flips")
    buckets: list[str] = field(["off"], "aspect-ratio buckets: off (square centre crops), auto (sizes of about "
                                        "resolution^2 pixels, aspects up to 2:1) or sizes such as 64x48 48x64; each "
                                        "image trains at the bucket nearest its aspect, each batch from one bucket",
                               check=_buckets_problem)
    masked_loss: bool = field(False, "weight the loss by a mask per image: NAME.mask.png beside it (white = "
                                     "subject) or the image's alpha channel")
    unmasked_weight: float = field(0.0, "with masked_loss: loss weight of the background (mask 0) against the "
                                        "subject's 1; 0 ignores the background", ge=0, le=1)
    holdout: int = field(0, "images kept out of training (drawn with heldout_seed); their fixed-noise loss is "
                            "holdout_loss, which measures generalisation, beside fit_loss on the training images",
                         ge=0)
    prior_prompt: str = field("", "prior preservation: a class prompt without the token (e.g. 'a heart'); the "
                                  "adapted model is trained to answer it as the base model does; empty = off")
    prior_weight: float = field(1.0, "weight of the prior-preservation loss against the concept's", ge=0)
    cache_latents: bool = field(True, "encode each image (and its mirror image with flip) with the VAE once "
                                      "before training and sample the stored distribution at every step; "
                                      "not with random_crop, whose crops differ at every step")

    # --- base model and LoRA
    base_model: str = field("", "diffusers folder or single-file .safetensors; empty = the shipped tiny model",
                            path=True)
    base_config: str = field("", "for a single-file base model: diffusers folder with its component configs "
                                 "and tokenizer; empty = the shipped ones of the file's model family "
                                 "(SD 1.5's, SDXL base's)", path=True)
    adapter_kind: str = field("lora", "adapter kind: lora (B A added to each weight) or dora (LoRA's direction "
                                      "with a trained magnitude per output row, peft's use_dora)",
                              check=_kind_problem)
    rank: int = field(4, "LoRA rank of the UNet", ge=1)
    alpha: float = field(4.0, "LoRA alpha of the UNet (scale = alpha / rank)", gt=0)
    unet_targets: list[str] = field(["to_q", "to_k", "to_v", "to_out.0"],
                                    "UNet module names that get LoRA (e.g. add ff.net.0.proj ff.net.2 conv1 conv2)",
                                    nonempty=True)
    train_text_encoder: bool = field(True, "also put LoRA on the text encoder")
    train_text_encoder_2: bool = field(True, "with train_text_encoder, also put LoRA on a second text encoder "
                                             "(SDXL's); its new-token rows train either way")
    text_rank: int = field(4, "LoRA rank of the text encoder", ge=1)
    text_alpha: float = field(4.0, "LoRA alpha of the text encoder", gt=0)
    text_targets: list[str] = field(["q_proj", "k_proj", "v_proj", "out_proj"], "text-encoder module names that get LoRA",
                                    nonempty=True)
    mixed_precision: str = field("no", "dtype of the frozen base on CUDA; LoRA weights stay fp32",
                                 choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = field(False, "trade compute for memory in the UNet and text encoder")

    # --- update rule and optimizer
    method: str = field("balora", "update rule: lora, loraplus, scaled, ilora, pilora, balora, balora+scaled, hilora, ...",
                        check=_method_problem)
    optimizer: str = field("adamw", "base optimizer: adamw, adamw8bit (bitsandbytes), adam, sgd",
                           check=_optimizer_problem)
    lr_unet: float = field(1e-4, "learning rate of the UNet LoRA", gt=0)
    lr_text: float = field(1e-5, "learning rate of the text-encoder LoRA", gt=0)
    lr_embedding: float = field(1e-3, "learning rate of the new token embedding(s); 0 freezes them", ge=0)
    adam_beta1: float = field(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = field(0.999, "AdamW beta2", ge=0, lt=1)
    weight_decay: float = field(0.01, "decoupled weight decay", ge=0)
    loraplus_ratio: float = field(16.0, "LoRA+: lr of B over lr of A", gt=0)
    precond_reg: float = field(1e-6, "damping of the scaled-LoRA preconditioner", ge=0)
    ilora_lambda: float = field(1.0, "iLoRA regularisation factor", ge=0)
    project_every: int = field(1, "BaLoRA: project every k steps", ge=1)
    balora_state: str = field("keep", "BaLoRA optimizer state after a projection", choices=["keep", "reset_once", "carry"])

    # --- loop
    steps: int = field(500, "optimizer steps", ge=1)
    batch_size: int = field(4, "images per step and process", ge=1)
    lr_scheduler: str = field("constant", "learning-rate schedule",
                              choices=["constant", "linear", "cosine", "constant_with_warmup"])
    warmup_steps: int = field(0, "linear warm-up steps", ge=0)
    noise_offset: float = field(0.0, "offset noise strength (per-channel constant added to the noise)", ge=0)
    min_snr_gamma: float = field(0.0, "min-SNR loss weighting gamma; 0 disables it", ge=0)
    max_grad_norm: float = field(1.0, "gradient clipping norm; 0 disables it", ge=0)
    seed: int = field(0, "seed of batches, noise and LoRA initialisation", **SEED)
    cpu_threads: int = field(0, threads.HELP, ge=0)

    # --- evaluation and outputs
    output_dir: str = field("runs/train", "run folder (created; checkpoints, logs, adapter, grids)",
                            nonempty=True, path=True)
    checkpoint_every: int = field(100, "write a resumable checkpoint every N steps", ge=1)
    eval_every: int = field(100, "held-out loss and balance diagnostics every N steps", ge=1)
    grid_every: int = field(0, "validation grid every N steps; 0 = only at the end", ge=0)
    heldout_size: int = field(16, "number of fixed (image, noise, timestep) triples of fit_loss (and of holdout_loss)",
                              ge=1)
    heldout_seed: int = field(1234, "seed of the held-out triples (keep it fixed to compare runs)", **SEED)
    grid_prompts: list[str] = field([], "validation prompts; empty = the caption template")
    grid_seeds: list[int] = field([1, 2], "sampling seeds of the validation grid", nonempty=True, **SEED)
    fusion: list[float] = field([0.0, 0.7, 1.0], "fusion coefficients (LoRA strength) of the validation grid",
                                nonempty=True)
    sample_steps: int = field(DEFAULT_STEPS, "sampling steps of the validation grid", ge=1)
    guidance_scale: float = field(DEFAULT_GUIDANCE, "classifier-free guidance of the validation grid", ge=0)
    # --- scores of the adapter while training (balora eval's metrics)
    eval_metrics: list[str] = field([], "score the adapter at checkpoints: clip-t (prompt-image agreement), clip-i "
                                        "and dino (likeness to the held-out images, else the training images), "
                                        "fidelity and adherence (the world concept's pixel scores; need concept.toml); "
                                        "into metrics.jsonl, TensorBoard and scores.png; the images are drawn by a "
                                        "second copy of the base model, in memory from the first scored step; "
                                        "empty = off",
                                    choices=METRICS, check=twice_problem)
    eval_clip: str = field("", "CLIP model of clip-t and clip-i: a folder or a hub id in the local cache; empty = "
                               "balora eval's default")
    eval_dino: str = field("", "DINO / DINOv2 model of dino: a folder or a hub id in the local cache; empty = "
                               "balora eval's default")
    eval_metrics_every: int = field(0, "score every N steps (a checkpoint is written at each scored step); 0 = at "
                                       "every checkpoint_every", ge=0)
    eval_seeds: list[int] = field([1], "sampling seeds of the scored images: each of the concept's evaluation "
                                       "prompts is drawn once per seed", nonempty=True, **SEED)
    eval_sample_steps: int = field(8, "sampling steps of the scored images (few: they are drawn at every scored "
                                      "step; balora eval --steps N --seeds S --fusion 1 gives the same scores)", ge=1)
    best_by: str = field("", "keep the checkpoint that scores best on this metric (one of eval_metrics) in every "
                             "format in RUN/best/, as balora eval --best-by does; empty = off",
                         choices=["", *METRICS])
    resume: str = field("", "'latest' or a checkpoint folder to continue from", path=True,
                        not_paths=["latest"])
    overwrite: bool = field(False, "start over in an output_dir that holds a run: its checkpoints, metrics, "
                                   "adapter, run.json and grids are deleted first (other files stay)")
