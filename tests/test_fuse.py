"""`balora fuse` on the random-weight pipeline: the output against the closed form, the layer inputs
recorded by hooks against the model's own activations, a fresh diffusers process, and bad inputs
through the real command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from balora_diffusion.cli import main as cli_main
from balora_diffusion.formats.adapter import TEXT_ENCODER, UNET, Adapter, LoraModule
from balora_diffusion.formats.diffusers_lora import LORA_FILE, write_diffusers
from balora_diffusion.formats.embedding import embedding_file_name, write_embedding
from balora_diffusion.formats.read import read_adapter

# (part, path, weight shape): attention, a 1x1 conv, a 3x3 conv and a text-encoder layer
LAYERS = [(UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (32, 32)),
          (UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
          (UNET, "down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1)),
          (UNET, "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3)),
          (TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj", (32, 32))]
PROMPTS = ["a <aaa> on a blue background", "a small <aaa>", "a <bbb> on a white background", "a large <bbb>"]


def _adapter_folder(folder: Path, token: str, seed: int, rank: int = 2, layers=LAYERS, info=None,
                    factors_seed: int | None = None) -> Path:
    gen = torch.Generator().manual_seed(seed if factors_seed is None else factors_seed)
    adapter = Adapter(tokens=[token], embedding=torch.randn(1, 32, generator=torch.Generator().manual_seed(seed)),
                      info={"token": [token], **(info or {})})
    for part, path, shape in layers:
        down = torch.randn(rank, *shape[1:], generator=gen) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen) * 0.3
        adapter.parts()[part][path] = LoraModule(down, up, alpha=1.5 * rank)
    folder.mkdir(parents=True)
    write_diffusers(folder, adapter)
    write_embedding(folder, adapter.tokens, adapter.embedding)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _fuse(model: Path, *args) -> None:
    assert cli_main(["fuse", "--base-model", str(model), "--steps", "3", *map(str, args)]) == 0


def test_concepts_with_one_update_fuse_back_to_it_wherever_their_inputs_reach(random_sd_dir, tmp_path, prompts_file):
    # the same update under two tokens: (dW G_1 + dW G_2) G^-1 = dW on every layer whose Gram is invertible
    a = _adapter_folder(tmp_path / "a", "<aaa>", seed=1, factors_seed=7)
    b = _adapter_folder(tmp_path / "b", "<bbb>", seed=2, factors_seed=7)
    out = tmp_path / "fused"
    _fuse(random_sd_dir, "--adapter", a, b, "--out", out, "--prompts-file", prompts_file, "--ridge", "0")
    report = json.loads((out / "fuse.json").read_text())
    fused, original = read_adapter(out), read_adapter(a)
    assert fused.tokens == ["<aaa>", "<bbb>"]
    torch.testing.assert_close(fused.embedding, torch.cat([original.embedding, read_adapter(b).embedding]))
    invertible = [entry["layer"] for entry in report["layers"] if not entry["singular"]]
    assert "unet:down_blocks.0.resnets.0.conv1" in invertible and "unet:down_blocks.0.attentions.0.proj_in" in invertible
    for part, path, module in fused.modules():
        if f"{part}:{path}" in invertible:
            want = original.parts()[part][path].delta()
            torch.testing.assert_close(module.delta(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # the prompts were split by token
    assert [entry["prompts"] for entry in report["adapters"]] == [PROMPTS[:2], PROMPTS[2:]]
    assert json.loads((out / "run.json").read_text())["config"]["token"] == ["<aaa>", "<bbb>"]


def test_sum_adds_the_updates_and_rank_cuts_them_by_svd(random_sd_dir, tmp_path):
    a = _adapter_folder(tmp_path / "a", "<aaa>", seed=1)
    b = _adapter_folder(tmp_path / "b", "<bbb>", seed=2)
    _fuse(random_sd_dir, "--adapter", f"{a}:0.5", b, "--out", tmp_path / "sum", "--method", "sum")
    _fuse(random_sd_dir, "--adapter", f"{a}:0.5", b, "--out", tmp_path / "cut", "--method", "sum", "--rank", "1")
    first, second = read_adapter(a), read_adapter(b)
    summed, cut = read_adapter(tmp_path / "sum"), read_adapter(tmp_path / "cut")
    report = {e["layer"]: e for e in json.loads((tmp_path / "cut" / "fuse.json").read_text())["layers"]}
    for part, path, module in summed.modules():
        want = 0.5 * first.parts()[part][path].delta(torch.float64) + second.parts()[part][path].delta(torch.float64)
        torch.testing.assert_close(module.delta(torch.float64), want, rtol=1e-5, atol=1e-6)
        assert module.rank == 4
        flat = want.reshape(want.shape[0], -1)
        s = torch.linalg.svdvals(flat)
        assert cut.parts()[part][path].rank == 1
        assert report[f"{part}:{path}"]["truncation_loss"] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)
        u, _, vh = torch.linalg.svd(flat)
        best = (s[0] * u[:, :1] @ vh[:1]).reshape(want.shape)
        torch.testing.assert_close(cut.parts()[part][path].delta(torch.float64), best, rtol=1e-4, atol=1e-5)


def test_recorded_grams_are_the_layers_own_inputs(random_sd_dir):
    from balora_diffusion.gram_recorder import GramRecorder
    from balora_diffusion.models import load_pipeline

    pipe = load_pipeline(random_sd_dir, device="cpu")
    encoder = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    ids = pipe.tokenizer(["a blue square", "a red circle"], padding="max_length", return_tensors="pt").input_ids
    x = torch.randn(2, 32, 8, 8)
    with GramRecorder({"q": encoder.encoder.layers[0].self_attn.q_proj, "conv": conv}) as recorder, torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[0]
        conv(x)
    q_inputs = encoder.encoder.layers[0].layer_norm1(hidden).detach().double().reshape(-1, 32)
    torch.testing.assert_close(recorder.gram_of("q"), q_inputs.T @ q_inputs)
    # the conv's columns: the zero-padded 3x3 patch around each output pixel, in the weight's order
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1)).double()
    patches = torch.stack([padded[n, :, i:i + 3, j:j + 3].reshape(-1) for n in range(2) for i in range(8)
                           for j in range(8)])
    torch.testing.assert_close(recorder.gram_of("conv"), patches.T @ patches)
    out = conv(x).detach().double().permute(0, 2, 3, 1).reshape(-1, 32)
    torch.testing.assert_close(patches @ conv.weight.double().flatten(1).T + conv.bias.double(), out,
                               rtol=1e-4, atol=1e-4)


PLAIN_DIFFUSERS = """
import json, sys, numpy as np, torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
model, folder, embedding, tokens, out = sys.argv[1:6]
pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False, local_files_only=True)
pipe.load_lora_weights(folder)
# one file holds every token's row (its header names them): diffusers takes several tokens as a list of rows
rows = next(iter(load_file(embedding).values()))
pipe.load_textual_inversion(list(rows), token=json.loads(tokens))
image = pipe(prompt=["a <bbb> on a white background"], generator=[torch.Generator("cpu").manual_seed(3)],
             num_inference_steps=4, guidance_scale=7.5, output_type="np").images[0]
