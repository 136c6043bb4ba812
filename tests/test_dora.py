"""DoRA adapters: peft's use_dora trained by every update rule, checked against the math of a peft DoRA
layer, resumed exactly, and refused where only LoRA makes sense (fusion into one adapter)."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from balora_diffusion import paths
from balora_diffusion.adapters import DORA, get_kind
from balora_diffusion.adapters.dora import MAGNITUDE
from balora_diffusion.checkpoint import list_checkpoints
from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import LoraModule
from balora_diffusion.lora import balance_diagnostics, find_lora_pairs
from balora_diffusion.lora_node import use_single_node_forward
from balora_diffusion.rules.build import build_optimizer
from balora_diffusion.train import train
from balora_diffusion.train_config import TrainConfig

METHODS = ["lora", "loraplus", "scaled", "ilora", "pilora", "balora", "balora+scaled", "hilora"]
MAGNITUDE_KEY = ".lora_magnitude_vector.weight"


def _config(model_dir, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(paths.DEMO_CONCEPT), base_model=str(model_dir), token=["<zorb>"], init_word="heart",
                caption_template="a {token}", flip=False, output_dir=str(out), steps=4, batch_size=2,
                lr_unet=1e-2, lr_text=1e-3, lr_embedding=1e-2, eval_every=4, checkpoint_every=4, heldout_size=2,
                grid_seeds=[1], fusion=[1.0], sample_steps=1, seed=0, adapter_kind="dora",
                unet_targets=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    base.update(kw)
    return TrainConfig(**base)


def _dora_layers(seed: int = 0) -> torch.nn.Module:
    """A Linear and a Conv2d under peft DoRA, with random factors and magnitudes (not peft's init)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Conv2d(10, 6, 3, padding=1))
    model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["0", "1"], use_dora=True), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.copy_(torch.rand_like(p) + 1.0)
            elif "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def _module(layer) -> LoraModule:
    return LoraModule(layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(),
                      float(layer.lora_alpha["default"]), extras=DORA.extras_of_peft_layer(layer, "default"))


def test_the_dora_weight_is_what_a_peft_dora_layer_computes():
    model = _dora_layers()
    x = torch.randn(2, 12, dtype=torch.float64)
    for index, layer in enumerate(model):
        base = layer.base_layer
        weight = get_kind("dora").update(base.weight.detach().double(), _module(layer)) + base.weight.detach().double()
        # the formula itself, written out: m * (W + s B A) / ||W + s B A|| per output row
        A, B = layer.lora_A["default"].weight.double().flatten(1), layer.lora_B["default"].weight.double().flatten(1)
        adapted = base.weight.double().flatten(1) + layer.scaling["default"] * B @ A
        m = layer.lora_magnitude_vector["default"].weight.double().flatten()
        torch.testing.assert_close(weight.flatten(1), m[:, None] * adapted / adapted.norm(dim=1, keepdim=True))
        inputs = x if index == 0 else torch.randn(2, 10, 5, 5, dtype=torch.float64)
        op = torch.nn.functional.linear if index == 0 else (
            lambda t, w, b: torch.nn.functional.conv2d(t, w, b, padding=1))
        layer.double()
        torch.testing.assert_close(op(inputs, weight, base.bias.double()), layer(inputs).detach())
        assert not torch.allclose(weight, base.weight.double())  # the adapter does something


def test_balancing_leaves_the_low_rank_product_and_every_dora_output_unchanged():
    model = _dora_layers().double()
    pairs = find_lora_pairs(model)
    magnitudes = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert len(pairs) == 2 and len(magnitudes) == 2
    assert not {id(p) for p in magnitudes} & {id(t) for pair in pairs for t in (pair.A, pair.B)}
    x = [torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 10, 4, 4, dtype=torch.float64)]
    before = [layer(t).detach() for layer, t in zip(model, x)]
    products = [pair.b_matrix(pair.B).detach() @ pair.a_matrix(pair.A).detach() for pair in pairs]
    assert min(d["imbalance"] for d in balance_diagnostics(pairs).values()) > 0.1
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("balora", [{"params": trainable, "lr": 0.0}], pairs, base="sgd",
                                base_kwargs={"lr": 0.0})
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert max(d["imbalance"] for d in balance_diagnostics(pairs).values()) < 1e-8  # the projection ran
    for pair, product in zip(pairs, products):
        torch.testing.assert_close(pair.b_matrix(pair.B).detach() @ pair.a_matrix(pair.A).detach(), product)
    for layer, t, out in zip(model, x, before):
        torch.testing.assert_close(layer(t).detach(), out)


