"""Bad inputs to the scoring features (train --eval-metrics / --best-by, balora results --sweep, balora eval of
a checkpoint) through the real `balora` command, one subprocess each: exit 2, one `balora: error:` line, no
traceback and nothing half-written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balora_diffusion import paths

TRAIN = ["--token", "<zorb>", "--init-word", "heart", "--caption-template", "a {token}", "--flip", "false",
         "--batch-size", "2", "--eval-every", "1", "--checkpoint-every", "1", "--heldout-size", "2",
         "--grid-seeds", "1", "--fusion", "1", "--sample-steps", "1", "--cpu-threads", "1",
         "--eval-metrics", "clip-t", "--eval-sample-steps", "1", "--best-by", "clip-t"]


def balora(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> str:
    # transformers draws a progress bar as it loads the CLIP model (before the check that fails)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("balora: error: "), lines
    assert fragment in lines[0], lines[0]
    return lines[0]


def train_args(model: Path, clip: Path, out: Path, steps: int, *extra) -> list:
    return ["train", "--data-dir", paths.DEMO_CONCEPT, "--base-model", model, "--eval-clip", clip,
            "--output-dir", out, "--steps", steps, *TRAIN, *extra]


@pytest.fixture(scope="module")
def scored_run(random_sd_dir, tiny_clip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "run"
    result = balora(*train_args(random_sd_dir, tiny_clip_dir, out, 2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "best" / "best.json").read_text())["by"] == "clip-t"
    return out


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, symlinks=True)
    return to


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))
            if not p.is_symlink()}


# --- balora eval of one checkpoint of a run

def test_eval_of_a_checkpoint_folder_scores_that_checkpoint(scored_run, tiny_clip_dir, tmp_path):
    checkpoint = scored_run / "checkpoints" / "step-0000001"
    result = balora("eval", checkpoint, "--clip", tiny_clip_dir, "--metrics", "clip-t", "--seeds", "1", "--steps", "1",
                    "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert [r["step"] for r in results] == [1]
    assert results[0]["clip-t"] is not None


def test_a_checkpoint_is_no_run_of_the_runs_listing(scored_run):
    from balora_diffusion.errors import UserError
    from balora_diffusion.runs import list_runs, resolve_run

    assert [r.name for r in list_runs(scored_run.parent)] == ["run"]
    with pytest.raises(UserError, match="no run"):
        resolve_run(scored_run.parent, "run/checkpoints/step-0000001")


# --- train: numbers that would only fail once training has run

@pytest.mark.parametrize("option", ["--eval-sample-steps", "--sample-steps"])
def test_more_sampling_steps_than_the_model_has_timesteps_fail_before_training(option, random_sd_dir, tiny_clip_dir,
                                                                               tmp_path):
    out = tmp_path / "run"
    result = balora(*train_args(random_sd_dir, tiny_clip_dir, out, 1, option, "99999999999999999999"))
    assert_one_line_error(result, f"{option} 99999999999999999999")
    assert not out.exists()


# --- train --resume with RUN/best not the folder the run writes

@pytest.mark.parametrize("kind", ["file", "link out"])
def test_resume_refuses_a_best_that_is_a_file_or_a_link(kind, scored_run, random_sd_dir, tiny_clip_dir, tmp_path):
    run = _copy_run(scored_run, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    import shutil

    shutil.rmtree(run / "best")
    if kind == "file":
        (run / "best").write_text("not a folder")
    else:
        (run / "best").symlink_to(outside, target_is_directory=True)
    before = _tree(run)
    result = balora(*train_args(random_sd_dir, tiny_clip_dir, run, 3, "--resume", "latest"))
    assert_one_line_error(result, f"{run / 'best'}")
    assert _tree(run) == before
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
