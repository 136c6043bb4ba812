"""balora_diffusion.runs: listing run folders, their summaries, and names that must not escape."""
import fcntl
import json
import math
import os

import pytest

from balora_diffusion.errors import UserError
from balora_diffusion.runfolder import LOCK
from balora_diffusion.runs import (COLUMNS, adapter_files, inside, list_runs, new_run_folder, read_metrics, read_run,
                                   resolve_run)

CONFIG = {"method": "ilora", "lr_unet": 0.002, "lr_text": 1e-4, "lr_embedding": 0.01, "rank": 8, "seed": 3,
          "steps": 40, "token": ["<zorb>"], "grid_prompts": [], "caption_template": "a {token} on grass"}


def make_run(folder, finished=True, metrics=((10, "loss", 0.5), (20, "heldout_loss", 0.25)), **config):
    folder.mkdir(parents=True)
    cfg = {**CONFIG, **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "name": n, "value": v}) + "\n"
                                                  for s, n, v in metrics))
    if finished:
        (folder / "run.json").write_text(json.dumps({"config": cfg, "method": cfg["method"],
                                                     "final": {"heldout_loss": 0.125}}))
    return folder


def test_runs_are_found_at_any_depth_up_to_three_and_summarised(tmp_path):
    make_run(tmp_path / "a")
    make_run(tmp_path / "sweep" / "lr1", finished=False)
    make_run(tmp_path / "x" / "y" / "z")
    make_run(tmp_path / "x" / "y" / "w" / "too-deep")
    make_run(tmp_path / ".app-cache" / "hidden")
    (tmp_path / "notes").mkdir()
    runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["a", "sweep/lr1", "x/y/z"]
    a, lr1 = runs[0], runs[1]
    assert (a.method, a.lr_unet, a.lr_text, a.rank, a.seed, a.steps, a.step) == ("ilora", 0.002, 1e-4, 8, 3, 40, 20)
    assert a.state == "finished" and a.heldout_loss == 0.125  # run.json's final value
    assert lr1.state == "stopped" and lr1.heldout_loss == 0.25  # the last logged one
    assert a.prompt == "a <zorb> on grass"
    assert a.row()[0] == "a" and a.row()[6] == "20/40"


def test_a_run_whose_training_holds_the_lock_is_training(tmp_path):
    run = make_run(tmp_path / "r", finished=False)
    with (run / LOCK).open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert read_run(tmp_path, "r").state == "training"
    assert read_run(tmp_path, "r").state == "stopped"


def test_half_written_files_do_not_break_the_listing(tmp_path):
    run = make_run(tmp_path / "r", finished=False)
    (run / "config.json").write_text('{"method": "lo')
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "name": "loss", "val')
    info = read_run(tmp_path, "r")
    assert info.method == "?" and math.isnan(info.lr_unet) and info.step == 20
    assert read_metrics(run) == {"loss": [(10, 0.5)], "heldout_loss": [(20, 0.25)]}


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../outside", ".app-cache/hidden", "", "a//b",
                                  "a\\..\\b", "a/b/c/d", "nul\0l"])
def test_names_that_leave_the_runs_folder_are_refused(tmp_path, name):
    make_run(tmp_path / "runs" / "a")
    make_run(tmp_path / "outside")
    make_run(tmp_path / "runs" / ".app-cache" / "hidden")
    with pytest.raises(UserError, match="not a run name"):
        resolve_run(tmp_path / "runs", name)


def test_symlinks_out_of_the_runs_folder_are_neither_listed_nor_resolved(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "a")
    outside = make_run(tmp_path / "secret")
    os.symlink(outside, runs / "link")
    os.symlink(runs / "a", runs / "alias")  # a link that stays inside is an ordinary name for a run
    assert [r.name for r in list_runs(runs)] == ["a", "alias"]
    with pytest.raises(UserError, match="outside"):
        resolve_run(runs, "link")
    assert resolve_run(runs, "alias") == (runs / "a").resolve()
    with pytest.raises(UserError, match="no run 'missing'"):
        resolve_run(runs, "missing")


