"""Adapter formats: every writer against its reader, against the tools that read the files (plain
diffusers in a fresh process, A1111's and ComfyUI's key matching) and against the math."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from balora_diffusion import paths
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import TEXT_ENCODER, TEXT_ENCODER_2, UNET, Adapter, LoraModule
from balora_diffusion.formats.diffusers_lora import LORA_FILE, read_diffusers, write_diffusers
from balora_diffusion.formats.fuse import Fused
from balora_diffusion.formats.kohya_lora import kohya_key, read_kohya, write_kohya
from balora_diffusion.formats.names import meta_unet
from balora_diffusion.formats.read import read_adapter
from balora_diffusion.formats.run_files import adapter_from_checkpoint
from balora_diffusion.models import load_pipeline
from balora_diffusion.train_config import TrainConfig

PROMPT, SEED, STEPS = "a <zorb> on a gray background", 3, 8


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A short run of the demo recipe on the shipped model: enough steps for the LoRA to change images."""
    from balora_diffusion.config import read_toml
    from balora_diffusion.train import train

    cfg = {**read_toml(TrainConfig, paths.config_file("demo")), "data_dir": str(paths.DEMO_CONCEPT),
           "output_dir": str(tmp_path_factory.mktemp("formats") / "demo-run"), "steps": 16, "checkpoint_every": 8,
           "eval_every": 8, "heldout_size": 4, "grid_seeds": [1], "fusion": [1.0], "sample_steps": 2, "alpha": 2.0}
    return train(TrainConfig(**cfg))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(device="cpu")


def _toolkit_image(pipe, adapter_path) -> np.ndarray:
    from balora_diffusion.generate import generate, set_scheduler

    set_scheduler(pipe, "dpm++")
    with Fused(pipe, [(read_adapter(adapter_path), 1.0)]):
        image = generate(pipe, [PROMPT], [SEED], steps=STEPS, guidance_scale=7.5, progress=False)[0][0]
    return np.asarray(image, dtype=np.int16)


PLAIN_DIFFUSERS = """
import sys, numpy as np, torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
model, lora, embedding, out = sys.argv[1:5]
pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False, local_files_only=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                         solver_order=2)
pipe.load_lora_weights(lora)
pipe.load_textual_inversion(embedding)
image = pipe(prompt=[{prompt!r}], generator=[torch.Generator("cpu").manual_seed({seed})], num_inference_steps={steps},
             guidance_scale=7.5).images[0]
np.save(out, np.asarray(image))
""".format(prompt=PROMPT, seed=SEED, steps=STEPS)


def _plain_diffusers_image(tmp_path, lora: Path, embedding: Path) -> np.ndarray:
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIFFUSERS)
    out = tmp_path / "plain.npy"
    result = subprocess.run([sys.executable, str(script), str(paths.TINY_SD), str(lora), str(embedding), str(out)],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not loaded" not in result.stderr and "unexpected" not in result.stderr.lower(), result.stderr[-3000:]
    return np.load(out).astype(np.int16)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_run_files_reload_in_plain_diffusers_to_the_toolkits_images(run, pipe, tmp_path, layout):
    lora = run / "adapter" / LORA_FILE if layout == "diffusers" else run / "kohya" / "demo-run.safetensors"
    ours = _toolkit_image(pipe, run)
    theirs = _plain_diffusers_image(tmp_path, lora, run / layout.replace("diffusers", "adapter") / "zorb.safetensors")
    with Fused(pipe, []):
        from balora_diffusion.generate import generate
        base = np.asarray(generate(pipe, [PROMPT.replace("<zorb>", "heart")], [SEED], steps=STEPS, guidance_scale=7.5,
                                   progress=False)[0][0], dtype=np.int16)
    assert np.abs(ours - base).mean() > 5  # the adapter changes the image: the comparison below means something
    assert np.abs(ours - theirs).max() <= 3 and np.abs(ours - theirs).mean() < 0.2


def test_embedding_loads_under_its_token_without_being_named(run, pipe):
    from balora_diffusion.formats.embedding import read_embedding

    pipe.load_textual_inversion(str(run / "kohya" / "zorb.safetensors"))  # no token=
    try:
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<zorb>")]
        tokens, vectors = read_embedding(run / "adapter" / "zorb.safetensors")
        assert tokens == ["<zorb>"]
        torch.testing.assert_close(row.detach(), vectors[0], rtol=0, atol=0)
    finally:
        pipe.unload_textual_inversion("<zorb>")


# --- A1111 and ComfyUI key matching for SD 1.x ----------------------------------------------------------------

def a1111_compvis_name(key: str) -> str | None:
    """The module name A1111 looks a kohya key up under: the regexes of
    convert_diffusers_name_to_compvis (AUTOMATIC1111/stable-diffusion-webui,
    extensions-builtin/Lora/networks.py; lora_convert.py in its forks), SD 1.x branch."""
    suffix = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = suffix.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + b * 3 + i}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m[1], int(m[2]), m[3]
        rest = suffix.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else i * 2}_{rest}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = suffix.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{b * 3 + i}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return None


