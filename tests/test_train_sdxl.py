"""Concept training on a tiny random SDXL-architecture model: the UNet and both text encoders train,
the new token is learned in both embedding tables, and a resumed run is the uninterrupted one."""
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from balora_diffusion import paths
from balora_diffusion.checkpoint import list_checkpoints, load_tree
from balora_diffusion.train import train
from balora_diffusion.train_config import TrainConfig



def _row(trainable: dict[str, torch.Tensor], part: str) -> torch.Tensor | None:
    """The new token's rows in `part`'s table (transformers names CLIPTextModel's modules with or without
    `text_model.`, CLIPTextModelWithProjection's with)."""
    return next((t for k, t in trainable.items() if k.startswith(f"{part}.")
                 and k.endswith("embeddings.token_embedding.extra")), None)


def _config(model, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(paths.DEMO_CONCEPT), base_model=str(model), token=["<zorb>"], init_word="heart",
                caption_template="a {token}", output_dir=str(out), steps=4, batch_size=2, lr_unet=1e-2, lr_text=1e-3,
                lr_embedding=1e-2, eval_every=4, checkpoint_every=2, heldout_size=2, grid_seeds=[1], fusion=[1.0],
                sample_steps=2, seed=0, random_crop=True)  # random crops: the time ids change from step to step
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tiny_sdxl, tmp_path_factory):
    return train(_config(tiny_sdxl, tmp_path_factory.mktemp("sdxl") / "run"))


def _trainable(out, step=None) -> dict[str, torch.Tensor]:
    found = list_checkpoints(out / "checkpoints")
    folder = found[-1] if step is None else next(f for f in found if f.name.endswith(f"{step:07d}"))
    return load_tree(folder, "trainable")


def test_the_unet_and_both_text_encoders_train_and_the_token_in_both_tables(run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    trainable = _trainable(run)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    # SDXL reads the first encoder's penultimate hidden states: its last layer's LoRA gets no gradient
    unread = f"text_encoder.encoder.layers.{base.text_encoder.config.num_hidden_layers - 1}."
    for part in ("unet", "text_encoder", "text_encoder_2"):
        ups = {k: t for k, t in trainable.items() if k.startswith(f"{part}.") and ".lora_B." in k}
        moved = {k for k, t in ups.items() if float(t.abs().sum()) > 0}  # peft starts every B at zero
        assert ups and moved == {k for k in ups if not k.replace("text_model.", "").startswith(unread)}, part
    for part in ("text_encoder", "text_encoder_2"):
        tokenizer = getattr(base, "tokenizer" if part == "text_encoder" else "tokenizer_2")
        ids = tokenizer("heart", add_special_tokens=False).input_ids
        init = getattr(base, part).get_input_embeddings().weight[ids].mean(0)
        row = _row(trainable, part)[0]
        assert row.shape == init.shape and not torch.allclose(row, init, atol=1e-4), part
    adapter = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in adapter} == {"unet", "text_encoder", "text_encoder_2"}


def test_the_second_encoders_lora_is_optional_its_token_row_still_trains(tiny_sdxl, tmp_path):
    # with prior preservation: the base model's answer is conditioned through both encoders as well
    out = train(_config(tiny_sdxl, tmp_path / "one", steps=2, train_text_encoder_2=False, prior_prompt="a heart",
                        prior_weight=0.5))
    trainable = _trainable(out)
    assert not any(k.startswith("text_encoder_2.") and "lora" in k for k in trainable)
    assert any(k.startswith("text_encoder.") and "lora" in k for k in trainable)
    assert _row(trainable, "text_encoder_2") is not None


