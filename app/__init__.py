"""The Gradio app (installed as balora_diffusion.app; `python -m app` from a source checkout)."""
