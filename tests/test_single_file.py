"""Single-file (original LDM layout) SD 1.x checkpoints: diffusers -> LDM writing, offline reading."""
import copy
import pickle
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, infer_diffusers_model_type)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from balora_diffusion import paths
from balora_diffusion.errors import UserError
from balora_diffusion.formats.ldm_checkpoint import DEFAULT_CONFIG_DIR, save_single_file, to_original_layout
from balora_diffusion.models import load_single_file

PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs with sockets disabled: reaching a hub would raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _perturb(model):
    # distinct values everywhere (no all-ones norms), so a swapped tensor cannot go unnoticed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _tiny_pipeline():
    """SD 1.5's block layout (4 levels, 2 layers per block, attention in the first 3) at tiny widths."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 16, 32, 32), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_perturb(vae), text_encoder=_perturb(text_encoder), unet=_perturb(unet), scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(paths.TOKENIZER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    pipe = _tiny_pipeline()
    pipe.save_pretrained(root / "config")
    return SimpleNamespace(pipe=pipe, config=root / "config", root=root,
                           fp16=save_single_file(pipe, root / "tiny16.safetensors"),
                           fp32=save_single_file(pipe, root / "tiny32.safetensors", dtype=torch.float32))


def _image(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images


def _components(pipe):
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


def test_network_is_blocked():
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("huggingface.co", 443), timeout=1)


def test_keys_are_original_sd1_names(tiny):
    tensors = load_file(tiny.fp16)
    assert all(key.startswith(PREFIXES) for key in tensors)
    assert len(tensors) == sum(len(m.state_dict()) for m in _components(tiny.pipe).values())
    assert all(t.dtype == torch.float16 for t in tensors.values())
    unet = "model.diffusion_model."
    # Same level / layer layout as SD 1.5, so these are SD 1.5's own names.
    for key in ["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",  # level 0, first attention
                "input_blocks.3.0.op.weight",                              # level 0 downsampler
                "input_blocks.11.0.in_layers.2.weight",                    # last resnet of level 3
                "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.bias",
                "output_blocks.2.1.conv.weight",                           # upsampler after no attention
                "output_blocks.5.2.conv.weight",                           # upsampler after an attention
                "output_blocks.11.0.skip_connection.weight",               # diffusers' "is SD v1" marker
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "time_embed.2.weight", "out.2.bias"]:
        assert unet + key in tensors, key
    assert unet + "output_blocks.8.2.conv.weight" in tensors and unet + "output_blocks.11.2.conv.weight" not in tensors
    assert tensors[unet + "input_blocks.0.0.weight"].shape == tiny.pipe.unet.conv_in.weight.shape
    for key in ["encoder.down.3.block.1.conv2.weight", "encoder.down.2.downsample.conv.weight",
                "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.norm1.weight",
                "encoder.mid.block_2.conv1.weight", "encoder.norm_out.weight", "quant_conv.weight"]:
        assert "first_stage_model." + key in tensors, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in tensors
    # LDM keeps the VAE attention projections as 1x1 convolutions
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    # diffusers' decoder runs from low to high resolution, LDM numbers its levels the other way
    assert torch.equal(tensors["first_stage_model.decoder.up.3.block.0.conv1.weight"],
                       tiny.pipe.vae.decoder.up_blocks[0].resnets[0].conv1.weight.half())
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in tensors
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in tensors


def test_full_size_layout_is_what_diffusers_reads_as_sd1():
    """On SD 1.5's real layout (meta tensors, no weights) diffusers' own LDM -> diffusers converters
    give back exactly the models' names and shapes."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(DEFAULT_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(DEFAULT_CONFIG_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(DEFAULT_CONFIG_DIR / "text_encoder"))
    original = to_original_layout(unet, vae, text_encoder)
    # the tensor counts of SD 1.5's v1-5-pruned-emaonly checkpoint (686 + 248 + 196, plus position_ids)
    assert [sum(k.startswith(p) for k in original) for p in PREFIXES] == [686, 248, 196]
    assert infer_diffusers_model_type(original) == "v1"
    assert original["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    for model, converted in [(unet, convert_ldm_unet_checkpoint(original, unet.config)),
                             (vae, convert_ldm_vae_checkpoint(original, vae.config)),
                             (text_encoder, {k.removeprefix("text_model."): v
                                             for k, v in convert_ldm_clip_checkpoint(original).items()})]:
        expected = model.state_dict()
        assert set(converted) == set(expected)
        assert all(converted[k].shape == expected[k].shape for k in expected)


def test_fp16_round_trip_restores_every_weight(tiny):
    loaded = load_single_file(tiny.fp16, config=tiny.config, device="cpu")
    assert loaded.unet.dtype == torch.float32
    for name, model in _components(tiny.pipe).items():
        original, back = model.state_dict(), _components(loaded)[name].state_dict()
        assert set(back) == set(original), name
        for key, tensor in original.items():
            # exactly the fp16 rounding of the original, nothing else
            assert torch.equal(back[key], tensor.half().float()), f"{name}.{key}"
    assert loaded.vae.config.scaling_factor == tiny.pipe.vae.config.scaling_factor
    assert type(loaded.scheduler) is DDIMScheduler and loaded.safety_checker is None


