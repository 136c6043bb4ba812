"""TOML configs and flags are one schema: flags override the file, unknown keys are errors."""
import argparse
from pathlib import Path

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


def test_to_toml_round_trips(tmp_path, monkeypatch):
    cfg = TrainConfig(method="balora+scaled", token=["<x>"], lr_unet=3e-4, caption_template='a "{token}"')
    # in the current folder, as the relative output_dir is read relative to the file
    monkeypatch.chdir(tmp_path)
    path = Path("round.toml")
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


def test_extends_layers_a_file_over_its_parent(tmp_path):
    (tmp_path / "base.toml").write_text('method = "lora"\nsteps = 5\nrank = 8\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nmethod = "balora"\n')
    values = read_toml(TrainConfig, tmp_path / "child.toml")
    assert values == {"method": "balora", "steps": 5, "rank": 8}


def test_every_shipped_training_config_is_valid():
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


# --- every option is checked where the config is built, from a TOML file and from flags alike

def _toml(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line_error(call, *option_and_message):
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in option_and_message:
        assert part in message, message
    return message


BAD_TOML = [
    ('lr_unet = "2e-3"', "lr_unet: expected a number, got the string '2e-3'"),
    ("lr_unet = -1", "lr_unet must be > 0, got -1"),
    ("lr_unet = true", "lr_unet: expected a number, got true"),
    ("steps = 0", "steps must be >= 1, got 0"),
    ("steps = -5", "steps must be >= 1, got -5"),
    ("steps = 5.0", "steps: expected an integer, got 5.0"),
    ("eval_every = 0", "eval_every must be >= 1, got 0"),
    ("checkpoint_every = 0", "checkpoint_every must be >= 1, got 0"),
    ("sample_steps = 0", "sample_steps must be >= 1, got 0"),
    ("max_grad_norm = nan", "max_grad_norm must be a finite number, got nan"),
    ("guidance_scale = inf", "guidance_scale must be a finite number, got inf"),
    ("fusion = []", "fusion must not be empty"),
    ("fusion = [0.0, nan]", "fusion must be a finite number, got nan"),
    ("grid_seeds = []", "grid_seeds must not be empty"),
    ("grid_seeds = [-1]", "grid_seeds must be >= 0, got -1"),
    ("token = []", "token must not be empty"),
    ("unet_targets = []", "unet_targets must not be empty"),
    ("rank = 0", "rank must be >= 1, got 0"),
    ("adam_beta2 = 1.0", "adam_beta2 must be < 1, got 1.0"),
    ('flip = "no"', "flip: expected true or false, got the string 'no'"),
    ('mixed_precision = "fp8"', "mixed_precision must be one of no, fp16, bf16; got 'fp8'"),
    ('method = "balorra"', "method: unknown method component 'balorra'"),
    ('method = "balora+ilora"', "method: method 'balora+ilora' combines"),
    ('optimizer = "adamx"', "optimizer: unknown base optimizer 'adamx'"),
    ('caption_template = "a {tok} photo"', "caption_template: "),
]


@pytest.mark.parametrize("line, message", BAD_TOML)
def test_a_bad_value_in_a_toml_is_a_one_line_error_naming_the_option(tmp_path, line, message):
    path = _toml(tmp_path, line + "\n")
    _one_line_error(lambda: _parse(["--config", str(path)]), message)


BAD_FLAGS = [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--steps", "ten"], "--steps: expected an integer, got 'ten'"),
    (["--lr-unet", "-1"], "--lr-unet must be > 0, got -1.0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--sample-steps", "0"], "--sample-steps must be >= 1, got 0"),
    (["--fusion"], "--fusion must not be empty"),
    (["--flip", "maybe"], "--flip: expected true or false, got 'maybe'"),
    (["--mixed-precision", "fp8"], "--mixed-precision must be one of no, fp16, bf16; got 'fp8'"),
    (["--method", "nope"], "--method: unknown method component 'nope'"),
    (["--optimizer", "SGD"], "--optimizer: unknown base optimizer 'SGD'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_a_bad_flag_is_a_one_line_error_naming_the_option(argv, message):
    _one_line_error(lambda: _parse(argv), message)


def test_a_config_built_in_python_is_checked_too():
    _one_line_error(lambda: TrainConfig(steps=0), "steps must be >= 1, got 0")


def test_values_are_normalised_to_the_options_types(tmp_path):
    path = _toml(tmp_path, 'token = "<zorb>"\nlr_unet = 1\nfusion = [0, 1]\ngrid_prompts = []\n')
    cfg = _parse(["--config", str(path)])
    assert cfg.token == ["<zorb>"]
    assert cfg.lr_unet == 1.0 and isinstance(cfg.lr_unet, float)
    assert cfg.fusion == [0.0, 1.0] and all(isinstance(w, float) for w in cfg.fusion)
    assert cfg.grid_prompts == []  # empty = the caption template
    # 0 where the help says it disables something or picks a default
    cfg = _parse(["--grid-every", "0", "--max-grad-norm", "0", "--min-snr-gamma", "0", "--lr-embedding", "0",
                  "--resolution", "0", "--cpu-threads", "0", "--warmup-steps", "0"])
    assert (cfg.grid_every, cfg.max_grad_norm, cfg.resolution, cfg.lr_embedding) == (0, 0.0, 0, 0.0)




# --- paths in a TOML file are relative to that file; flags to the current folder

def test_paths_in_a_toml_resolve_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    _toml(folder, 'data_dir = "concept"\nbase_model = "../models/m.safetensors"\nbase_config = "sd"\n'
                  'output_dir = "runs/x"\nresume = "runs/x/checkpoints/step-0000002"\n')
    monkeypatch.chdir(tmp_path)
    cfg = _parse(["--config", "configs/c.toml"])
    for name, expected in [("data_dir", folder / "concept"), ("base_model", tmp_path / "models" / "m.safetensors"),
                           ("base_config", folder / "sd"), ("output_dir", folder / "runs" / "x"),
                           ("resume", folder / "runs" / "x" / "checkpoints" / "step-0000002")]:
        assert Path(getattr(cfg, name)).resolve() == expected.resolve(), name
    # flags stay relative to the current folder; "latest", absolute and empty paths stay as they are
    absolute = tmp_path / "elsewhere"
    _toml(folder, f'resume = "latest"\ndata_dir = "{absolute}"\nbase_model = ""\n')
    cfg = _parse(["--config", "configs/c.toml", "--output-dir", "runs/y"])
    assert (cfg.resume, cfg.data_dir, cfg.base_model, cfg.output_dir) == ("latest", str(absolute), "", "runs/y")


def test_paths_of_an_extended_file_resolve_against_that_file(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "child").mkdir()
    _toml(tmp_path / "base", 'data_dir = "images"\n', "parent.toml")
    child = _toml(tmp_path / "child", 'extends = "../base/parent.toml"\noutput_dir = "out"\n')
    cfg = _parse(["--config", str(child)])
    assert Path(cfg.data_dir).resolve() == (tmp_path / "base" / "images").resolve()
    assert Path(cfg.output_dir).resolve() == (tmp_path / "child" / "out").resolve()


def test_an_extends_cycle_is_a_one_line_error(tmp_path):
    itself = _toml(tmp_path, 'extends = "self.toml"\nsteps = 3\n', "self.toml")
    _one_line_error(lambda: read_toml(TrainConfig, itself), "cycle", "self.toml")
    _toml(tmp_path, 'extends = "b.toml"\n', "a.toml")
    _toml(tmp_path, 'extends = "a.toml"\n', "b.toml")
    _one_line_error(lambda: read_toml(TrainConfig, tmp_path / "a.toml"), "cycle", "a.toml", "b.toml")
    not_a_file = _toml(tmp_path, "extends = 3\n", "number.toml")
    _one_line_error(lambda: read_toml(TrainConfig, not_a_file), "extends: expected a file name, got 3")
