"""Model families other than Stable Diffusion 1.x (Stable Diffusion XL)."""
