"""Concept training: `train(cfg)` (loop.py) and the parts the loop benchmark and other callers reuse.

loop.py holds the loop; objective.py the loss of a step and its update; state.py the checkpointed
training state; evaluate.py what a run measures as it goes; setup.py what it needs before step 0.
"""
from balora_diffusion.train.loop import TrainingDiverged, train
from balora_diffusion.text_encoding import tokenize
from balora_diffusion.train.objective import encode_latents, sample_latents, step_loss, update
from balora_diffusion.train.setup import latent_batches, library_versions, load_models, make_optimizer, resolution_step

__all__ = ["TrainingDiverged", "encode_latents", "latent_batches", "library_versions", "load_models",
           "make_optimizer", "resolution_step", "sample_latents", "step_loss", "tokenize", "train", "update"]
