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
    out = train(_config(tiny_sdxl, tmp_path / "one", steps=2, train_text_encoder_2=False))
    trainable = _trainable(out)
    assert not any(k.startswith("text_encoder_2.") and "lora" in k for k in trainable)
    assert any(k.startswith("text_encoder.") and "lora" in k for k in trainable)
    assert _row(trainable, "text_encoder_2") is not None


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

