"""Checkpoints round-trip optimizer state exactly, without pickle, and are written atomically."""
import json

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
