"""TOML configs and flags are one schema: flags override the file, unknown keys are errors."""
import argparse

import pytest

from balora_diffusion.config import add_config_arguments, config_from_args, read_toml, to_toml
from balora_diffusion.errors import UserError
from balora_diffusion.train_config import TrainConfig


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    return config_from_args(TrainConfig, parser.parse_args(argv))


def test_flags_override_file_and_file_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('method = "ilora"\nsteps = 7\nfusion = [0.0, 0.5]\nflip = false\n')
    cfg = _parse(["--config", str(cfg_file), "--steps", "9", "--token", "<a>", "<b>"])
    assert cfg.method == "ilora" and cfg.steps == 9 and cfg.fusion == [0.0, 0.5]
    assert cfg.flip is False and cfg.token == ["<a>", "<b>"]
    assert cfg.rank == TrainConfig().rank


def test_to_toml_round_trips(tmp_path):
    cfg = TrainConfig(method="balora+scaled", token=["<x>"], lr_unet=3e-4, caption_template='a "{token}"')
    path = tmp_path / "round.toml"
    path.write_text(to_toml(cfg))
    assert TrainConfig(**read_toml(TrainConfig, path)) == cfg


def test_unknown_keys_and_bad_toml_are_user_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(UserError, match="stepz"):
        read_toml(TrainConfig, bad)
    bad.write_text("steps = = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(TrainConfig, bad)
    with pytest.raises(SystemExit):
        _parse(["--mixed-precision", "fp8"])


def test_extends_layers_a_file_over_its_parent(tmp_path):
    (tmp_path / "base.toml").write_text('method = "lora"\nsteps = 5\nrank = 8\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nmethod = "balora"\n')
    values = read_toml(TrainConfig, tmp_path / "child.toml")
    assert values == {"method": "balora", "steps": 5, "rank": 8}


def test_every_shipped_training_config_is_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("*.toml"))
    assert len(configs) >= 9
    methods = set()
    for path in configs:
        cfg = TrainConfig(**read_toml(TrainConfig, path))
        methods.add(cfg.method)
        if path.name.startswith("mixofshow-"):
            # the paper's protocol, whatever the rule
            assert (cfg.rank, cfg.lr_text, cfg.lr_unet, cfg.lr_embedding, cfg.noise_offset) == (4, 1e-5, 1e-4, 1e-3, 0.01)
    assert {"lora", "loraplus", "scaled", "ilora", "pilora", "balora", "balora+scaled", "hilora"} <= methods