def test_trains_from_an_sdxl_single_file_offline(tiny_sdxl, tmp_path):
    from balora_diffusion.formats.ldm_checkpoint import save_single_file
    from balora_diffusion.models import load_pipeline

    path = save_single_file(load_pipeline(tiny_sdxl, device="cpu"), tmp_path / "xl.safetensors", dtype=torch.float32)
    config = tmp_path / "config"  # the tiny model's component configs; the tokenizers come from the family
    shutil.copytree(tiny_sdxl, config, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    out = train(_config(path, tmp_path / "run", base_config=str(config), steps=2))
    assert _row(_trainable(out), "text_encoder_2") is not None
    assert set(load_file(out / "adapter" / "zorb.safetensors")) == {"clip_l", "clip_g"}


def test_a_resumed_run_is_the_uninterrupted_one(run, tiny_sdxl, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("step-0000004"))  # killed after step 2
    for name in ("adapter", "kohya"):
        shutil.rmtree(resumed / name)
    train(replace(_config(tiny_sdxl, resumed), resume="latest"))
    for name in ("pytorch_lora_weights.safetensors", "zorb.safetensors"):
        want, got = load_file(run / "adapter" / name), load_file(resumed / "adapter" / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    want, got = _trainable(run, 4), _trainable(resumed, 4)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)



PLAIN_DIFFUSERS = """
import sys, numpy as np, torch
from safetensors.torch import load_file
from diffusers import StableDiffusionXLPipeline
model, adapter, embedding, out = sys.argv[1:5]
pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True)
pipe.load_lora_weights(adapter)
rows = load_file(embedding)
pipe.load_textual_inversion(rows["clip_l"], token="<zorb>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(rows["clip_g"], token="<zorb>", text_encoder=pipe.text_encoder_2,
                            tokenizer=pipe.tokenizer_2)
image = pipe(prompt=["a <zorb>"], generator=[torch.Generator("cpu").manual_seed(7)], num_inference_steps=4,
             guidance_scale=5.0).images[0]
np.save(out, np.asarray(image))
"""


@pytest.mark.parametrize("layout", ["adapter", "kohya"])
def test_a_fresh_diffusers_process_draws_the_toolkits_image_from_the_run_files(run, tiny_sdxl, tmp_path, layout):
    import os
    import subprocess
    import sys

    import numpy as np

    from balora_diffusion.formats.fuse import Fused
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.generate import generate
    from balora_diffusion.models import load_pipeline

    pipe = load_pipeline(tiny_sdxl, device="cpu")

    def draw(prompt: str) -> np.ndarray:
        image = generate(pipe, [prompt], [7], steps=4, guidance_scale=5.0, progress=False)[0][0]
        return np.asarray(image, dtype=np.int16)

    adapter = read_adapter(run)
    assert adapter.embedding is not None and adapter.embedding_2 is not None
    with Fused(pipe, [(adapter, 1.0)]):
        ours = draw("a <zorb>")
    with Fused(pipe, [(adapter, 0.0)]):
        base = draw("a <zorb>")  # the token alone, no LoRA
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIFFUSERS)
    lora = run / "adapter" if layout == "adapter" else run / "kohya" / "run.safetensors"
    result = subprocess.run([sys.executable, str(script), str(tiny_sdxl), str(lora),
                             str(run / layout / "zorb.safetensors"), str(tmp_path / "plain.npy")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not loaded" not in result.stderr and "unexpected" not in result.stderr.lower(), result.stderr[-3000:]
    theirs = np.load(tmp_path / "plain.npy").astype(np.int16)
    assert np.abs(ours - base).mean() > 0.5  # the LoRA changes the image: the comparison below means something
    assert np.abs(ours - theirs).max() <= 3 and np.abs(ours - theirs).mean() < 0.2


def test_the_kohya_file_has_sdxl_names_and_reads_back_as_the_adapter(run):
    from balora_diffusion.formats.read import read_adapter

    tensors = load_file(run / "kohya" / "run.safetensors")
    prefixes = {key.split(".")[0].split("_text_model")[0] for key in tensors if key.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    # SGM's names: the tiny UNet's cross-attention level is SDXL's second, input_blocks 4 and 5
    assert any(key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for key in tensors)
    assert not any(key.startswith("lora_unet_down_blocks") for key in tensors)
    kohya, ours = read_adapter(run / "kohya" / "run.safetensors"), read_adapter(run / "adapter")
    assert kohya.info["model_family"] == ours.info["model_family"] == "sdxl"
    for part, modules in ours.parts().items():
        assert kohya.parts()[part].keys() == modules.keys(), part
        for path, module in modules.items():
            other = kohya.parts()[part][path]
            assert torch.equal(other.delta(), module.delta()), path


def test_inspect_export_and_generate_take_an_sdxl_run(run, tiny_sdxl, tmp_path, capsys):
    from balora_diffusion.cli import main as cli_main

    assert cli_main(["inspect", str(run)]) == 0
    assert "architecture  Stable Diffusion XL" in capsys.readouterr().out
    checkpoint = list_checkpoints(run / "checkpoints")[0]
    assert cli_main(["export", str(checkpoint), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert set(load_file(tmp_path / "zorb.safetensors")) == {"clip_l", "clip_g"}
    assert load_file(tmp_path / "x.safetensors").keys() == load_file(run / "kohya" / "run.safetensors").keys()
    assert cli_main(["generate", "--base-model", str(tiny_sdxl), "--adapter", str(run), "--prompt", "a <zorb>",
                     "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "drawn")]) == 0
    assert len(list((tmp_path / "drawn" / "images").glob("*.png"))) == 1


def test_merge_writes_an_sdxl_folder_and_single_file_that_draw_the_fused_image(run, tiny_sdxl, tmp_path):
    import numpy as np

    from balora_diffusion.cli import main as cli_main
    from balora_diffusion.formats.fuse import Fused
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.generate import generate
    from balora_diffusion.models import load_pipeline

    def draw(pipe) -> np.ndarray:
        image = generate(pipe, ["a <zorb>"], [3], steps=3, guidance_scale=5.0, progress=False)[0][0]
        return np.asarray(image, dtype=np.int16)

    base = load_pipeline(tiny_sdxl, device="cpu")
    with Fused(base, [(read_adapter(run), 1.0)]):
        fused = draw(base)
    assert cli_main(["merge", "--adapter", str(run), "--base-model", str(tiny_sdxl), "--out", str(tmp_path / "dir")]) == 0
    assert np.abs(draw(load_pipeline(tmp_path / "dir", device="cpu")) - fused).max() <= 2
    assert cli_main(["merge", "--adapter", str(run), "--base-model", str(tiny_sdxl), "--save-dtype", "fp32",
                     "--out", str(tmp_path / "one.safetensors")]) == 0
    assert set(load_file(tmp_path / "zorb.safetensors")) == {"clip_l", "clip_g"}  # beside: a file has no token
    config = tmp_path / "config"
    shutil.copytree(tiny_sdxl, config, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    single = load_pipeline(tmp_path / "one.safetensors", device="cpu", single_file_config=config)
    with Fused(single, [(read_adapter(tmp_path / "zorb.safetensors"), 1.0)]):
        assert np.abs(draw(single) - fused).max() <= 2
