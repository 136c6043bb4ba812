"""Adapter files: one module per format, each a writer and a reader, all meeting in `Adapter`; what
differs between adapter kinds (LoRA, DoRA) is the kind's, in balora_diffusion.adapters.

diffusers_lora  diffusers / peft LoRA (pipe.load_lora_weights)
kohya_lora      kohya LoRA for SD 1.x and SDXL (A1111, ComfyUI, Forge, sd-scripts)
embedding       new-token embeddings (A1111, ComfyUI, load_textual_inversion)
ldm_checkpoint  whole models as one original-layout file
run_files       a training run's adapter, from its models or checkpoints, into the run folder
read            any of the above from a path; fuse applies them to a pipeline
registry        the LoRA formats `balora export --format` writes and `read` tells apart: a new
                format is its module plus one entry there
"""
