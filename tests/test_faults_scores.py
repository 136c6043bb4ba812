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
    lines = result.stderr.splitlines()
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


# --- balora results --sweep with a hostile summary.json

def _summary() -> dict:
    cell = {"name": "{m}-lrx1-s0", "labels": {"method": "{m}", "lr": "x1", "lr_unet": 1e-3, "lr_text": 1e-4, "seed": 0},
            "status": "done", "error": None, "fidelity": {"1": 0.5}, "clip-t": {"1": 0.25},
            "final_heldout_loss": 0.05, "heldout_loss": [[0, 0.4], [2, 0.05]], "steps": 2, "training_seconds": 1.0}
    cells = [json.loads(json.dumps(cell).replace("{m}", m)) for m in ("lora", "balora")]
    return {"protocol": {"sweep": {"methods": ["lora", "balora"], "lrs": ["x1"], "seeds": [0]}, "scoring": {}},
            "cells": cells}


def _hostile(name: str):
    s = _summary()
    if name == "not json":
        return '{"cells": ['
    if name == "a list":
        return [1, 2]
    if name == "deeply nested":
        return "[" * 100000 + "]" * 100000
    if name == "NaN":
        return json.dumps(s).replace("0.05,", "NaN,")
    if name == "no protocol":
        del s["protocol"]
    elif name == "protocol a list":
        s["protocol"] = [1]
    elif name == "methods a number":
        s["protocol"]["sweep"]["methods"] = 5
    elif name == "cell without status":
        del s["cells"][1]["status"]
    elif name == "lr a word":
        s["cells"][1]["labels"]["lr_unet"] = "fast"
    elif name == "scores a list":
        s["cells"][1]["fidelity"] = [1, 2]
    elif name == "curve a word":
        s["cells"][1]["heldout_loss"] = "oops"
    elif name == "huge score":
        s["cells"][0]["clip-t"] = {"1": -1e308}
    elif name == "huge steps":
        s["cells"][0]["steps"] = 10 ** 400
    return json.dumps(s)


HOSTILE = ["not json", "a list", "deeply nested", "NaN", "no protocol", "protocol a list", "methods a number",
           "cell without status", "lr a word", "scores a list", "curve a word", "huge score",
           "huge steps"]


