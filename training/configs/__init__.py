"""The shipped training configs, as package data: use balora_diffusion.paths to find them."""
