"""A LoRA file format is one module plus its entry in formats.registry: export and read_adapter find it there."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from balora_diffusion.cli import main as cli_main
from balora_diffusion.errors import UserError
from balora_diffusion.formats import registry
from balora_diffusion.formats.adapter import TEXT_ENCODER, UNET, Adapter, LoraModule
from balora_diffusion.formats.diffusers_lora import LORA_FILE, write_diffusers
from balora_diffusion.formats.read import read_adapter

# the same tensors as any LoRA, under other names: toy/PART/MODULE/FACTOR
TOY_MODULE = '''
import torch
from balora_diffusion.formats.adapter import Adapter, LoraModule
from balora_diffusion.formats.safetensors_io import read_file, write_file


def claims(keys):
    return all(key.startswith("toy/") for key in keys)


def write(path, adapter):
    tensors = {}
    for part, module_path, module in adapter.modules():
        stem = f"toy/{part}/{module_path}/"
        tensors.update({stem + "down": module.down, stem + "up": module.up,
                        stem + "alpha": torch.tensor(float(module.alpha))})
    return write_file(path, tensors, {})


def read(path):
    tensors, _ = read_file(path)
    factors = {}
    for key, tensor in tensors.items():
        _, part, module_path, factor = key.split("/")
        factors.setdefault(part, {}).setdefault(module_path, {})[factor] = tensor
    return Adapter({part: {path: LoraModule(f["down"], f["up"], float(f["alpha"])) for path, f in modules.items()}
                    for part, modules in factors.items()}, format="toy", source=str(path))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_lora.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.FORMATS, "toy", registry.Format(
        "toy", "one .safetensors file, keys toy/PART/MODULE/FACTOR", "toy_lora:read", "toy_lora:write",
        claims_function="toy_lora:claims"))


def _adapter_folder(folder: Path) -> Adapter:
    gen = torch.Generator().manual_seed(0)

    def module(rank, alpha):
        return LoraModule(torch.randn(rank, 64, generator=gen), torch.randn(64, rank, generator=gen), alpha)
    adapter = Adapter(part_modules={
        UNET: {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": module(2, 8.0)},
        TEXT_ENCODER: {"encoder.layers.0.self_attn.v_proj": module(4, 4.0)}})
    folder.mkdir()
    write_diffusers(folder, adapter)
    return adapter


def test_a_registered_format_is_exported_and_read_back(tmp_path, toy, capsys):
    adapter = _adapter_folder(tmp_path / "source")
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    assert "toy: one .safetensors file, keys toy/PART/MODULE/FACTOR" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "t.safetensors"
    assert cli_main(["export", str(tmp_path / "source"), "--format", "toy", "--out", str(out)]) == 0
    assert sorted(load_file(out)) == sorted(f"toy/{part}/{path}/{factor}" for part, path, _ in adapter.modules()
                                            for factor in ("down", "up", "alpha"))
    back = read_adapter(out)
    assert back.format == "toy"
    for part, path, module in adapter.modules():
        torch.testing.assert_close(back.parts()[part][path].delta(), module.delta())
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "source"), "--format", "toy", "--out", str(tmp_path / "folder")]) == 2
    assert "folder: a toy LoRA is one .safetensors file" in capsys.readouterr().err


def test_a_file_no_format_claims_goes_to_the_fallback_reader(tmp_path, toy, monkeypatch):
    _adapter_folder(tmp_path / "source")
    out = tmp_path / "t.safetensors"
    assert cli_main(["export", str(tmp_path / "source"), "--format", "toy", "--out", str(out)]) == 0
    monkeypatch.delitem(registry.FORMATS, "toy")
    with pytest.raises(UserError, match="in the diffusers or peft layout"):
        read_adapter(out)


def test_the_diffusers_entry_names_the_file_its_writer_writes(tmp_path):
    assert registry.FORMATS["diffusers"].folder_file == LORA_FILE
    assert registry.FORMATS[registry.FALLBACK].claims_function is None