@pytest.mark.parametrize("name", HOSTILE)
def test_results_refuses_a_hostile_summary_in_one_line(name, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    text = _hostile(name)
    (sweep / "summary.json").write_text(text if isinstance(text, str) else json.dumps(text))
    page = tmp_path / "page.md"
    result = balora("results", "--sweep", sweep, "--out", page)
    assert_one_line_error(result, f"{sweep}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def test_results_writes_the_page_of_a_sound_summary(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "summary.json").write_text(json.dumps(_summary()))
    result = balora("results", "--sweep", sweep, "--out", tmp_path / "page.md")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| balora |" in (tmp_path / "page.md").read_text()


def test_results_writes_a_huge_loss_readably(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    summary = _summary()
    summary["cells"][1]["final_heldout_loss"] = 1e308
    (sweep / "summary.json").write_text(json.dumps(summary))
    result = balora("results", "--sweep", sweep, "--out", tmp_path / "page.md")
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "page.md").read_text()
    assert "1e+308" in page and "0" * 30 not in page


def test_results_refuses_a_page_path_that_is_a_folder(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "summary.json").write_text(json.dumps(_summary()))
    (sweep / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    folder = tmp_path / "pages"
    folder.mkdir()
    result = balora("results", "--sweep", sweep, "--out", folder, "--overwrite", "true")
    assert_one_line_error(result, f"--out {folder}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pages", "sweep"] and not any(folder.iterdir())


# --- balora sweep --sort-by a score the sweep does not compute

@pytest.mark.parametrize("extra, fragment", [
    (["--metrics", "clip-t", "--sort-by", "dino"], "--sort-by dino"),
    (["--sort-by", "fidelity"], "--sort-by fidelity"),
    (["--score", "false", "--sort-by", "clip-t"], "--sort-by clip-t"),
])
def test_sweep_refuses_to_sort_by_a_score_it_does_not_compute(extra, fragment, random_sd_dir, tiny_clip_dir, tmp_path):
    plain = tmp_path / "plain"  # the demo concept's images without its concept.toml
    plain.mkdir()
    for image in paths.DEMO_CONCEPT.glob("*.png"):
        (plain / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "sweep"
    result = balora("sweep", "--methods", "lora", "--clip", tiny_clip_dir, "--out", out, "--set", f"data_dir={plain}",
                    f"base_model={random_sd_dir}", "token=<zorb>", "init_word=heart", "steps=1", "sample_steps=1",
                    *extra)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_best_by_a_score_that_no_step_got_ends_in_a_line_not_a_traceback(random_sd_dir, tiny_clip_dir, tmp_path):
    concept = tmp_path / "concept"  # the demo concept whose one evaluation prompt names nothing adherence checks
    concept.mkdir()
    for image in paths.DEMO_CONCEPT.glob("*.png"):
        (concept / image.name).write_bytes(image.read_bytes())
    toml = (paths.DEMO_CONCEPT / "concept.toml").read_text()
    start, end = toml.index("eval_prompts"), toml.index("]", toml.index("eval_prompts")) + 1
    (concept / "concept.toml").write_text(toml[:start] + 'eval_prompts = ["a <zorb>"]' + toml[end:])
    out = tmp_path / "run"
    args = train_args(random_sd_dir, tiny_clip_dir, out, 1, "--eval-metrics", "adherence", "--best-by", "adherence")
    args[args.index("--data-dir") + 1] = concept
    result = balora(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best by adherence: no scored step" in result.stdout
    assert not (out / "best").exists()


def test_the_sweep_grid_names_the_prompt_its_cells_drew_on_a_plain_concept(random_sd_dir, tiny_clip_dir, tmp_path):
    from balora_diffusion.experiments.sweep import SweepConfig, expand, sample_prompt

    plain = tmp_path / "plain"  # the demo concept's images and captions without its concept.toml
    plain.mkdir()
    for image in [*paths.DEMO_CONCEPT.glob("*.png"), *paths.DEMO_CONCEPT.glob("*.txt")]:
        (plain / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "sweep"
    settings = ["--methods", "lora", "--clip", str(tiny_clip_dir), "--out", str(out), "--set", f"data_dir={plain}",
                f"base_model={random_sd_dir}", "token=<zorb>", "init_word=heart", "steps=1", "sample_steps=1"]
    result = balora("sweep", *settings)
    assert result.returncode == 0, result.stderr[-2000:]
    scoring = json.loads((out / "summary.json").read_text())["protocol"]["scoring"]
    cells = expand(SweepConfig(methods=["lora"], out=str(out), set=settings[settings.index("--set") + 1:]))
    first_caption = (plain / "00.txt").read_text().strip()
    assert sample_prompt(scoring, cells) == repr(f"{first_caption} in the snow")


def test_a_loss_that_a_huge_prior_weight_makes_infinite_names_the_weight(random_sd_dir, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    result = balora(*train_args(random_sd_dir, tiny_clip_dir, out, 1, "--prior-prompt", "a heart", "--prior-weight",
                                "1e308"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("balora: error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "--prior-weight 1e+308" in errors[0], errors  # after the training's bar


def test_eval_best_by_overwrite_replaces_a_best_link_never_what_it_points_to(scored_run, tiny_clip_dir, tmp_path):
    import shutil

    run = _copy_run(scored_run, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    shutil.rmtree(run / "best")
    (run / "best").symlink_to(outside, target_is_directory=True)
    result = balora("eval", run, "--clip", tiny_clip_dir, "--metrics", "clip-t", "--seeds", "1", "--steps", "1",
                    "--best-by", "clip-t", "--out", tmp_path / "eval", "--overwrite", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run / "best").is_symlink() and json.loads((run / "best" / "best.json").read_text())["by"] == "clip-t"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_metric_named_twice_is_refused_in_one_line(command, random_sd_dir, tiny_clip_dir, tmp_path):
    out = tmp_path / "out"
    if command == "train":
        args = train_args(random_sd_dir, tiny_clip_dir, out, 1, "--eval-metrics", "clip-t", "clip-i", "clip-t")
    else:
        args = ["sweep", "--methods", "lora", "--metrics", "clip-i", "clip-i", "--out", out, "--set",
                f"data_dir={paths.DEMO_CONCEPT}", f"base_model={random_sd_dir}", "steps=1"]
    assert_one_line_error(balora(*args), "clip-")
    assert not out.exists()
