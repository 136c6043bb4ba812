"""The files balora-diffusion ships, as package data: use balora_diffusion.paths to find them."""
