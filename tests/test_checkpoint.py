"""Checkpoints round-trip optimizer state exactly, without pickle, and are written atomically."""
import json
import os

import torch

from balora_diffusion import checkpoint as ckpt


def test_optimizer_state_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    q = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-2}, {"params": [q], "lr": 1e-3, "name": "x"}])
    for _ in range(3):
        (p.square().sum() + q.sum()).backward()
        opt.step()
        opt.zero_grad()
    ckpt.save_tree(tmp_path, "opt", opt.state_dict())
    # nothing but safetensors + JSON on disk
    assert sorted(f.name for f in tmp_path.iterdir()) == ["opt.json", "opt.safetensors"]
    json.loads((tmp_path / "opt.json").read_text())

    restored = torch.optim.AdamW([{"params": [p.detach().clone().requires_grad_()], "lr": 0},
                                  {"params": [q.detach().clone().requires_grad_()], "lr": 0}])
    restored.load_state_dict(ckpt.load_tree(tmp_path, "opt"))
    assert restored.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert isinstance(restored.param_groups[0]["betas"], tuple)
    assert restored.param_groups[1]["name"] == "x"
    for key in (0, 1):
        for name, value in opt.state_dict()["state"][key].items():
            assert torch.equal(restored.state_dict()["state"][key][name], value)


def test_checkpoints_rotate_and_a_partial_write_is_not_listed(tmp_path):
    for step in (10, 20, 30):
        ckpt.write_checkpoint(tmp_path, step, {"meta": {"step": step}}, keep=2)
    (tmp_path / f".{ckpt.PREFIX}0000040.tmp").mkdir()  # a write killed half way
    found = ckpt.list_checkpoints(tmp_path)
    assert [ckpt.checkpoint_step(f) for f in found] == [20, 30]
    assert ckpt.load_tree(found[-1], "meta") == {"step": 30}


def test_the_newest_intact_checkpoint_skips_truncated_missing_and_altered_files(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.write_checkpoint(tmp_path, step, {"meta": {"step": step}, "w": {"w": torch.arange(64.0) * step}}, keep=4)
    one, two, three, four = ckpt.list_checkpoints(tmp_path)
    assert ckpt.newest_intact(tmp_path) == (four, [])

    weights = four / "w.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    (three / "meta.json").unlink()
    altered = bytearray((two / "w.safetensors").read_bytes())
    altered[-1] ^= 0xFF  # the same size, a different last weight
    (two / "w.safetensors").write_bytes(altered)
    found, skipped = ckpt.newest_intact(tmp_path)
    assert found == one
    assert [note.split()[0] for note in skipped] == [four.name, three.name, two.name]
    assert "w.safetensors" in skipped[0] and "meta.json" in skipped[1] and "w.safetensors" in skipped[2]

    (one / ckpt.MANIFEST).unlink()
    found, skipped = ckpt.newest_intact(tmp_path)
    assert found is None and len(skipped) == 4 and ckpt.MANIFEST in skipped[-1]
