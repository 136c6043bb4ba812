"""CLIP-T, CLIP-I and DINO of balora_diffusion.metrics against the same numbers computed straight from
transformers' models (the full CLIP forward's logits, DINOv2's pooled output), on tiny saved models
loaded back through the metrics' own loaders; and the one-line errors for models that are not there."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from balora_diffusion import metrics
from balora_diffusion.errors import UserError

TEXTS = ["a red heart on a blue background", "a small ring", "a photo of a dog in the snow"]


def _images(seed: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # sizes and an aspect ratio other than the models' 32 px squares: the processors resize and crop
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return metrics.load_clip(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def dino(tiny_dino_dir):
    return metrics.load_dino(str(tiny_dino_dir))


def test_clip_t_is_the_cosine_in_clips_own_logits(clip, tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    images = _images(0, 3)
    with torch.no_grad():
        out = model(**processor(text=TEXTS, images=images, return_tensors="pt", padding=True))
        # logits are the cosines scaled by CLIP's learned temperature; the diagonal pairs image i with text i
        cosines = out.logits_per_image / model.logit_scale.exp()
    assert metrics.clip_t(clip, images, TEXTS) == pytest.approx(float(cosines.diagonal().mean()), abs=1e-5)
    # the pairing matters: the same images against the texts in another order score differently
    assert metrics.clip_t(clip, images, TEXTS[1:] + TEXTS[:1]) == pytest.approx(
        float(cosines[[0, 1, 2], [1, 2, 0]].mean()), abs=1e-5)


def test_clip_i_is_the_mean_cosine_of_every_pair(clip, tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    generated, references = _images(1, 3), _images(2, 2)
    with torch.no_grad():
        embeds = [model(**processor(text=["a"], images=group, return_tensors="pt")).image_embeds
                  for group in (generated, references)]
    expected = torch.nn.functional.cosine_similarity(embeds[0][:, None], embeds[1][None], dim=-1).mean()
    assert metrics.clip_i(clip, generated, references) == pytest.approx(float(expected), abs=1e-5)
    assert metrics.clip_i(clip, references, references) > metrics.clip_i(clip, generated, references)


def test_dino_is_the_mean_cosine_of_the_cls_tokens(dino, tiny_dino_dir):
    from transformers import AutoImageProcessor, Dinov2Model

    model, processor = Dinov2Model.from_pretrained(tiny_dino_dir), AutoImageProcessor.from_pretrained(tiny_dino_dir)
    generated, references = _images(3, 4), _images(4, 3)
    with torch.no_grad():
        # DINOv2's pooled output is its normalised CLS token
        cls = [model(**processor(images=group, return_tensors="pt")).pooler_output for group in (generated, references)]
    expected = torch.nn.functional.cosine_similarity(cls[0][:, None], cls[1][None], dim=-1).mean()
    assert metrics.dino(dino, generated, references) == pytest.approx(float(expected), abs=1e-5)


def test_batches_do_not_change_the_embeddings(clip, monkeypatch):
    images = _images(5, 5)
    whole = metrics.clip_image_embeddings(clip, images)
    monkeypatch.setattr(metrics, "BATCH", 2)
    torch.testing.assert_close(metrics.clip_image_embeddings(clip, images), whole, atol=1e-5, rtol=1e-5)


def test_a_model_of_the_wrong_kind_is_refused(tiny_clip_dir, tiny_dino_dir):
    with pytest.raises(UserError, match="not a CLIP model"):
        metrics.load_clip(str(tiny_dino_dir))
    with pytest.raises(UserError, match="not a vision transformer"):
        metrics.load_dino(str(tiny_clip_dir))


def test_no_clip_named_is_the_shipped_world_clip_and_no_dino_named_is_refused():
    from balora_diffusion import paths

    clip = metrics.load_clip("")
    assert clip.source == str(paths.WORLD_CLIP) and clip.model.dtype == torch.float32
    with pytest.raises(UserError, match="--dino: no DINO model given"):
        metrics.load_dino("")


def test_a_folder_without_weights_is_refused(tiny_clip_dir, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    with pytest.raises(UserError, match=r"--clip .*config-only: not a usable CLIP model"):
        metrics.load_clip(str(folder))


@pytest.mark.parametrize("metric, flag, spec, message", [
    ("clip-t", "--clip", "openai/clip-vit-large-patch14",
     "balora: error: --clip openai/clip-vit-large-patch14: no such folder and not in the Hugging Face cache; "
     "on a connected machine run `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`"),
    ("dino", "--dino", "{tmp}", "balora: error: --dino {tmp}: not a transformers model folder (no config.json)"),
    ("clip-t", "--clip", "{tmp}/no/such/clip", "balora: error: --clip {tmp}/no/such/clip: no such folder\n"),
    ("clip-t", "--clip", "{tmp}/loop", "balora: error: --clip {tmp}/loop: no such folder\n"),
])
def test_a_missing_model_is_one_line_through_the_cli(tmp_path, metric, flag, spec, message):
    from safetensors.torch import save_file

    from balora_diffusion import paths

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    embedding = tmp_path / "zorb.safetensors"  # the smallest adapter there is: a token embedding alone
    save_file({"<zorb>": torch.zeros(1, 32)}, str(embedding))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))  # an empty cache
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "eval", embedding, "--concept",
                             paths.DEMO_CONCEPT, "--metrics", metric, flag, spec.format(tmp=tmp_path),
                             "--out", tmp_path / "eval"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message.format(tmp=tmp_path)), result.stderr
