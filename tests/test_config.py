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