def comfyui_key_map() -> set[str]:
    """The kohya module names ComfyUI maps for SD 1.x: model_lora_keys_clip (lora_te_ + LORA_CLIP_MAP,
    layers 0..31) and model_lora_keys_unet (lora_unet_ + every diffusers UNet weight, dots as
    underscores), comfyanonymous/ComfyUI, comfy/lora.py."""
    clip_map = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                "self_attn.out_proj": "self_attn_out_proj"}
    keys = {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(32) for c in clip_map.values()}
    keys |= {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in meta_unet().state_dict()
             if k.endswith(".weight")}
    return keys


@pytest.fixture(scope="module")
def sd15_ldm_modules() -> set[str]:
    """A1111's module names for SD 1.5 (its network_layer_mapping): the LDM weight names, dots as underscores."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from balora_diffusion.formats.ldm_checkpoint import to_original_layout

    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(paths.SD15_CONFIG / "text_encoder"))
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(paths.SD15_CONFIG / "vae"))
    names = set()
    for key in to_original_layout(meta_unet(), vae, te):
        module = key.removesuffix(".weight")
        if module.startswith("model.diffusion_model."):
            names.add(module.removeprefix("model.").replace(".", "_"))
        elif module.startswith("cond_stage_model."):
            names.add(module.removeprefix("cond_stage_model.").replace(".", "_"))
    return names


def _sd15_lora_key_names() -> list[str]:
    """kohya names of every layer an SD 1.x LoRA trains: attention, feed-forward, proj_in / proj_out,
    resnet convolutions, and the text encoder's attention and MLP."""
    leaf = re.compile(r".*(to_[qkv]|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|resnets\.\d+\.conv[12])")
    unet = [kohya_key(UNET, p) for p, m in meta_unet().named_modules() if leaf.fullmatch(p)]
    text = [kohya_key(TEXT_ENCODER, f"encoder.layers.{i}.{layer}") for i in range(12)
            for layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "mlp.fc1", "mlp.fc2")]
    return unet + text


def test_kohya_names_match_what_a1111_and_comfyui_look_up_for_sd15(sd15_ldm_modules):
    names = _sd15_lora_key_names()
    assert len(names) > 250
    comfy = comfyui_key_map()
    for name in names:
        assert name in comfy, name
        assert a1111_compvis_name(name) in sd15_ldm_modules, (name, a1111_compvis_name(name))


def test_the_runs_kohya_file_is_matched_whole_with_the_trained_alpha(run):
    tensors = load_file(run / "kohya" / "demo-run.safetensors")
    comfy = comfyui_key_map()
    modules = {key.split(".")[0] for key in tensors}
    for module in modules:  # ComfyUI's load_lora reads exactly these three keys per module, warns on any other
        assert module in comfy, module
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(tensors)
    assert len(tensors) == 3 * len(modules)
    cfg = json.loads((run / "config.json").read_text())
    alphas = {module: float(tensors[f"{module}.alpha"]) for module in modules}
    assert {a for m, a in alphas.items() if m.startswith("lora_unet_")} == {cfg["alpha"]} == {2.0}
    assert {a for m, a in alphas.items() if m.startswith("lora_te_")} == {cfg["text_alpha"]}
    trained = read_adapter(run)
    assert len(modules) == len(trained.modules())


def test_diffusers_metadata_carries_what_older_diffusers_reads(run):
    """diffusers <= 0.35 builds the LoraConfig from this metadata and reads `rank_pattern` from it
    unconditionally (utils/peft_utils.py), so a file without it fails there with a KeyError; with it,
    such a file loads to identical images (checked once on diffusers 0.35.2 + transformers 4.57.6)."""
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / LORA_FILE), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    for part in ("unet", "text_encoder"):
        assert config[f"{part}.rank_pattern"] == {} and config[f"{part}.alpha_pattern"] == {}
    assert config["unet.lora_alpha"] == 2.0 and config["unet.r"] == 4
    keys = list(load_file(run / "adapter" / LORA_FILE))
    assert all(k.startswith("text_encoder.text_model.") for k in keys if k.startswith("text_encoder."))


