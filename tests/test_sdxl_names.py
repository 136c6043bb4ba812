"""SDXL layer names: the UNet's diffusers <-> SGM table against diffusers' own single-file conversion
(SDXL base's real block layout and the tiny model's), and kohya's SDXL LoRA names."""
import pytest
import torch

from balora_diffusion import paths
from balora_diffusion.families import sdxl_names


@pytest.fixture(scope="module")
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(paths.SDXL_CONFIG / "unet"))


@pytest.fixture(scope="module")
def tiny(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)


def _check_against_diffusers(unet):
    """diffusers' SGM -> diffusers conversion, fed each SGM name as its own value, must put every
    parameter exactly where our table says it comes from."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = {name: sdxl_names.unet_sgm_param(name, unet.config) for name in unet.state_dict()}
    checkpoint = {sdxl_names.UNET_PREFIX + sgm: sgm for sgm in ours.values()}
    assert len(checkpoint) == len(ours)  # no two parameters share an SGM name
    assert convert_ldm_unet_checkpoint(checkpoint, unet.config) == ours


def test_unet_names_match_diffusers_conversion_for_sdxl_base(sdxl_unet):
    _check_against_diffusers(sdxl_unet)


def test_unet_names_match_diffusers_conversion_for_the_tiny_model(tiny):
    _check_against_diffusers(tiny.unet)


def test_kohya_unet_names_are_sgm_paths_and_read_back_in_both_spellings(sdxl_unet):
    config = sdxl_unet.config
    assert sdxl_names.kohya_unet_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", config) == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert sdxl_names.kohya_unet_key("mid_block.attentions.0.transformer_blocks.9.ff.net.2", config) == \
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"
    assert sdxl_names.kohya_unet_key("up_blocks.0.attentions.2.proj_out", config) == \
        "lora_unet_output_blocks_2_1_proj_out"
    assert sdxl_names.kohya_unet_key("up_blocks.1.upsamplers.0.conv", config) == "lora_unet_output_blocks_5_2_conv"
    assert sdxl_names.kohya_unet_key("down_blocks.0.downsamplers.0.conv", config) == "lora_unet_input_blocks_3_0_op"
    assert sdxl_names.kohya_unet_key("down_blocks.1.resnets.0.conv_shortcut", config) == \
        "lora_unet_input_blocks_4_0_skip_connection"
    assert sdxl_names.kohya_unet_key("add_embedding.linear_1", config) == "lora_unet_label_emb_0_0"

    table = sdxl_names.unet_table(config)
    linear_or_conv = [p for p, m in sdxl_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert set(linear_or_conv) <= table.keys()
    for path in table:
        assert sdxl_names.unet_module_from_kohya(sdxl_names.kohya_unet_key(path, config), config) == path
        assert sdxl_names.unet_module_from_kohya("lora_unet_" + path.replace(".", "_"), config) == path
    assert sdxl_names.unet_module_from_kohya("lora_unet_input_blocks_99_1_proj_in", config) is None


def test_kohya_text_names_follow_the_transformers_modules_of_both_encoders(tiny):
    assert sdxl_names.kohya_text_key(1, "encoder.layers.0.mlp.fc1") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert sdxl_names.kohya_text_key(2, "text_model.encoder.layers.31.self_attn.out_proj") == \
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"
    for encoder, model in ((1, tiny.text_encoder), (2, tiny.text_encoder_2)):
        transformer = getattr(model, "text_model", model)
        layers = [(path, module) for path, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and ".layers." in path]
        assert len(layers) == 6 * model.config.num_hidden_layers
        for path, module in layers:
            found, canonical = sdxl_names.text_module_from_kohya(sdxl_names.kohya_text_key(encoder, path))
            assert found == encoder and transformer.get_submodule(canonical) is module
    assert sdxl_names.text_module_from_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1") is None
    with pytest.raises(KeyError):
        sdxl_names.kohya_text_key(2, "text_projection")


def test_second_text_encoder_original_names():
    assert sdxl_names.text2_original_name("text_model.encoder.layers.3.self_attn.k_proj.bias") == \
        ("transformer.resblocks.3.attn.in_proj_bias", 1)
    assert sdxl_names.text2_original_name("text_model.encoder.layers.3.mlp.fc2.weight") == \
        ("transformer.resblocks.3.mlp.c_proj.weight", None)
    assert sdxl_names.text2_original_name("text_model.embeddings.position_embedding.weight") == \
        ("positional_embedding", None)
