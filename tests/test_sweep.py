"""`balora sweep`: the grid of cells, one `balora train` run folder each, resumable, local or submitit."""
import argparse
import json
import shutil
from pathlib import Path

import pytest

from balora_diffusion import checkpoint as ckpt
from balora_diffusion import paths
from balora_diffusion.experiments import cell as cell_module
from balora_diffusion.experiments.sweep import SweepConfig, expand, parse_lr, parse_set
from balora_diffusion.checkpoint_scoring import SCORING_SCHEDULER
from balora_diffusion.cli import main
from balora_diffusion.commands.sweep import add_arguments
from balora_diffusion.config import config_from_args
from balora_diffusion.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# quick training options, as --set entries
TRAIN = ["token=<zorb>", "init_word=heart", "steps=2", "eval_every=1", "checkpoint_every=1", "sample_steps=1",
         "grid_seeds=1", "fusion=1", "heldout_size=2", "batch_size=2", "cpu_threads=1"]


def sweep_args(out, model, *extra, methods=("lora", "balora"), lrs=("1", "3")):
    return ["sweep", "--set", f"data_dir={paths.DEMO_CONCEPT}", f"base_model={model}", *TRAIN,
            "--methods", *methods, "--lrs", *lrs, "--unseen-contexts", "1", "--out", str(out), *extra]


def test_cells_are_the_cross_product_with_rates_from_the_config(tmp_path):
    config = tmp_path / "base.toml"
    config.write_text("lr_unet = 2e-3\nlr_text = 1e-4\n")
    cells = expand(SweepConfig(config=str(config), methods=["lora", "ilora"], lrs=["0.5", "1e-3:2e-5"], seeds=[0, 1],
                               set=["ilora_lambda=1,10", "steps=7", f"data_dir={paths.DEMO_CONCEPT}"],
                               out=str(tmp_path / "s")))
    assert len(cells) == 2 * 2 * 2 * 2
    assert len({c.name for c in cells}) == len(cells)
    first = cells[0]
    assert first.values["lr_unet"] == pytest.approx(1e-3) and first.values["lr_text"] == pytest.approx(5e-5)
    assert all(c.values["steps"] == 7 for c in cells)
    pairs = [c for c in cells if c.labels["lr"] == "0.001:2e-05"]
    assert len(pairs) == 8 and all(c.values["lr_unet"] == 1e-3 and c.values["lr_text"] == 2e-5 for c in pairs)
    assert {c.values["ilora_lambda"] for c in cells} == {1.0, 10.0}
    assert {(c.labels["method"], c.labels["ilora_lambda"], c.labels["seed"]) for c in cells} == {
        (m, lam, s) for m in ("lora", "ilora") for lam in ("1", "10") for s in (0, 1)}
    assert all(c.values["output_dir"] == str(tmp_path / "s" / c.name) for c in cells)


def test_a_cell_whose_options_are_wrong_fails_before_any_training(tmp_path):
    with pytest.raises(UserError, match="steps"):
        expand(SweepConfig(methods=["lora"], set=[f"data_dir={paths.DEMO_CONCEPT}", "steps=3,0"], out=str(tmp_path)))


@pytest.mark.parametrize("text, fragment", [("stepz=3", "training option"), ("steps", "KEY=V1,V2"),
                                            ("method=lora", "--methods"), ("seed=1", "--seeds"),
                                            ("steps=ten", "--set steps")])
