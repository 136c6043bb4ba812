"""Latent caching: the cached distribution is the one the loop would get by encoding the batch,
batch by batch and draw by draw, and a run with it trains like one without."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

from balora_diffusion import paths
from balora_diffusion.data import ConceptData, read_concept_folder
from balora_diffusion.latent_cache import LatentCache
from balora_diffusion.train import encode_latents, sample_latents, train
from balora_diffusion.train_config import TrainConfig


def _data(flip: bool, random_crop: bool = False) -> ConceptData:
    examples = read_concept_folder(paths.DEMO_CONCEPT, ["<zorb>"], "a {token}")
    return ConceptData(examples, resolution=48, repeats=2, seed=5, random_crop=random_crop, flip=flip)


@pytest.mark.parametrize("flip", [False, True])
def test_variants_are_the_pixels_and_captions_of_the_batches(flip):
    data = _data(flip)
    flipped_seen = set()
    for step in range(12):
        pixels, captions, _ = data.batch(step, 3, rank=1, world_size=2)
        variants, variant_captions = data.batch_variants(step, 3, rank=1, world_size=2)
        assert variant_captions == captions
        assert torch.equal(torch.stack([data.variant(v)[0] for v in variants]), pixels)
        flipped_seen.update(f for _, f in variants)
    assert flipped_seen == ({False, True} if flip else {False})
    assert len(data.variants()) == len(data.examples) * (2 if flip else 1)


def test_random_crops_have_no_variants():
    data = _data(flip=True, random_crop=True)
    assert not data.variants_are_finite
    with pytest.raises(ValueError):
        data.batch_variants(0, 2)


def test_cached_latents_equal_encoding_each_batch_with_the_same_draws():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(paths.TINY_SD / "vae").eval()
    data = _data(flip=True)
    cache = LatentCache(data, vae, torch.device("cpu"), batch_size=5)
    for step in range(4):
        pixels, captions, _ = data.batch(step, 3)
        dist, cached_captions, _ = cache.batch(step, 3)
        assert cached_captions == captions
        with torch.no_grad():
            direct = encode_latents(vae, pixels, torch.Generator().manual_seed(step))
        cached = sample_latents(vae, dist, torch.Generator().manual_seed(step))
        # the same draws on the same distribution: only the VAE's batch composition differs
        torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)


def test_a_run_with_cached_latents_trains_like_one_without(random_sd_dir, tmp_path):
    final = {}
    for cache in (True, False):
        cfg = TrainConfig(data_dir=str(paths.DEMO_CONCEPT), token=["<zorb>"], caption_template="a {token}",
                          base_model=str(random_sd_dir), resolution=16, steps=6, batch_size=2, method="balora",
                          flip=True, cache_latents=cache, output_dir=str(tmp_path / f"run-{cache}"),
                          eval_every=6, grid_seeds=[1], fusion=[1.0], sample_steps=1, cpu_threads=1)
        run = json.loads((train(cfg) / "run.json").read_text())
        assert run["latents_cached"] is cache
        final[cache] = run["final"]
    for key in ("loss", "heldout_loss"):
        assert final[True][key] == pytest.approx(final[False][key], rel=1e-3), key