def test_dora_layers_keep_peft_s_forward():
    model = _dora_layers()
    x = torch.randn(4, 12, requires_grad=True)
    want = model[0](x)
    use_single_node_forward(model)
    got = model[0](x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    assert model[0].lora_magnitude_vector["default"].weight.grad is not None


@pytest.mark.parametrize("method", METHODS)
def test_every_rule_trains_a_dora_adapter_and_its_magnitudes(method, random_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    out = train(_config(random_sd_dir, tmp_path / method, method=method))
    tensors = load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(MAGNITUDE_KEY)}
    assert len(magnitudes) == len([k for k in tensors if k.endswith("lora_A.weight")]) > 0
    assert any(k.startswith("text_encoder.") for k in magnitudes) and any(".conv1." in k for k in magnitudes)
    # peft starts a magnitude at its base row's norm (B = 0): the base optimizer moved them
    unet = UNet2DConditionModel.from_pretrained(random_sd_dir / "unet")
    moved = 0.0
    for key, value in magnitudes.items():
        if key.startswith("unet."):
            weight = unet.get_submodule(key.removeprefix("unet.").removesuffix(MAGNITUDE_KEY)).weight
            moved = max(moved, float((value.flatten() - weight.detach().flatten(1).norm(dim=1)).abs().max()))
    assert moved > 1e-4
    if method in ("balora", "balora+scaled"):
        run = json.loads((out / "run.json").read_text())
        assert max(d["imbalance"] for d in run["diagnostics"].values()) < 1e-4


def test_a_resumed_dora_run_writes_the_uninterrupted_adapter(random_sd_dir, tmp_path):
    cfg = _config(random_sd_dir, tmp_path / "straight", method="balora", steps=6, checkpoint_every=3, eval_every=6)
    train(cfg)
    train(replace(cfg, output_dir=str(tmp_path / "resumed")))
    # the second run is cut back to its first checkpoint, as if killed after it
    newest = list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1]
    assert newest.name.endswith("6")
    shutil.rmtree(newest)
    for folder in ("adapter", "kohya"):
        shutil.rmtree(tmp_path / "resumed" / folder)
    train(replace(cfg, output_dir=str(tmp_path / "resumed"), resume="latest"))
    for folder in ("adapter", "kohya"):
        for file in sorted((tmp_path / "straight" / folder).iterdir()):
            a = load_file(str(file))
            b = load_file(str(tmp_path / "resumed" / folder / file.name.replace("straight", "resumed")))
            assert a.keys() == b.keys() and any(k.endswith((MAGNITUDE_KEY, ".dora_scale")) for k in a) == (
                file.name != "zorb.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a), file


def test_fusing_dora_adapters_into_one_is_refused(random_sd_dir, tmp_path):
    from balora_diffusion.commands.fuse import read_concepts

    out = train(_config(random_sd_dir, tmp_path / "run", steps=1))
    with pytest.raises(UserError, match="is a dora adapter; only LoRA adapters can be fused"):
        read_concepts([(str(out), 1.0), (str(out), 1.0)], "sum", max_rank=64, rank=None, lines=None)


def test_a_magnitude_that_does_not_fit_its_layer_is_refused():
    from balora_diffusion.formats.adapter import Adapter

    module = _module(_dora_layers()[0])
    module.extras[MAGNITUDE] = module.extras[MAGNITUDE][:-1]
    with pytest.raises(UserError, match="magnitude of shape \\[9\\] for a layer of 10 outputs"):
        Adapter({"unet": {"x": module}}, kind="dora")
    with pytest.raises(UserError, match="holds the extras \\['magnitude'\\], where a lora module holds \\[\\]"):
        Adapter({"unet": {"x": _module(_dora_layers()[0])}})


def test_an_input_axis_dora_scale_is_refused_and_the_output_axis_one_read(tmp_path):
    from safetensors.torch import save_file

    from balora_diffusion.formats.adapter import Adapter
    from balora_diffusion.formats.kohya_lora import write_kohya
    from balora_diffusion.formats.read import read_adapter

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True),
                                    torch.nn.Sequential(torch.nn.Linear(320, 320)))
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    file = write_kohya(tmp_path / "dora.safetensors", Adapter({"unet": {path: _module(model[0])}}, kind="dora"))
    back = read_adapter(file)
    assert back.kind == "dora"
    torch.testing.assert_close(back.parts()["unet"][path].extras[MAGNITUDE], _module(model[0]).extras[MAGNITUDE])
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(".dora_scale"))
    assert tensors[key].shape == (320, 1)
    tensors[key] = tensors[key].reshape(1, 320)  # LyCORIS' default: a norm per input column
    save_file(tensors, str(tmp_path / "columns.safetensors"))
    with pytest.raises(UserError, match=f"{key}.*input columns"):
        read_adapter(tmp_path / "columns.safetensors")


def test_an_unknown_adapter_kind_is_refused_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "train", "--data-dir", str(paths.DEMO_CONCEPT),
                             "--output-dir", str(tmp_path / "run"), "--adapter-kind", "loha"],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "balora: error: --adapter-kind: unknown adapter kind 'loha'; expected one of lora, dora"], result.stderr
    assert not (tmp_path / "run").exists()