def test_round_trip_generates_the_same_image(tiny):
    reference = _image(tiny.pipe)
    assert reference.shape == (1, 64, 64, 3) and reference.std() > 0.01
    exact = _image(load_single_file(tiny.fp32, config=tiny.config, device="cpu"))
    # float32 weights: equal up to summation order (~2e-6); flipping one conv's sign moves pixels by ~0.5
    np.testing.assert_allclose(exact, reference, rtol=0, atol=1e-5)
    rounded = _image(load_single_file(tiny.fp16, config=tiny.config, device="cpu"))
    np.testing.assert_allclose(rounded, reference, rtol=0, atol=1e-2)  # fp16 weights: ~2e-3


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".CKPT"])
def test_pickled_checkpoints_are_never_unpickled(tmp_path, suffix):
    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return Path.touch, (self.marker,)

    proof = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()  # unpickling this file would leave a marker behind
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserError, match="convert it to .safetensors"):
        load_single_file(path, config=tmp_path)
    assert not marker.exists()


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_single_file(tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match="is a folder"):
        load_single_file(tmp_path)


def test_corrupt_files(tiny, tmp_path):
    data = tiny.fp16.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "noise": bytes(range(256)) * 64, "empty": b"",
             "bad-header": (200).to_bytes(8, "little") + b"{not json" + b" " * 191}
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(UserError, match="not a readable .safetensors file"):
            load_single_file(path, config=tiny.config, device="cpu")


def test_other_architectures_are_refused(tiny, tmp_path):
    tensors = load_file(tiny.fp16)
    # SDXL puts its CLIP text encoders under conditioner.embedders.* and adds label_emb to the UNet
    sdxl = {k.replace("cond_stage_model.", "conditioner.embedders.0."): v for k, v in tensors.items()}
    sdxl["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(UserError, match=r"does not fit .*missing, e.g. cond_stage_model\.transformer\."):
        load_single_file(tmp_path / "sdxl.safetensors", config=tiny.config, device="cpu")

    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16)}
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(UserError, match="holds no Stable Diffusion 1.x model"):
        load_single_file(tmp_path / "lora.safetensors", config=tiny.config, device="cpu")

    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=f"1 tensor\\(s\\) missing, e.g. {key}"):
        load_single_file(tmp_path / "partial.safetensors", config=tiny.config, device="cpu")


def test_default_config_is_the_shipped_sd15_one(tiny):
    # No config given: the tiny file is checked against SD 1.5's shapes (conv_in 320 x 4 x 3 x 3) and
    # refused, with the network disabled, instead of a download of SD 1.5's configs being attempted.
    with pytest.raises(UserError, match=r"input_blocks\.0\.0\.weight is \[16, 4, 3, 3\], expected \[320, 4, 3, 3\]") as info:
        load_single_file(tiny.fp16, device="cpu")
    assert str(DEFAULT_CONFIG_DIR) in str(info.value)


def test_shipped_config_has_sd15_values():
    unet = UNet2DConditionModel.load_config(DEFAULT_CONFIG_DIR / "unet")
    assert unet["cross_attention_dim"] == 768 and list(unet["block_out_channels"]) == [320, 640, 1280, 1280]
    assert unet["layers_per_block"] == 2 and unet["attention_head_dim"] == 8 and unet["in_channels"] == 4
    vae = AutoencoderKL.load_config(DEFAULT_CONFIG_DIR / "vae")
    assert list(vae["block_out_channels"]) == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(DEFAULT_CONFIG_DIR / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size) == (768, 12, 12, 49408)
    assert text.max_position_embeddings == 77 and text.hidden_act == "quick_gelu"
    tokenizer = CLIPTokenizer.from_pretrained(DEFAULT_CONFIG_DIR / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    scheduler = StableDiffusionPipeline.load_config(DEFAULT_CONFIG_DIR)
    assert scheduler["unet"] == ["diffusers", "UNet2DConditionModel"] and scheduler["safety_checker"] == [None, None]


def test_save_is_atomic_and_refuses_what_it_cannot_write(tiny, tmp_path):
    with pytest.raises(UserError, match="as .safetensors"):
        save_single_file(tiny.pipe, tmp_path / "model.ckpt")
    unet = copy.deepcopy(tiny.pipe.unet)
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(UserError, match="still holds LoRA layers"):
        to_original_layout(unet, tiny.pipe.vae, tiny.pipe.text_encoder)
    assert list(tmp_path.iterdir()) == []
    save_single_file(tiny.pipe, tmp_path / "sub" / "model.safetensors")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["model.safetensors"]