def test_bad_set_entries_are_one_line_errors(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_set(text)


def test_list_options_take_space_separated_elements():
    assert parse_set("unet_targets=to_q to_k,to_v") == ("unet_targets", [["to_q", "to_k"], ["to_v"]])


@pytest.mark.parametrize("text", ["0", "-1", "a", "1:2:3", "1e-4:", "nan"])
def test_bad_learning_rates_are_refused(text):
    with pytest.raises(ValueError):
        parse_lr(text)
    with pytest.raises(UserError, match="lrs"):
        SweepConfig(lrs=[text])


def test_a_sweep_toml_mirrors_the_flags(tmp_path):
    sweep = tmp_path / "grid.toml"
    sweep.write_text('config = "demo"\nmethods = ["lora", "hilora"]\nlrs = ["1", "2"]\nseeds = [3]\n'
                     'out = "cells"\nworkers = 2\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(SweepConfig, parser.parse_args(["--sweep", str(sweep), "--seeds", "4"]), "--sweep")
    assert cfg.config == "demo"  # a shipped config's name stays a name
    assert cfg.methods == ["lora", "hilora"] and cfg.seeds == [4] and cfg.workers == 2
    assert cfg.out == str(tmp_path / "cells")  # relative to the sweep file


@pytest.fixture(scope="module")
def swept(random_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    assert main(sweep_args(out, random_sd_dir)) == 0
    return out


def test_a_2x2_sweep_writes_a_run_folder_per_cell_and_a_summary(swept):
    summary = json.loads((swept / "summary.json").read_text())
    cells = summary["cells"]
    assert [c["name"] for c in cells] == ["lora-lrx1-s0", "lora-lrx3-s0", "balora-lrx1-s0", "balora-lrx3-s0"]
    for c in cells:
        folder = swept / c["name"]
        for name in ("run.json", "config.json", "metrics.jsonl", "adapter/pytorch_lora_weights.safetensors",
                     "cell.json", "sample.png", "scores.png"):
            assert (folder / name).is_file(), (c["name"], name)
        config = json.loads((folder / "config.json").read_text())
        assert config["method"] == c["labels"]["method"]
        factor = float(c["labels"]["lr"][1:])
        assert config["lr_unet"] == pytest.approx(factor * 1e-4) and config["lr_text"] == pytest.approx(factor * 1e-5)
        assert c["status"] == "done" and c["final_heldout_loss"] == pytest.approx(c["heldout_loss"][-1][1])
        assert [s for s, _ in c["heldout_loss"]] == [0, 1, 2]
        for w in ("0.7", "1"):
            assert 0 <= c["fidelity"][w] <= 1 and 0 <= c["adherence"][w]["all"] <= 1
        assert c["wall_seconds"] > 0 and c["cpu_seconds"] > 0
    table = (swept / "summary.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 4
    assert (swept / "grid.png").is_file()
    assert "train:" in (swept / "lora-lrx1-s0" / "cell.log").read_text()  # the training's own bar went there


def test_rerunning_keeps_finished_cells_and_resumes_interrupted_ones(swept, random_sd_dir, monkeypatch):
    resumed, restarted = swept / "lora-lrx3-s0", swept / "balora-lrx1-s0"
    kept = swept / "lora-lrx1-s0"
    before = (kept / "run.json").stat().st_mtime_ns
    for folder in (resumed, restarted):  # killed after step 1's checkpoint, and before any checkpoint
        (folder / "cell.json").unlink()
        (folder / "run.json").unlink()
    shutil.rmtree(ckpt.list_checkpoints(resumed / "checkpoints")[-1])  # step 2's
    shutil.rmtree(restarted / "checkpoints")
    trained = []
    real = cell_module._start_mode
    monkeypatch.setattr(cell_module, "_start_mode", lambda out: trained.append(out.name) or real(out))
    assert main(sweep_args(swept, random_sd_dir)) == 0
    assert sorted(trained) == sorted([resumed.name, restarted.name])
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] == 1
    assert json.loads((restarted / "run.json").read_text())["resumed_from"] is None
    assert (kept / "run.json").stat().st_mtime_ns == before
    assert len(json.loads((swept / "summary.json").read_text())["cells"]) == 4


def test_two_workers_and_the_submitit_local_executor_run_the_same_cells(random_sd_dir, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "slurm"
    assert main(sweep_args(out, random_sd_dir, "--launcher", "submitit", "--cluster", "local", "--workers", "2",
                           "--score", "false", "--seeds", "0", "1", methods=["lora"], lrs=["1"])) == 0
    cells = json.loads((out / "summary.json").read_text())["cells"]
    assert [c["name"] for c in cells] == ["lora-lrx1-s0", "lora-lrx1-s1"]
    assert all(c["status"] == "done" and c["fidelity"] is None for c in cells)
    assert any((out / ".submitit").iterdir())  # the jobs went through submitit


@pytest.mark.parametrize("name", ["zorb-lr", "mixofshow-lr"])
def test_shipped_sweep_files_expand(name):
    from balora_diffusion.config import read_toml

    sweep = SweepConfig(**read_toml(SweepConfig, REPO / "training" / "sweeps" / f"{name}.toml"))
    sweep.set = sweep.set or [f"data_dir={paths.DEMO_CONCEPT}"]
    cells = expand(sweep)
    assert len(cells) == len(sweep.methods) * len(sweep.lrs) * len(sweep.seeds)


def test_a_killed_worker_ends_the_sweep_with_one_error_and_no_leaked_semaphores(random_sd_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "killed"
    args = sweep_args(out, random_sd_dir, "--workers", "2", "--score", "false", methods=["lora", "balora"], lrs=["1"])
    args[args.index("steps=2")] = "steps=1000000"  # the cells run until a worker is killed
    sweep = subprocess.Popen([sys.executable, "-m", "balora_diffusion.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        # both cells training: each has logged steps (however long a busy machine takes to get there)
        while not all(len(_lines(out / name / "metrics.jsonl")) >= 3 for name in ("lora-lrx1-s0", "balora-lrx1-s0")):
            assert sweep.poll() is None, sweep.stderr.read()
            time.sleep(0.2)
        workers = [p for p in psutil.Process(sweep.pid).children()
                   if any("multiprocessing.spawn" in part for part in p.cmdline())]
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        stderr = sweep.communicate(timeout=600)[1]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 2
    assert "leaked" not in stderr and "Traceback" not in stderr and "torchvision" not in stderr, stderr
    assert stderr.splitlines()[-1].startswith("balora: error: cell ")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def plain_concept(folder: Path) -> Path:
    """The zorb images and captions without concept.toml: a concept of the user's own, not the world's."""
    folder.mkdir(parents=True)
    for file in paths.DEMO_CONCEPT.iterdir():
        if file.suffix in (".png", ".txt"):
            shutil.copyfile(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def clip_swept(random_sd_dir, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-sweep")
    out = root / "grid"
    assert main(sweep_args(out, random_sd_dir, "--set", f"data_dir={plain_concept(root / 'plain')}", "--clip",
                           str(tiny_clip_dir), "--sort-by", "clip-i")) == 0
    return out


def test_a_concept_without_concept_toml_is_scored_with_clip_as_balora_eval_scores_it(clip_swept, tiny_clip_dir,
                                                                                   tmp_path):
    summary = json.loads((clip_swept / "summary.json").read_text())
    assert summary["protocol"]["scoring"]["metrics"] == {"names": ["clip-t", "clip-i"], "clip": str(tiny_clip_dir)}
    cells = summary["cells"]
    for c in cells:
        assert c["fidelity"] is None and set(c["clip-t"]) == set(c["clip-i"]) == {"0.7", "1"}
        assert (clip_swept / c["name"] / "sample.png").is_file()
    assert (clip_swept / "grid.png").is_file()
    # the same adapter scored by balora eval with the sweep's sampling (and scored images' sampler): the same numbers
    cell = cells[1]
    out = tmp_path / "eval"
    assert main(["eval", str(clip_swept / cell["name"]), "--clip", str(tiny_clip_dir), "--metrics", "clip-t", "clip-i",
                 "--seeds", "1", "--steps", "1", "--guidance", "5", "--scheduler", SCORING_SCHEDULER,
                 "--fusion", "0.7", "1", "--out", str(out)]) == 0
    final = [r for r in json.loads((out / "eval.json").read_text())["results"] if r["label"].endswith(" final")]
    for r in final:
        for metric in ("clip-t", "clip-i"):
            assert cell[metric][f"{r['fusion']:g}"] == pytest.approx(r[metric], abs=1e-6)


def test_sort_by_orders_the_summary_table_best_first(clip_swept):
    lines = (clip_swept / "summary.md").read_text().splitlines()
    assert lines[0] == "Rows by clip-i (best first)."
    head = [h.strip() for h in lines[2].strip("|").split("|")]
    rows = [[v.strip() for v in line.strip("|").split("|")] for line in lines[4:]]
    values = [float(row[head.index("clip-i w=1")]) for row in rows]
    assert values == sorted(values, reverse=True)
    cells = json.loads((clip_swept / "summary.json").read_text())["cells"]
    by_name = {(c["labels"]["method"], c["labels"]["lr"]): c["clip-i"]["1"] for c in cells}
    assert [by_name[(row[0], row[1])] for row in rows] == sorted(by_name.values(), reverse=True)


def test_sort_records_puts_lowest_loss_first_and_unscored_cells_last():
    from balora_diffusion.experiments.sweep import sort_records

    records = [{"name": "a", "final_heldout_loss": 0.3, "clip-t": {"1": 0.1}},
               {"name": "b", "final_heldout_loss": None, "clip-t": None},
               {"name": "c", "final_heldout_loss": 0.1, "clip-t": {"1": 0.2}}]
    assert [r["name"] for r in sort_records(records, "heldout-loss", [0.7, 1.0])] == ["c", "a", "b"]
    assert [r["name"] for r in sort_records(records, "clip-t", [0.7, 1.0])] == ["c", "a", "b"]


@pytest.mark.parametrize("extra, message", [(["--clip", "{tmp}/no-clip"], "--clip"),
                                            (["--metrics", "fidelity"], "metrics must be one of"),
                                            (["--sort-by", "loss"], "sort-by must be one of")])
def test_bad_metric_options_fail_in_one_line_before_any_cell_trains(extra, message, random_sd_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert main(sweep_args(out, random_sd_dir, "--set", f"data_dir={plain_concept(tmp_path / 'plain')}", *extra)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("balora: error: ") and message in errors[0], errors
    assert not out.exists() or not any(out.iterdir())


def test_without_a_clip_model_at_hand_a_plain_concept_is_left_unscored_with_a_warning(tmp_path, monkeypatch, capsys):
    from balora_diffusion import checkpoint_scoring
    from balora_diffusion.experiments.sweep import scoring_settings

    monkeypatch.setattr(checkpoint_scoring, "eval_default", lambda name: str(tmp_path / f"no-{name}"))
    sweep = SweepConfig(methods=["lora"], set=[f"data_dir={plain_concept(tmp_path / 'plain')}"], out=str(tmp_path / "s"))
    assert scoring_settings(sweep, expand(sweep)) is None
    assert "balora: warning: no CLIP model at hand" in capsys.readouterr().err
    named = SweepConfig(**{**sweep.__dict__, "clip": str(tmp_path / "no-clip")})
    with pytest.raises(UserError, match="--clip"):
        scoring_settings(named, expand(named))
