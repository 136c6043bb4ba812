"""Bad options fail through the real `balora` command in one line, before any model or training code loads."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balora_diffusion import paths
from balora_diffusion.cli import main as cli_main
from balora_diffusion.errors import UserError


def _balora(*args, code=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = ["-c", code, *args] if code else ["-m", "balora_diffusion.cli", *args]
    start = time.monotonic()
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


@pytest.mark.parametrize("case", ["toml", "flag"])
def test_train_with_a_bad_value_exits_2_in_one_line_within_seconds(tmp_path, case):
    config = tmp_path / "bad.toml"
    config.write_text(f'data_dir = "{paths.DEMO_CONCEPT}"\nlr_unet = "2e-3"\n')
    args = (["--config", str(config)] if case == "toml"
            else ["--data-dir", str(paths.DEMO_CONCEPT), "--steps", "0"])
    result, seconds = _balora("train", "--output-dir", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("balora: error: "), lines
    assert ("lr_unet" if case == "toml" else "--steps") in lines[0]
    assert seconds < 3, f"{seconds:.1f} s: the check ran after something heavy loaded"
    assert not (tmp_path / "run").exists()


def test_train_checks_its_options_before_importing_torch(tmp_path):
    code = ("import sys\nfrom balora_diffusion.cli import main\nrc = main(sys.argv[1:])\n"
            "print('torch' in sys.modules)\nsys.exit(rc)")
    result, _ = _balora("train", "--data-dir", str(paths.DEMO_CONCEPT), "--output-dir", str(tmp_path / "run"),
                        "--eval-every", "0", code=code)
    assert result.returncode == 2 and "eval_every" in result.stderr.replace("-", "_"), result.stderr
    assert result.stdout.strip() == "False"


@pytest.fixture
def no_training(monkeypatch):
    """`balora demo` stops where training would start; the configs it would have trained with."""
    import balora_diffusion.train

    seen = []

    def stop(cfg):
        seen.append(cfg)
        raise UserError("training reached")

    monkeypatch.setattr(balora_diffusion.train, "train", stop)
    return seen


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--method", "nope"], "--method: unknown method component 'nope'"),
    (["--seeds"], "--seeds must not be empty"),
    (["--seeds", "one"], "--seeds: expected an integer, got 'one'"),
    (["--output-dir", ""], "--output-dir must not be empty"),
])
def test_demo_checks_its_overrides_before_training(no_training, tmp_path, capsys, flags, message):
    assert cli_main(["demo", "--output-dir", str(tmp_path / "demo"), *flags]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("balora: error: ") and message in lines[0], lines
    assert not no_training


def test_demo_layers_its_flags_over_its_config(no_training, tmp_path, capsys):
    config = tmp_path / "configs" / "mine.toml"
    config.parent.mkdir()
    config.write_text('steps = 9\nmethod = "ilora"\noutput_dir = "out"\n')
    assert cli_main(["demo", "--config", str(config)]) == 2
    assert cli_main(["demo", "--config", str(config), "--steps", "7", "--method", "lora",
                     "--output-dir", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err.count("training reached") == 2
    from_file, from_flags = no_training
    assert (from_file.steps, from_file.method) == (9, "ilora")
    assert Path(from_file.output_dir).resolve() == (tmp_path / "configs" / "out").resolve()
    assert (from_flags.steps, from_flags.method, from_flags.output_dir) == (7, "lora", str(tmp_path / "demo"))
    # without a data_dir: the shipped concept, its token and initialiser
    assert from_file.data_dir == str(paths.DEMO_CONCEPT) and from_file.token == ["<zorb>"]
    assert from_file.init_word == "heart"


def test_a_list_flag_given_twice_adds_up_and_given_empty_clears():
    import argparse

    from balora_diffusion.config import add_config_arguments, flag_values
    from balora_diffusion.train_config import TrainConfig

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    assert flag_values(TrainConfig, parser.parse_args(["--grid-seeds", "1", "--grid-seeds", "2", "3"]))["grid_seeds"] == [1, 2, 3]
    with pytest.raises(UserError, match="fusion"):
        flag_values(TrainConfig, parser.parse_args(["--fusion", "1", "--fusion"]))
