"""The model families: a base model's family is found from its folder or file, and each family's
conditioning is what its diffusers pipeline computes from a prompt."""
import json
import shutil

import pytest
import torch

from balora_diffusion import families
from balora_diffusion.errors import UserError
from balora_diffusion.families import SizeCondition
from balora_diffusion.formats.ldm_checkpoint import save_single_file
from balora_diffusion.models import load_pipeline
from balora_diffusion.text_encoding import tokenize

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_pipeline(tiny_sdxl, device="cpu")


def test_a_folder_loads_through_its_familys_pipeline(sdxl, random_sd_dir):
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline" and families.of_pipeline(sdxl) is families.SDXL
    assert families.of_pipeline(load_pipeline(random_sd_dir, device="cpu")) is families.SD1


def test_a_folder_of_another_pipeline_or_lacking_a_part_is_refused(tiny_sdxl, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sdxl, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="is a FluxPipeline model; this toolkit runs Stable Diffusion 1.x, "
                                        "Stable Diffusion XL"):
        load_pipeline(other, device="cpu")
    (other / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(other / "text_encoder_2")
    with pytest.raises(UserError, match="lacks the Stable Diffusion XL component"):
        load_pipeline(other, device="cpu")


def test_an_sdxl_single_file_is_told_from_its_keys_and_loads_equal(sdxl, tiny_sdxl, tmp_path):
    path = save_single_file(sdxl, tmp_path / "xl.safetensors", dtype=torch.float32)
    # the tiny model's configs (it is not SDXL base's size); its tokenizers come from the family
    config = tmp_path / "config"
    shutil.copytree(tiny_sdxl, config, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    loaded = load_pipeline(path, device="cpu", single_file_config=config)
    assert families.of_pipeline(loaded) is families.SDXL
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(sdxl, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # no config: the file's keys say SDXL, whose shipped (full-size) config it does not fit
    with pytest.raises(UserError, match=r"sdxl-config .*is it a Stable Diffusion XL checkpoint"):
        load_pipeline(path, device="cpu")


def test_sdxl_conditioning_is_what_its_pipeline_encodes(sdxl):
    prompts = ["a red cube", "a blue ball", "a red cube"]
    sizes = [SizeCondition((48, 80), (0, 8), (64, 64)), SizeCondition((64, 64), (0, 0), (64, 64)),
             SizeCondition((70, 64), (3, 0), (64, 64))]
    ids = [tokenize(t, prompts) for t in families.SDXL.tokenizers_of(sdxl)]
    with torch.no_grad():
        cond = families.SDXL.encode(families.SDXL.encoders(sdxl), ids, CPU, sizes)
        hidden, _, pooled, _ = sdxl.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=False)
        want = torch.cat([sdxl._get_add_time_ids(s.original, s.crop, s.target, torch.float32,
                                                  sdxl.text_encoder_2.config.projection_dim) for s in sizes])
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["time_ids"], want, rtol=0, atol=0)
    noisy, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = cond.predict(sdxl.unet, noisy, t).sample
        direct = sdxl.unet(noisy, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": want}).sample
    torch.testing.assert_close(out, direct, rtol=0, atol=0)


def test_sd1_conditioning_is_the_last_hidden_state(random_sd_dir):
    pipe = load_pipeline(random_sd_dir, device="cpu")
    ids = [tokenize(pipe.tokenizer, ["a red cube"])]
    with torch.no_grad():
        cond = families.SD1.encode(families.SD1.encoders(pipe), ids, CPU)
        want, _ = pipe.encode_prompt(["a red cube"], CPU, 1, False)
    assert cond.added is None
    torch.testing.assert_close(cond.hidden, want, rtol=0, atol=0)


def test_family_lookups():
    assert families.by_name("sdxl") is families.SDXL
    with pytest.raises(UserError, match="unknown model family 'sd3'"):
        families.by_name("sd3")
    assert families.of_file_keys(["conditioner.embedders.1.model.ln_final.weight"]) is families.SDXL
    assert families.of_file_keys(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) is families.SD1