np.save(out, image)
"""


def _ours_and_plain_diffusers(model: Path, folder: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image of "a <bbb> ..." drawn by the toolkit with the adapter in `folder` at fusion 1 and at 0,
    and by plain diffusers in a fresh process from the same files."""
    from balora_diffusion.formats.fuse import Fused
    from balora_diffusion.models import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    adapter = read_adapter(folder)

    def ours() -> np.ndarray:
        return pipe(prompt=["a <bbb> on a white background"], generator=[torch.Generator("cpu").manual_seed(3)],
                    num_inference_steps=4, guidance_scale=7.5, output_type="np").images[0]

    with Fused(pipe, [(adapter, 1.0)]) as fused:
        with_lora = ours()
        fused.set_fusion(0.0)
        without_lora = ours()
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIFFUSERS)
    result = subprocess.run([sys.executable, str(script), str(model), str(folder),
                             str(folder / embedding_file_name(adapter.tokens)), json.dumps(adapter.tokens),
                             str(tmp_path / "plain.npy")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not loaded" not in result.stderr and "unexpected" not in result.stderr.lower(), result.stderr[-3000:]
    return with_lora, without_lora, np.load(tmp_path / "plain.npy")


def test_a_fused_adapter_draws_the_toolkits_image_in_a_fresh_diffusers_process(random_sd_dir, tmp_path, prompts_file):
    a = _adapter_folder(tmp_path / "a", "<aaa>", seed=1)
    b = _adapter_folder(tmp_path / "b", "<bbb>", seed=2, layers=LAYERS[:3])  # so the summed ranks differ
    out = tmp_path / "fused"
    _fuse(random_sd_dir, "--adapter", a, b, "--out", out, "--prompts-file", prompts_file)
    # each layer keeps its own rank: 4 where both adapters reach, 2 where only <aaa>'s does
    ranks = {f"{part}:{path}": module.rank for part, path, module in read_adapter(out).modules()}
    assert ranks["unet:down_blocks.0.attentions.0.proj_in"] == 4 and ranks["unet:down_blocks.0.resnets.0.conv1"] == 2
    with_lora, without_lora, theirs = _ours_and_plain_diffusers(random_sd_dir, out / "adapter", tmp_path)
    assert np.abs(with_lora - without_lora).mean() > 0.01  # the fused LoRA changes the image
    assert np.abs(with_lora - theirs).max() < 2e-3


@pytest.mark.parametrize("mixed", [UNET, TEXT_ENCODER])
def test_a_file_of_mixed_ranks_and_alphas_draws_the_toolkits_image_in_a_fresh_diffusers_process(random_sd_dir, tmp_path,
                                                                                              mixed):
    """One model's modules each of its own rank and alpha, the other's all alike (as a fused adapter
    has them): diffusers reads both from the header (rank_pattern / alpha_pattern), and cannot infer
    one model's ranks itself while the other's stand in the header."""
    gen = torch.Generator().manual_seed(5)
    adapter = Adapter(tokens=["<bbb>"], embedding=torch.randn(1, 32, generator=gen), info={"token": ["<bbb>"]})
    text_layers = [(TEXT_ENCODER, f"encoder.layers.{i}.self_attn.{name}", (32, 32)) for i in (0, 1)
                   for name in ("q_proj", "v_proj")]
    for k, (part, path, shape) in enumerate(LAYERS[:-1] + text_layers):
        rank, alpha = (1 + k % 3, 0.5 + k) if part == mixed else (2, 3.0)
        down = torch.randn(rank, *shape[1:], generator=gen) * 0.3
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen) * 0.3
        adapter.parts()[part][path] = LoraModule(down, up, alpha=alpha)
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_diffusers(folder, adapter)
    write_embedding(folder, adapter.tokens, adapter.embedding)
    for part, path, module in read_adapter(folder).modules():
        want = adapter.parts()[part][path]
        assert (module.rank, module.alpha) == (want.rank, want.alpha)
    with_lora, without_lora, theirs = _ours_and_plain_diffusers(random_sd_dir, folder, tmp_path)
    assert np.abs(with_lora - without_lora).mean() > 0.01
    assert np.abs(with_lora - theirs).max() < 2e-3


def _refused(tmp_path: Path, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "fuse", *map(str, args)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("balora: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"a": _adapter_folder(root / "a", "<aaa>", seed=1), "b": _adapter_folder(root / "b", "<bbb>", seed=2),
            "same_token": _adapter_folder(root / "c", "<aaa>", seed=3),
            "other_shape": _adapter_folder(root / "d", "<ddd>", seed=4,
                                           layers=[(TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj", (64, 64))]),
            "other_base": _adapter_folder(root / "e", "<eee>", seed=5, info={"base_model_hash": "f" * 64}),
            "this_base": _adapter_folder(root / "f", "<fff>", seed=6, info={"base_model_hash": "0" * 64}),
            "existing": root / "existing"}


@pytest.mark.parametrize("case, args, named", [
    ("one adapter", ["--adapter", "{a}"], "two or more adapters"),
    ("a token twice", ["--adapter", "{a}", "{same_token}"], "both define the token <aaa>"),
    ("other shapes", ["--adapter", "{a}", "{other_shape}"], "weights of shapes [32, 32] and [64, 64]"),
    ("other base models", ["--adapter", "{other_base}", "{this_base}"], "different base models"),
    ("rank 0", ["--adapter", "{a}", "{b}", "--rank", "0"], "--rank: must be 1 or more"),
    ("ranks past the limit", ["--adapter", "{a}", "{b}", "--max-rank", "3"], "rank 4 at"),
    ("no prompts", ["--adapter", "{a}", "{b}"], "give --prompts-file"),
])
def test_bad_inputs_are_one_line(bad, tmp_path, case, args, named):
    line = _refused(tmp_path, *[arg.format(**bad) for arg in args], "--out", tmp_path / "out")
    assert named in line, case
    assert not (tmp_path / "out").exists()


def test_an_existing_out_is_refused_unless_overwrite(bad, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _refused(tmp_path, "--adapter", bad["a"], bad["b"], "--method", "sum", "--out", out)
    assert "already exists; add --overwrite true" in line and (out / "keep.txt").read_text() == "mine"