def test_kohya_metadata_names_the_training(run):
    from safetensors import safe_open

    with safe_open(str(run / "kohya" / "demo-run.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_unet_lr"] == "0.002" and meta["ss_seed"] == "0" and meta["ss_steps"] == "16"
    assert json.loads(meta["balora.method"]) == "balora"
    assert len(meta["ss_new_sd_model_hash"]) == 64


# --- third-party files ------------------------------------------------------------------------------------------

def _tiny_layer_shapes(pipe) -> dict[str, tuple]:
    return {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": pipe.unet.down_blocks[0].attentions[0]
            .transformer_blocks[0].attn1.to_q.weight.shape,
            "down_blocks.0.resnets.0.conv1": pipe.unet.down_blocks[0].resnets[0].conv1.weight.shape}


def _third_party_kohya(pipe, path: Path, rank: int, alpha: float | None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    tensors = {}
    for module, shape in _tiny_layer_shapes(pipe).items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=gen) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []),
                                                       generator=gen) * 0.1
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    text = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    fc1 = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    tensors[f"{text}.lora_down.weight"] = torch.randn(rank, fc1, generator=gen) * 0.1
    tensors[f"{text}.lora_up.weight"] = torch.randn(4 * fc1, rank, generator=gen) * 0.1
    if alpha is not None:
        tensors[f"{text}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("alpha", [2.0, None])
def test_third_party_kohya_lora_fuses_at_alpha_over_rank(pipe, tmp_path, alpha):
    rank = 8
    tensors = _third_party_kohya(pipe, tmp_path / "style.safetensors", rank, alpha)
    scale = (alpha if alpha is not None else rank) / rank
    layer = pipe.unet.down_blocks[0].resnets[0].conv1
    before = layer.weight.detach().clone()
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    expected = scale * torch.einsum("or,rikl->oikl", tensors[f"{key}.lora_up.weight"][:, :, 0, 0],
                                    tensors[f"{key}.lora_down.weight"])
    with Fused(pipe, [(read_adapter(tmp_path / "style.safetensors"), 1.0)]):
        torch.testing.assert_close(layer.weight - before, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(layer.weight, before)  # restored exactly


def test_third_party_kohya_lora_matches_diffusers_own_loader(pipe, tmp_path):
    """diffusers converts kohya files itself: its fused weights and ours must agree."""
    from balora_diffusion.models import load_pipeline

    _third_party_kohya(pipe, tmp_path / "style.safetensors", 8, 2.0)
    theirs = load_pipeline(device="cpu")
    theirs.load_lora_weights(str(tmp_path / "style.safetensors"))
    theirs.fuse_lora()
    with Fused(pipe, [(read_adapter(tmp_path / "style.safetensors"), 1.0)]):
        for ours_layer, their_layer in ((pipe.unet.down_blocks[0].resnets[0].conv1,
                                         theirs.unet.down_blocks[0].resnets[0].conv1),
                                        (pipe.text_encoder.get_submodule("text_model.encoder.layers.1.mlp.fc1")
                                         if hasattr(pipe.text_encoder, "text_model")
                                         else pipe.text_encoder.get_submodule("encoder.layers.1.mlp.fc1"),
                                         theirs.text_encoder.get_submodule("text_model.encoder.layers.1.mlp.fc1")
                                         if hasattr(theirs.text_encoder, "text_model")
                                         else theirs.text_encoder.get_submodule("encoder.layers.1.mlp.fc1"))):
            base = their_layer.base_layer if hasattr(their_layer, "base_layer") else their_layer
            torch.testing.assert_close(ours_layer.weight, base.weight, rtol=1e-4, atol=1e-6)


def test_peft_and_old_diffusers_layouts_read_alike(tmp_path):
    down, up = torch.randn(4, 320), torch.randn(320, 4)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layouts = {
        "peft": ({f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up},
                 {"lora_alpha": 8, "r": 4}),
        "old diffusers": ({f"unet.{path}.lora.down.weight": down, f"unet.{path}.lora.up.weight": up}, None),
        "attention processor": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
                                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up}, None),
    }
    for name, (tensors, config) in layouts.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        file = folder / ("adapter_model.safetensors" if config else "lora.safetensors")
        save_file(tensors, str(file))
        if config:
            (folder / "adapter_config.json").write_text(json.dumps(config))
        adapter = read_diffusers(file)
        module = adapter.parts()[UNET][path]
        assert module.alpha == (8 if config else 4), name
        torch.testing.assert_close(module.delta(), (2.0 if config else 1.0) * up @ down)


def test_text_encoder_names_in_every_spelling_read_to_one(tmp_path):
    down, up = torch.randn(2, 64), torch.randn(64, 2)
    for n, key in enumerate(["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                             "text_encoder.encoder.layers.0.self_attn.q_proj"]):
        save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, str(tmp_path / f"{n}.safetensors"))
        assert list(read_diffusers(tmp_path / f"{n}.safetensors").parts()[TEXT_ENCODER]) == [
            "encoder.layers.0.self_attn.q_proj"]
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up}, str(tmp_path / "k.safetensors"))
    assert list(read_kohya(tmp_path / "k.safetensors").parts()[TEXT_ENCODER]) == ["encoder.layers.0.self_attn.q_proj"]


def test_kohya_ldm_spelling_reads_as_the_diffusers_module(tmp_path):
    down, up = torch.randn(2, 320, 1, 1), torch.randn(320, 2, 1, 1)
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up}, str(tmp_path / "ldm.safetensors"))
    assert list(read_kohya(tmp_path / "ldm.safetensors").parts()[UNET]) == ["down_blocks.0.attentions.0.proj_in"]