def test_adapter_files_are_the_runs_own_safetensors_and_never_a_link_out(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "adapter").mkdir()
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors", "notes.txt"):
        (run / "adapter" / name).write_bytes(b"x")
    (run / "kohya").mkdir()
    (run / "kohya" / "r.safetensors").write_bytes(b"x")
    (run / "exported.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", run / "adapter" / "stolen.safetensors")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state.safetensors").write_bytes(b"x")
    assert [p.relative_to(run.resolve()).as_posix() for p in adapter_files(run)] == [
        "adapter/embeddings.safetensors", "adapter/pytorch_lora_weights.safetensors", "kohya/r.safetensors",
        "exported.safetensors"]


def test_a_new_run_folder_must_be_new_and_inside(tmp_path):
    make_run(tmp_path / "runs" / "a")
    assert new_run_folder(tmp_path / "runs", "b") == tmp_path / "runs" / "b"
    with pytest.raises(UserError, match="exists"):
        new_run_folder(tmp_path / "runs", "a")
    os.symlink(tmp_path, tmp_path / "runs" / "up")
    with pytest.raises(UserError, match="outside"):
        new_run_folder(tmp_path / "runs", "up/b")
    with pytest.raises(UserError, match="not a run name"):
        new_run_folder(tmp_path / "runs", "../b")
    with pytest.raises(UserError, match="outside"):
        inside(tmp_path / "runs", tmp_path)


def test_files_of_a_run_that_link_out_of_it_are_never_read(tmp_path):
    runs = tmp_path / "runs"
    secret = make_run(tmp_path / "secret", method="stolen", grid_prompts=["a secret prompt"],
                      metrics=((99, "loss", 7.0),))
    linked = make_run(runs / "linked")
    for name in ("run.json", "metrics.jsonl"):
        (linked / name).unlink()
        os.symlink(secret / name, linked / name)
    only_marker = runs / "only-marker"
    only_marker.mkdir()
    os.symlink(secret / "run.json", only_marker / "run.json")
    listed = list_runs(runs)
    assert [r.name for r in listed] == ["linked"]  # its own config.json makes it a run; a linked marker does not
    assert "stolen" not in repr(listed) and "secret" not in repr(listed)
    assert (listed[0].method, listed[0].step, listed[0].state) == ("ilora", 0, "stopped")
    assert read_metrics(linked) == {}


def test_scores_come_from_eval_json_else_from_the_trainings_own_scoring_and_are_plotted(tmp_path):
    pytest.importorskip("gradio", reason="the app's extra is not installed: pip install -e '.[app]'")
    from balora_diffusion.app.app import App

    root = tmp_path / "runs"
    logged = [(10, "loss", 0.5), (10, "eval/clip-t", 0.2), (20, "eval/clip-t", 0.3), (20, "eval/clip-i", 0.6)]
    make_run(root / "a", metrics=logged)
    make_run(root / "b")
    make_run(root / "c")
    evaluation = root / "evals" / "b"
    evaluation.mkdir(parents=True)
    results = [{"source": str(root / "b" / "adapter"), "step": None, "fusion": w, "clip-t": 0.1 * w, "clip-i": None}
               for w in (0.7, 1.0)] + [{"source": str(root / "b" / "checkpoints" / "step-10"), "step": 10,
                                         "fusion": 1.0, "clip-t": 0.9}]
    (evaluation / "eval.json").write_text(json.dumps({"results": results}))
    app = App(root, device="cpu")
    headers, rows = app.runs_table()
    assert headers == [*COLUMNS, "clip-t", "clip-i"]
    assert {row[0]: row[len(COLUMNS):] for row in rows} == {"a": [0.3, 0.6], "b": [0.1, None], "c": [None, None]}
    assert {r["name"]: r["scores"] for r in app.list_runs()} == {"a": {"clip-t": 0.3, "clip-i": 0.6},
                                                                  "b": {"clip-t": 0.1}, "c": {}}
    titles = [ax.get_title() for ax in app.curves(["a", "b"]).axes if ax.axison]
    assert titles == ["training loss (moving average over 10 steps)", "held-out loss",
                      "score clip-i (w = 1, higher is better)", "score clip-t (w = 1, higher is better)"]
