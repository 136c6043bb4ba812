"""The field's concept metrics, over PIL images and models loaded through transformers' public classes.

    CLIP-T  prompt-image agreement: cosine of a CLIP image embedding and the CLIP text embedding of
            its prompt (the learned token replaced by its class word: CLIP never saw the token)
    CLIP-I  mean cosine of every generated image's CLIP image embedding with every reference image's
    DINO    the same with the CLS token of a self-supervised ViT (DINO, DINOv2): it tells apart
            instances of one class, which CLIP, trained on captions, largely does not

as DreamBooth defines them. Models come from a local folder or a hub id already in the Hugging Face
cache; nothing is downloaded, and a model that is not here is one UserError saying how to get it.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from balora_diffusion.errors import UserError

BATCH = 16


@dataclass
class Loaded:
    """A model in eval mode with the processor that prepares its inputs."""
    model: torch.nn.Module
    processor: object
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load(spec: str, what: str, flag: str, load_config, load_model, load_processor) -> Loaded:
    """`spec` as a folder when one is there, else as a hub id looked up in the local cache only."""
    from balora_diffusion.models import quiet_diffusers

    folder = Path(spec).expanduser()
    local = folder.exists()
    # a hub id is NAME or ORG/NAME: anything else (an absolute or relative path, a dangling link) was meant
    # as a folder, and the cache cannot hold it
    if not local and (folder.is_symlink() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1):
        raise UserError(f"{flag} {spec}: no such folder")
    source = str(folder) if local else spec
    if local and not (folder / "config.json").is_file():
        raise UserError(f"{flag} {folder}: not a transformers model folder (no config.json)")
    try:
        config = load_config(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        if local:
            raise UserError(f"{flag} {folder}: cannot read its config ({_first_line(exc)})") from None
        # a hub id that is not in the cache: nothing can be fetched here, so say how to bring it
        raise UserError(f"{flag} {spec}: no such folder and not in the Hugging Face cache; on a connected machine "
                        f"run `huggingface-cli download {spec} --local-dir DIR`, copy DIR here and give "
                        f"{flag} DIR") from None
    try:
        with quiet_diffusers():  # no loading bar on stderr, above the one line that may follow it
            model = load_model(source, config, local_files_only=True)
            processor = load_processor(source, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{flag} {source}: not a usable {what} model ({_first_line(exc)})") from None
    return Loaded(model.eval().requires_grad_(False), processor, source)


def load_clip(spec: str, device: str | torch.device = "cpu") -> Loaded:
    """A CLIP model (CLIPModel + CLIPProcessor) from a folder or a cached hub id; "" = the shipped world
    CLIP (paths.WORLD_CLIP), which knows only the toy world."""
    from transformers import AutoConfig, CLIPModel, CLIPProcessor

    from balora_diffusion import paths

    spec = spec or str(paths.WORLD_CLIP)

    def model(source, config, **kw):
        if config.model_type != "clip":
            raise ValueError(f"its config is a {config.model_type!r} model, not a CLIP model")
        # float32 whatever the file stores (the world CLIP ships in fp16): the scores are cosines of a few
        # images, where half precision saves nothing and costs digits
        return CLIPModel.from_pretrained(source, dtype=torch.float32, **kw)

    loaded = _load(spec, "CLIP", "--clip", AutoConfig.from_pretrained, model, CLIPProcessor.from_pretrained)
    loaded.model.to(device)
    return loaded


def load_dino(spec: str, device: str | torch.device = "cpu") -> Loaded:
    """A vision transformer with a CLS token (DINO's ViT, DINOv2) through AutoModel + AutoImageProcessor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    if not spec:  # nothing ships for DINO: the toy world has no instances of a class to tell apart
        raise UserError("--dino: no DINO model given; name one, e.g. --dino facebook/dinov2-small (a folder or a hub "
                        "id in the local cache)")

    def model(source, config, **kw):
        if config.model_type == "clip" or getattr(config, "vision_config", None) is not None:
            raise ValueError(f"its config is a {config.model_type!r} model, not a vision transformer such as DINOv2")
        loaded = AutoModel.from_pretrained(source, **kw)
        if "pixel_values" not in inspect.signature(loaded.forward).parameters:
            raise ValueError(f"a {config.model_type!r} model takes no images")
        return loaded

    loaded = _load(spec, "DINO", "--dino", AutoConfig.from_pretrained, model, AutoImageProcessor.from_pretrained)
    loaded.model.to(device)
    return loaded


def _chunks(items: Sequence, size: int = BATCH):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def clip_image_embeddings(clip: Loaded, images: Sequence[Image.Image]) -> torch.Tensor:
    """Unit CLIP image embeddings, one row per image."""
    rows = []
    for chunk in _chunks(_rgb(images)):
        pixels = clip.processor(images=chunk, return_tensors="pt")["pixel_values"].to(clip.device)
        # the projection of the pooled vision output: what get_image_features returns in every transformers
        # version (which changed its return type in 5.0)
        rows.append(clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output))
    return _unit(torch.cat(rows))


@torch.no_grad()
def clip_text_embeddings(clip: Loaded, texts: Sequence[str]) -> torch.Tensor:
    """Unit CLIP text embeddings, one row per text (cut at CLIP's 77 tokens)."""
    rows = []
    for chunk in _chunks(list(texts)):
        tokens = clip.processor(text=chunk, return_tensors="pt", padding=True, truncation=True)
        out = clip.model.text_model(input_ids=tokens["input_ids"].to(clip.device),
                                    attention_mask=tokens["attention_mask"].to(clip.device))
        rows.append(clip.model.text_projection(out.pooler_output))
    return _unit(torch.cat(rows))


@torch.no_grad()
def dino_embeddings(dino: Loaded, images: Sequence[Image.Image]) -> torch.Tensor:
    """Unit CLS-token embeddings (the last layer's first token), one row per image."""
    rows = []
    for chunk in _chunks(_rgb(images)):
        pixels = dino.processor(images=chunk, return_tensors="pt")["pixel_values"].to(dino.device)
        rows.append(dino.model(pixel_values=pixels).last_hidden_state[:, 0])
    return _unit(torch.cat(rows))


def _need(items: Sequence, what: str) -> None:
    if not items:
        raise ValueError(f"no {what}")


def clip_t(clip: Loaded, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
    """Mean cosine of each image with its own text (images[i] with texts[i])."""
    _need(images, "images")
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts")
    return float((clip_image_embeddings(clip, images) * clip_text_embeddings(clip, texts)).sum(-1).mean())


def mean_pairwise(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine over every (generated, reference) pair of unit embeddings."""
    return float((generated @ references.T).mean())


def clip_i(clip: Loaded, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    _need(images, "images")
    _need(references, "reference images")
    return mean_pairwise(clip_image_embeddings(clip, images), clip_image_embeddings(clip, references))


def dino(model: Loaded, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    _need(images, "images")
    _need(references, "reference images")
    return mean_pairwise(dino_embeddings(model, images), dino_embeddings(model, references))
