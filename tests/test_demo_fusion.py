"""`balora demo --fusion` through the real command: both shipped concepts trained, fused by gradient
fusion and drawn; a rerun reuses the finished trainings, a longer one continues them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from balora_diffusion import paths
from balora_diffusion.formats.read import read_adapter

STEPS = 2


def _demo(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    config = tmp_path / "small.toml"
    # the demo config with few sampling steps, so that the drawing and the recording stay short
    config.write_text(f'extends = "{paths.config_file("demo")}"\nsample_steps = 2\ncheckpoint_every = 1\n'
                      'eval_every = 100\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "demo", "--fusion", "--config", str(config),
                           "--seeds", "1", "--output-dir", str(tmp_path / "demo"), *flags],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-fusion")
    done = _demo(tmp, "--steps", str(STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, done


def test_trains_both_concepts_fuses_them_and_draws_both_tokens(demo):
    tmp, done = demo
    out = tmp / "demo"
    record = json.loads((out / "demo-fusion.json").read_text())
    assert record["trainings"] == {"<zorb>": "trained", "<quax>": "trained"}
    for name, token in (("zorb", "<zorb>"), ("quax", "<quax>")):
        run = json.loads((out / name / "run.json").read_text())
        assert run["steps"] == STEPS and run["config"]["token"] == [token]
        assert Path(run["config"]["data_dir"]).name == name
    fused = read_adapter(out / "fused")
    assert fused.tokens == ["<zorb>", "<quax>"]
    assert json.loads((out / "fused" / "fuse.json").read_text())["method"] == "gradient"
    # every adapter (each own one, the fused one) scored on both concepts' prompts
    assert set(record["fidelity_mean"]) == {"<zorb> alone", "<quax> alone", "fused"}
    assert all(set(scores) == {"<zorb>", "<quax>"} for scores in record["fidelity_mean"].values())
    # three adapters x two concepts x two prompts: twelve labelled rows, one seed column
    with Image.open(out / "demo-fusion.png") as grid:
        assert grid.height > 12 * 64 and grid.width > 64
    assert "in the fused one" in done.stdout and "demo grid:" in done.stdout


def test_a_rerun_reuses_the_trainings_and_more_steps_continue_them(demo):
    tmp, _ = demo
    out = tmp / "demo"
    before = (out / "zorb" / "run.json").stat().st_mtime_ns
    again = _demo(tmp, "--steps", str(STEPS))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "demo-fusion.json").read_text())["trainings"] == {"<zorb>": "reused", "<quax>": "reused"}
    assert (out / "zorb" / "run.json").stat().st_mtime_ns == before
    longer = _demo(tmp, "--steps", str(STEPS + 1))
    assert longer.returncode == 0, longer.stderr[-3000:]
    record = json.loads((out / "demo-fusion.json").read_text())
    assert record["trainings"] == {"<zorb>": "continued", "<quax>": "continued"}
    assert json.loads((out / "quax" / "run.json").read_text())["resumed_from"] == STEPS


def test_a_config_with_its_own_data_is_one_error_line(tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text(f'extends = "{paths.config_file("demo")}"\ndata_dir = "{paths.DEMO_CONCEPT}"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "demo", "--fusion", "--config", str(config),
                           "--output-dir", str(tmp_path / "demo")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "balora: error: --fusion trains the two shipped concepts: give a config without a data_dir"]
    assert not (tmp_path / "demo").exists()