@pytest.mark.parametrize("key, message", [
    ("lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight", "names no layer"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "no down factor"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_C.weight", "not a kohya weight"),
])
def test_foreign_kohya_files_are_refused_naming_the_key(tmp_path, key, message):
    save_file({key: torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match=message) as info:
        read_adapter(tmp_path / "x.safetensors")
    assert key.split(".")[0] in str(info.value)


def test_sdxl_text_encoders_are_parts_read_under_both_spellings_and_written_numbered(pipe, tmp_path):
    down, up = torch.randn(2, 64), torch.randn(256, 2)  # the shipped model's fc1: 64 -> 256
    for first in ("lora_te_", "lora_te1_"):
        save_file({f"{prefix}text_model_encoder_layers_0_mlp_fc1.{slot}": tensor
                   for prefix in (first, "lora_te2_") for slot, tensor in (("lora_down.weight", down.clone()),
                                                                           ("lora_up.weight", up.clone()))},
                  str(tmp_path / "xl.safetensors"))
        adapter = read_adapter(tmp_path / "xl.safetensors")
        assert {part: list(modules) for part, modules in adapter.parts().items() if modules} == {
            TEXT_ENCODER: ["encoder.layers.0.mlp.fc1"], TEXT_ENCODER_2: ["encoder.layers.0.mlp.fc1"]}
    write_kohya(tmp_path / "back.safetensors", adapter)
    assert sorted(load_file(str(tmp_path / "back.safetensors"))) == sorted(
        f"{prefix}text_model_encoder_layers_0_mlp_fc1.{slot}" for prefix in ("lora_te1_", "lora_te2_")
        for slot in ("alpha", "lora_down.weight", "lora_up.weight"))
    write_diffusers(tmp_path, adapter)
    assert {key.split(".")[0] for key in load_file(str(tmp_path / LORA_FILE))} == {TEXT_ENCODER, TEXT_ENCODER_2}
    with pytest.raises(UserError, match="text_encoder_2"):
        Fused(pipe, [(adapter, 1.0)])  # SD 1.x has one text encoder


def test_a_module_without_its_partner_is_refused(tmp_path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="has no up factor"):
        read_adapter(tmp_path / "x.safetensors")


def test_a_shape_that_does_not_fit_the_base_model_changes_nothing(pipe, tmp_path):
    tensors = _third_party_kohya(pipe, tmp_path / "ok.safetensors", 4, 4.0)
    tensors["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight"] = torch.zeros(4, 7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(UserError, match="lora_te_text_model_encoder_layers_1_mlp_fc1.*shape"):
        Fused(pipe, [(read_adapter(tmp_path / "bad.safetensors"), 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


# --- hostile files: refused whole at read time, naming what is wrong ---------------------------------------------

LAYER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
DOWN, UP, ALPHA = f"{LAYER}.lora_down.weight", f"{LAYER}.lora_up.weight", f"{LAYER}.alpha"


def _kohya_file(tmp_path: Path, **changes) -> Path:
    """A one-layer kohya LoRA (rank 4 on a 64-wide layer) with tensors replaced or, given None, left out."""
    tensors = {DOWN: torch.randn(4, 64), UP: torch.randn(64, 4), ALPHA: torch.tensor(4.0)}
    for key, value in changes.items():
        key = {"down": DOWN, "up": UP, "alpha": ALPHA}[key]
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    return path


def _with_nan(shape) -> torch.Tensor:
    tensor = torch.randn(shape)
    tensor.view(-1)[1] = float("nan")
    return tensor


@pytest.mark.parametrize("changes, key, message", [
    ({"down": _with_nan((4, 64))}, DOWN, "non-finite"),
    ({"up": torch.full((64, 4), float("inf"))}, UP, "non-finite"),
    ({"alpha": torch.tensor(float("nan"))}, ALPHA, "finite"),
    ({"alpha": torch.tensor(float("-inf"))}, ALPHA, "finite"),
    ({"down": torch.zeros(0, 64), "up": torch.zeros(64, 0)}, DOWN, "empty"),
    ({"down": torch.tensor(1.0), "alpha": None}, DOWN, "LoRA product"),
    ({"up": torch.tensor(1.0)}, DOWN, "LoRA product"),
    ({"down": torch.randn(64), "up": torch.randn(64)}, DOWN, "LoRA product"),
    ({"alpha": torch.tensor(True)}, ALPHA, "bool"),
    ({"alpha": torch.tensor([1.0, 2.0])}, ALPHA, "not one number"),
    ({"up": torch.randn(64, 3)}, DOWN, "LoRA product"),
    ({"down": torch.randn(96, 64), "up": torch.randn(64, 96)}, DOWN, "rank 96"),
    ({"down": torch.ones(4, 64, dtype=torch.int32)}, DOWN, "int32"),
    ({"up": torch.ones(64, 4, dtype=torch.bool)}, UP, "bool"),
], ids=["nan down", "inf up", "nan alpha", "-inf alpha", "rank zero", "scalar down without alpha", "scalar up",
        "1-d factors", "bool alpha", "vector alpha", "ranks disagree", "rank above the layer", "int factor", "bool factor"])
def test_a_malformed_kohya_lora_is_refused_naming_the_key(tmp_path, changes, key, message):
    with pytest.raises(UserError, match=message) as info:
        read_adapter(_kohya_file(tmp_path, **changes))
    assert key in str(info.value)


def test_an_integer_alpha_is_a_number(tmp_path):
    # kohya's trainer stores alpha = rank as an integer tensor when none was asked for
    assert read_adapter(_kohya_file(tmp_path, alpha=torch.tensor(8))).parts()[TEXT_ENCODER][
        "encoder.layers.0.self_attn.q_proj"].alpha == 8.0


def test_the_same_checks_hold_for_the_diffusers_layout(tmp_path):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": _with_nan((4, 320)), f"{key}.lora_B.weight": torch.randn(320, 4)},
              str(tmp_path / LORA_FILE))
    with pytest.raises(UserError, match=re.escape(f"{key}.lora_A.weight holds non-finite")):
        read_adapter(tmp_path)


@pytest.mark.parametrize("config, message", [
    ("{", "is not JSON"),
    ("[1]", "not a JSON object"),
    ('{"unet.lora_alpha": "big"}', "unet.lora_alpha: alpha 'big' is not a finite number"),
    ('{"unet.lora_alpha": NaN}', "unet.lora_alpha: alpha nan"),
    ('{"unet.lora_alpha": true}', "unet.lora_alpha: alpha True"),
    ('{"unet.alpha_pattern": [1]}', "unet.alpha_pattern is not a mapping"),
    ('{"unet.alpha_pattern": {"to_q": null}}', "unet.alpha_pattern 'to_q': alpha None"),
])
def test_diffusers_alpha_metadata_that_is_no_number_is_refused(tmp_path, config, message):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 320), f"{key}.lora_B.weight": torch.randn(320, 4)},
              str(tmp_path / "lora.safetensors"), metadata={"lora_adapter_metadata": config})
    with pytest.raises(UserError, match=re.escape(message)):
        read_adapter(tmp_path / "lora.safetensors")


def test_a_peft_config_that_is_no_object_is_refused(tmp_path):
    save_file({"base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 320),
               "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(320, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text('"lora"')
    with pytest.raises(UserError, match="adapter_config.json is not a JSON object"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("vectors, message", [
    (torch.full((1, 32), float("nan")), "non-finite"),
    (torch.ones(1, 32, dtype=torch.int64), "int64"),
    (torch.ones(1, 0), r"shape \[1, 0\]"),
])
def test_an_unusable_embedding_is_refused_naming_its_token(tmp_path, vectors, message):
    save_file({"<zorb>": vectors}, str(tmp_path / "zorb.safetensors"))
    with pytest.raises(UserError, match=message) as info:
        read_adapter(tmp_path / "zorb.safetensors")
    assert "<zorb>" in str(info.value)


@pytest.mark.parametrize("beside, message", [
    ({"<zorb>": torch.full((1, 32), float("inf"))}, "non-finite"),
    ({"<zorb>": torch.tensor(1.0)}, "is not a token embedding"),
])
def test_a_bad_embedding_beside_a_lora_is_refused(tmp_path, beside, message):
    save_file({DOWN: torch.randn(4, 64), UP: torch.randn(64, 4)}, str(tmp_path / "lora.safetensors"),
              metadata={"balora.token": '["<zorb>"]'})
    save_file(beside, str(tmp_path / "zorb.safetensors"))
    with pytest.raises(UserError, match=message):
        read_adapter(tmp_path / "lora.safetensors")


@pytest.mark.parametrize("tokens", ["[1, 2]", '"<zorb>"', '[""]'])
def test_a_token_list_that_names_no_tokens_is_refused(tmp_path, tokens):
    save_file({DOWN: torch.randn(4, 64), UP: torch.randn(64, 4)}, str(tmp_path / "lora.safetensors"),
              metadata={"balora.token": tokens})
    with pytest.raises(UserError, match="balora.token header entry"):
        read_adapter(tmp_path / "lora.safetensors")


def _checkpoint(tmp_path: Path, trainable: dict, **config) -> Path:
    from balora_diffusion.checkpoint import write_checkpoint

    cfg = {"alpha": 4.0, "text_alpha": 4.0, "output_dir": str(tmp_path / "run"), "token": ["<zorb>"], **config}
    return write_checkpoint(tmp_path / "run" / "checkpoints", 1, {"trainable": trainable, "config": cfg,
                                                                  "meta": {"step": 1}})


CHECKPOINT_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_{}.default.weight"


@pytest.mark.parametrize("trainable, config, message", [
    ({CHECKPOINT_KEY.format("A"): _with_nan((4, 320)), CHECKPOINT_KEY.format("B"): torch.randn(320, 4)}, {},
     re.escape(CHECKPOINT_KEY.format("A")) + " holds non-finite"),
    ({CHECKPOINT_KEY.format("A"): torch.randn(4, 320), CHECKPOINT_KEY.format("B"): torch.randn(320, 4),
      "text_encoder.embeddings.token_embedding.extra": torch.full((1, 32), float("nan"))}, {}, "<zorb> holds non-finite"),
    ({CHECKPOINT_KEY.format("A"): torch.randn(4, 320), CHECKPOINT_KEY.format("B"): torch.randn(320, 4)},
     {"alpha": "four"}, "config alpha: alpha 'four'"),
    ({CHECKPOINT_KEY.format("A"): torch.randn(4, 320)}, {}, "has no up factor"),
    ({CHECKPOINT_KEY.format("A"): torch.randn(4, 320)}, {"token": "<zorb>"}, "does not hold a training's config"),
    ({CHECKPOINT_KEY.format("A"): torch.randn(4, 320), CHECKPOINT_KEY.format("B"): torch.randn(320, 4),
      CHECKPOINT_KEY.format("C"): torch.randn(4)}, {}, re.escape(CHECKPOINT_KEY.format("C")) + "' is no tensor of any"),
    ({CHECKPOINT_KEY.format("A"): torch.randn(4, 320), CHECKPOINT_KEY.format("B"): torch.randn(320, 4),
      CHECKPOINT_KEY.replace("to_q.lora_{}", "to_k.lora_magnitude_vector"): torch.ones(320)}, {},
     "has no dora magnitude beside it"),
], ids=["nan factor", "nan embedding", "word alpha", "lone factor", "token not a list", "unknown key",
        "magnitude of another module"])
def test_a_checkpoint_its_manifest_vouches_for_is_still_checked(tmp_path, trainable, config, message):
    with pytest.raises(UserError, match=message):
        read_adapter(_checkpoint(tmp_path, trainable, **config))


def test_a_checkpoint_whose_json_is_broken_is_refused(tmp_path):
    import hashlib

    from balora_diffusion.checkpoint import MANIFEST

    folder = _checkpoint(tmp_path, {CHECKPOINT_KEY.format("A"): torch.randn(4, 320)})
    (folder / "config.json").write_text("{")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["config.json"] = {"bytes": 1, "sha256": hashlib.sha256(b"{").hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="is not readable"):
        read_adapter(folder)


# --- what export and merge write --------------------------------------------------------------------------------

def test_export_replaces_its_outputs_only_when_told(run, tmp_path):
    out = tmp_path / "k" / "lora.safetensors"
    _cli("export", run, "--format", "kohya", "--out", out)
    out.unlink()  # the embedding beside it is enough to refuse
    (tmp_path / "k" / "zorb.safetensors").write_bytes(b"mine")
    refused = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "export", run, "--format", "kohya",
                              "--out", out], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "zorb.safetensors already exists" in refused.stderr
    assert "--overwrite true" in refused.stderr and (tmp_path / "k" / "zorb.safetensors").read_bytes() == b"mine"
    for flag in (["--overwrite", "true"], ["--overwrite"]):
        (tmp_path / "k" / "zorb.safetensors").write_bytes(b"mine")
        _cli("export", run, "--format", "kohya", "--out", out, *flag)
        assert read_adapter(out).tokens == ["<zorb>"]


def test_merge_replaces_the_checkpoint_and_the_embedding_beside_it_when_told(run, tmp_path):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    (tmp_path / "zorb.safetensors").write_bytes(b"mine")
    _cli("merge", "--adapter", run, "--out", out, "--overwrite", "true")
    assert read_adapter(tmp_path / "zorb.safetensors").tokens == ["<zorb>"]
    assert out.stat().st_size > 1000


# --- round trips and the math -----------------------------------------------------------------------------------

def _random_adapter(gen: torch.Generator) -> Adapter:
    def module(out, inp, rank, alpha, conv=False):
        extra = [1, 1] if conv else []
        return LoraModule(torch.randn(rank, inp, *extra, generator=gen), torch.randn(out, rank, *extra, generator=gen),
                          alpha)
    return Adapter(part_modules={
        UNET: {"down_blocks.0.attentions.0.proj_in": module(64, 64, 4, 1.0, conv=True),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": module(64, 64, 2, 8.0)},
        TEXT_ENCODER: {"encoder.layers.0.self_attn.v_proj": module(64, 64, 4, 4.0)}}, info={"method": "x"})


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_round_trip_keeps_every_update(tmp_path, layout):
    adapter = _random_adapter(torch.Generator().manual_seed(0))  # mixed ranks and alphas: diffusers folds them
    if layout == "kohya":
        back = read_kohya(write_kohya(tmp_path / "k.safetensors", adapter))
    else:
        back = read_diffusers(write_diffusers(tmp_path, adapter))
    assert back.info == {"method": "x"}
    for part, path, module in adapter.modules():
        torch.testing.assert_close(back.parts()[part][path].delta(), module.delta(), rtol=1e-5, atol=1e-5)


def test_run_checkpoint_and_final_files_hold_the_same_adapter(run):
    final, from_checkpoint = read_adapter(run), adapter_from_checkpoint(run / "checkpoints" / "step-0000016")
    assert from_checkpoint.tokens == final.tokens == ["<zorb>"]
    torch.testing.assert_close(from_checkpoint.embedding, final.embedding, rtol=0, atol=0)
    assert {part: set(modules) for part, modules in final.parts().items()} == {
        part: set(modules) for part, modules in from_checkpoint.parts().items()}
    for part, path, module in final.modules():
        other = from_checkpoint.parts()[part][path]
        assert torch.equal(other.down, module.down) and torch.equal(other.up, module.up) and other.alpha == module.alpha


def _cli(*args, cwd=None):
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=600, cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_merge_of_several_adapters_adds_their_weighted_updates(run, pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    style = tmp_path / "style.safetensors"
    _third_party_kohya(pipe, style, 8, 2.0)
    _cli("merge", "--adapter", f"{run}:0.7", f"{style}:-0.5", "--out", tmp_path / "merged")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert "<zorb>" in merged.tokenizer.get_vocab()  # loads without the toolkit, token included
    with safe_open(str(tmp_path / "merged" / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the names transformers 4 stacks read too
    first, second = read_adapter(run), read_adapter(style)
    base = dict(pipe.unet.named_modules())
    for path in set(first.parts()[UNET]) | set(second.parts()[UNET]):
        expected = sum(w * a.parts()[UNET][path].delta().reshape(base[path].weight.shape)
                       for a, w in ((first, 0.7), (second, -0.5)) if path in a.parts()[UNET])
        got = merged.unet.get_submodule(path).weight - base[path].weight
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_merged_model_draws_what_the_fused_adapter_draws(run, pipe, tmp_path):
    from balora_diffusion.generate import generate, set_scheduler

    _cli("merge", "--adapter", run, "--out", tmp_path / "merged.safetensors", "--save-dtype", "fp32")
    assert (tmp_path / "zorb.safetensors").is_file()  # a checkpoint has no place for the token: it goes beside
    merged = load_pipeline(tmp_path / "merged.safetensors", device="cpu", single_file_config=paths.TINY_SD)
    merged.load_textual_inversion(str(tmp_path / "zorb.safetensors"))
    set_scheduler(merged, "dpm++")
    theirs = np.asarray(generate(merged, [PROMPT], [SEED], steps=STEPS, guidance_scale=7.5, progress=False)[0][0],
                        dtype=np.int16)
    ours = _toolkit_image(pipe, run)
    assert np.abs(ours - theirs).max() <= 2


def test_generate_writes_a_grid_images_and_a_record(run, tmp_path):
    from PIL import Image

    out = tmp_path / "gen"
    _cli("generate", "--adapter", f"{run}:1", "--prompt", "a <zorb>", "--prompt", "a <zorb> on a red background",
         "--fusion", "0", "1", "--seeds", "1", "2", "--steps", "4", "--out", out)
    record = json.loads((out / "generate.json").read_text())
    assert len(record["images"]) == 2 * 2 * 2
    assert record["adapters"][0]["tokens"] == ["<zorb>"]
    files = {r["file"] for r in record["images"]}
    assert files == {str(p.relative_to(out)) for p in (out / "images").glob("*.png")}
    first = next(r for r in record["images"] if r["fusion"] == 1 and r["seed"] == 2 and r["prompt"] == "a <zorb>")
    # same seed, same image: drawn alone in a second run, only float rounding differs (the first run batched it
    # with another prompt, and CPU kernels may round differently at another batch size)
    _cli("generate", "--adapter", run, "--prompt", "a <zorb>", "--seeds", "2", "--steps", "4", "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "generate.json").read_text())["images"][0]["file"]
    a, b = (np.asarray(Image.open(path)).astype(int) for path in (out / first["file"], tmp_path / "again" / again))
    assert np.abs(a - b).max() <= 3 and np.abs(a - b).mean() < 0.2
    # the same command again: the same files, pixel for pixel
    _cli("generate", "--adapter", f"{run}:1", "--prompt", "a <zorb>", "--prompt", "a <zorb> on a red background",
         "--fusion", "0", "1", "--seeds", "1", "2", "--steps", "4", "--out", tmp_path / "same")
    for name in files:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "same" / name))), name
    assert Image.open(out / "grid.png").size[0] > 4 * 64


def test_export_any_checkpoint_in_either_format_and_inspect_it(run, tmp_path):
    _cli("export", run / "checkpoints" / "step-0000008", "--format", "kohya", "--out", tmp_path / "k" / "mid.safetensors")
    _cli("export", tmp_path / "k" / "mid.safetensors", "--format", "diffusers", "--out", tmp_path / "d")
    assert (tmp_path / "k" / "zorb.safetensors").is_file() and (tmp_path / "d" / "zorb.safetensors").is_file()
    mid, back = adapter_from_checkpoint(run / "checkpoints" / "step-0000008"), read_adapter(tmp_path / "d")
    assert back.tokens == ["<zorb>"] and back.info["step"] == 8
    for part, path, module in mid.modules():
        torch.testing.assert_close(back.parts()[part][path].delta(), module.delta())
    report = json.loads(_cli("inspect", tmp_path / "k" / "mid.safetensors", "--json").stdout)
    assert report["format"] == "kohya" and report["parts"]["unet"]["alpha"] == "2"
    assert report["training"]["method"] == "balora" and report["tokens"] == ["<zorb>"]
    # BaLoRA keeps every pair balanced: inspect reads that back from the file
    assert max(d["imbalance"] for d in report["balance"].values()) < 1e-3
    table = _cli("inspect", run).stdout
    assert "imbalance" in table and "attn1.to_q" in table


# --- a DoRA run's files -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dora_run(run) -> Path:
    """The `run` fixture's training as DoRA, with conv layers adapted too (their magnitudes have 4-d shapes)."""
    from balora_diffusion.config import read_toml
    from balora_diffusion.train import train

    cfg = {**read_toml(TrainConfig, paths.config_file("demo")), "data_dir": str(paths.DEMO_CONCEPT),
           "output_dir": str(run.parent / "dora-run"), "steps": 16, "checkpoint_every": 8, "eval_every": 8,
           "heldout_size": 4, "grid_seeds": [1], "fusion": [1.0], "sample_steps": 2, "alpha": 2.0,
           "adapter_kind": "dora", "unet_targets": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]}
    return train(TrainConfig(**cfg))


def test_dora_run_reloads_in_plain_diffusers_to_the_toolkits_image(dora_run, pipe, tmp_path):
    from balora_diffusion.formats.run_files import write_run_adapters

    # 16 steps leave B A small and the magnitudes near the base's row norms, where a wrong norm or a lost
    # magnitude would hardly change an image: the same adapter, with both made large
    adapter, gen = read_adapter(dora_run), torch.Generator().manual_seed(0)
    for _, _, module in adapter.modules():
        module.up.mul_(4.0)
        module.extras["magnitude"].mul_(0.6 + 0.8 * torch.rand(module.extras["magnitude"].shape, generator=gen))
    write_run_adapters(tmp_path / "strong", adapter)
    ours = _toolkit_image(pipe, tmp_path / "strong" / "adapter")
    theirs = _plain_diffusers_image(tmp_path, tmp_path / "strong" / "adapter",
                                    tmp_path / "strong" / "adapter" / "zorb.safetensors")
    with Fused(pipe, []):
        from balora_diffusion.generate import generate
        base = np.asarray(generate(pipe, [PROMPT.replace("<zorb>", "heart")], [SEED], steps=STEPS, guidance_scale=7.5,
                                   progress=False)[0][0], dtype=np.int16)
    assert np.abs(ours - base).mean() > 5
    assert np.abs(ours - theirs).max() <= 3 and np.abs(ours - theirs).mean() < 0.2


def test_dora_files_hold_the_magnitudes_in_each_consumers_shapes(dora_run, pipe, tmp_path):
    final = read_adapter(dora_run)
    kohya = read_adapter(dora_run / "kohya" / "dora-run.safetensors")
    checkpoint = adapter_from_checkpoint(dora_run / "checkpoints" / "step-0000016")
    assert final.kind == kohya.kind == checkpoint.kind == "dora"
    diffusers_keys = load_file(str(dora_run / "adapter" / LORA_FILE))
    kohya_keys = load_file(str(dora_run / "kohya" / "dora-run.safetensors"))
    layers = {**dict(pipe.unet.named_modules())}
    for part, path, module in final.modules():
        for other in (kohya, checkpoint):
            assert torch.equal(other.parts()[part][path].extras["magnitude"], module.extras["magnitude"])
        weight = layers[path].weight if part == UNET else None
        if weight is None:
            continue
        out, conv = weight.shape[0], weight.dim() == 4
        scale = kohya_keys[f"{kohya_key(part, path)}.dora_scale"]
        # ComfyUI (comfy/weight_adapter/base.py, weight_decompose) takes a dora_scale whose first dimension is
        # the weight's as the output-row decomposition, and broadcasts it against the (out, 1, ...) row norms
        assert tuple(scale.shape) == ((out, 1, 1, 1) if conv else (out, 1))
        # peft's own lora_magnitude_vector shapes, which diffusers loads as they are
        assert tuple(diffusers_keys[f"unet.{path}.lora_magnitude_vector.weight"].shape) == (
            (1, out, 1, 1) if conv else (out,))
    assert json.loads(safe_open(str(dora_run / "adapter" / LORA_FILE), framework="pt").metadata()[
        "lora_adapter_metadata"])["unet.use_dora"] is True
    _cli("export", dora_run / "checkpoints" / "step-0000016", "--format", "kohya", "--out", tmp_path / "k.safetensors")
    exported = load_file(str(tmp_path / "k.safetensors"))
    assert exported.keys() == kohya_keys.keys() and all(torch.equal(exported[k], kohya_keys[k]) for k in exported)


def test_inspect_shows_the_adapter_kind(dora_run, run):
    assert re.search(r"^  kind +dora$", _cli("inspect", dora_run).stdout, re.M)
    assert re.search(r"^  kind +lora$", _cli("inspect", run).stdout, re.M)


def test_merge_applies_the_dora_weight(dora_run, pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    _cli("merge", "--adapter", dora_run, "--out", tmp_path / "merged")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    adapter = read_adapter(dora_run)
    base = dict(pipe.unet.named_modules())
    for path, module in adapter.parts()[UNET].items():
        W = base[path].weight.detach().double()
        adapted = W + module.delta(torch.float64).reshape(W.shape)
        rows = adapted.flatten(1).norm(dim=1).reshape(-1, *[1] * (W.dim() - 1))
        expected = module.extras["magnitude"].double().reshape(rows.shape) * adapted / rows
        torch.testing.assert_close(merged.unet.get_submodule(path).weight.double(), expected, rtol=1e-5, atol=1e-6)
