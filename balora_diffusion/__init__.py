"""balora-diffusion: LoRA concept training for Stable Diffusion 1.x with balanced update rules."""

__version__ = "0.1.0"
