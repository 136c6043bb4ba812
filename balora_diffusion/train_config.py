"""Every option of `balora train`: one dataclass that is both the TOML schema and the flag list."""
from __future__ import annotations

from dataclasses import dataclass

from balora_diffusion.config import field


@dataclass
class TrainConfig:
    # --- data
    data_dir: str = field("", "folder of concept images with optional same-name .txt captions")
    token: list[str] = field(["<sks>"], "placeholder token(s) added to the tokenizer, each with a trainable embedding")
    init_word: str = field("object", "real word whose embedding initialises the new token(s)")
    caption_template: str = field("a photo of a {token}", "caption for images without a .txt file; {token} = the token(s)")
    resolution: int = field(0, "training resolution in pixels; 0 = the base model's native resolution")
    repeats: int = field(1, "times each image appears per epoch")
    random_crop: bool = field(False, "random instead of centre square crop")
    flip: bool = field(True, "random horizontal flips")

    # --- base model and LoRA
    base_model: str = field("", "diffusers folder or single-file .safetensors; empty = the shipped tiny model")
    base_config: str = field("", "for a single-file base model: diffusers folder with its component configs "
                                 "and tokenizer; empty = SD 1.5's, shipped in assets/sd15-config")
    rank: int = field(4, "LoRA rank of the UNet")
    alpha: float = field(4.0, "LoRA alpha of the UNet (scale = alpha / rank)")
    unet_targets: list[str] = field(["to_q", "to_k", "to_v", "to_out.0"],
                                    "UNet module names that get LoRA (e.g. add ff.net.0.proj ff.net.2 conv1 conv2)")
    train_text_encoder: bool = field(True, "also put LoRA on the text encoder")
    text_rank: int = field(4, "LoRA rank of the text encoder")
    text_alpha: float = field(4.0, "LoRA alpha of the text encoder")
    text_targets: list[str] = field(["q_proj", "k_proj", "v_proj", "out_proj"], "text-encoder module names that get LoRA")
    mixed_precision: str = field("no", "dtype of the frozen base on CUDA; LoRA weights stay fp32",
                                 choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = field(False, "trade compute for memory in the UNet and text encoder")

    # --- update rule and optimizer
    method: str = field("balora", "update rule: lora, loraplus, scaled, ilora, pilora, balora, balora+scaled, hilora, ...")
    optimizer: str = field("adamw", "base optimizer: adamw, adamw8bit (bitsandbytes), adam, sgd")
    lr_unet: float = field(1e-4, "learning rate of the UNet LoRA")
    lr_text: float = field(1e-5, "learning rate of the text-encoder LoRA")
    lr_embedding: float = field(1e-3, "learning rate of the new token embedding(s); 0 freezes them")
    adam_beta1: float = field(0.9, "AdamW beta1")
    adam_beta2: float = field(0.999, "AdamW beta2")
    weight_decay: float = field(0.01, "decoupled weight decay")
    loraplus_ratio: float = field(16.0, "LoRA+: lr of B over lr of A")
    precond_reg: float = field(1e-6, "damping of the scaled-LoRA preconditioner")
    ilora_lambda: float = field(1.0, "iLoRA regularisation factor")
    project_every: int = field(1, "BaLoRA: project every k steps")
    balora_state: str = field("keep", "BaLoRA optimizer state after a projection", choices=["keep", "reset_once", "carry"])

    # --- loop
    steps: int = field(500, "optimizer steps")
    batch_size: int = field(4, "images per step and process")
    lr_scheduler: str = field("constant", "learning-rate schedule",
                              choices=["constant", "linear", "cosine", "constant_with_warmup"])
    warmup_steps: int = field(0, "linear warm-up steps")
    noise_offset: float = field(0.0, "offset noise strength (per-channel constant added to the noise)")
    min_snr_gamma: float = field(0.0, "min-SNR loss weighting gamma; 0 disables it")
    max_grad_norm: float = field(1.0, "gradient clipping norm; 0 disables it")
    seed: int = field(0, "seed of batches, noise and LoRA initialisation")
    cpu_threads: int = field(0, "torch CPU threads; 0 = torch's default. Small models on a busy CPU often "
                                "run faster with 1")

    # --- evaluation and outputs
    output_dir: str = field("runs/train", "run folder (created; checkpoints, logs, adapter, grids)")
    checkpoint_every: int = field(100, "write a resumable checkpoint every N steps")
    eval_every: int = field(100, "held-out loss and balance diagnostics every N steps")
    grid_every: int = field(0, "validation grid every N steps; 0 = only at the end")
    heldout_size: int = field(16, "number of fixed (image, noise, timestep) triples of the held-out loss")
    heldout_seed: int = field(1234, "seed of the held-out triples (keep it fixed to compare runs)")
    grid_prompts: list[str] = field([], "validation prompts; empty = the caption template")
    grid_seeds: list[int] = field([1, 2], "sampling seeds of the validation grid")
    fusion: list[float] = field([0.0, 0.7, 1.0], "fusion coefficients (LoRA strength) of the validation grid")
    sample_steps: int = field(20, "sampling steps of the validation grid")
    guidance_scale: float = field(5.0, "classifier-free guidance of the validation grid")
    resume: str = field("", "'latest' or a checkpoint folder to continue from")
    overwrite: bool = field(False, "start over in an output_dir that holds a run: its checkpoints, metrics, "
                                   "adapter, run.json and grids are deleted first (other files stay)")
