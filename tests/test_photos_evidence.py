"""`balora bench photos`: the quick run end to end on a random model, its page, and the verdict rule."""
import json

import pytest

from balora_diffusion.bench import photos
from balora_diffusion.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory, random_sd_dir):
    out = tmp_path_factory.mktemp("photos")
    page = out.parent / f"{out.name}-page" / "photos.md"
    assert main(["bench", "photos", "--quick", "--base-model", str(random_sd_dir), "--out", str(out),
                 "--page", str(page)]) == 0
    return out, page


def test_quick_run_writes_every_arm_question_and_the_page(quick):
    out, page = quick
    data = json.loads((out / "photos.json").read_text())
    assert {(r["arm"], r["seed"]) for r in data["rows"]} == {(arm, 0) for arm in photos.ARMS}
    assert set(data["verdicts"]) == set(photos.QUESTIONS)
    for v in data["verdicts"].values():
        assert v["answer"] in ("holds", "does not hold", "mixed", "not measurable")
    assert all(0 <= k <= 1 for shares in data["subject_kept"].values() for k in shares)
    text = page.read_text()
    assert text == (out / "photos.md").read_text().replace("(photos.png)", f"({page.with_suffix('.png').name})")
    assert data["command"] in text and page.with_suffix(".png").is_file()
    assert text.count("Verdict: **") == len(photos.QUESTIONS)
    # the per-step cost: every cost arm timed once per round by its own training run, on the page
    cost = data["cost"]
    assert set(cost["arms"]) == set(photos.COST_ARMS) and cost["arms"]["whole"]["seconds_per_step_ratio"] == 1
    for arm, runs in cost["runs"].items():
        assert [r["round"] for r in runs] == list(range(cost["rounds"])) and all(r["steps_per_second"] > 0 for r in runs)
        run = json.loads((out / "cost" / f"{arm}-r0" / "run.json").read_text())
        assert run["steps"] == cost["steps"] and run["training_steps_per_second"] == runs[0]["steps_per_second"]
    assert json.loads((out / "cost" / "prior-r0" / "run.json").read_text())["config"]["prior_prompt"]
    assert "## 4. Per-step cost" in text and "adapter switched off" in text
    masked = out / "zorb-masked"
    masks = sorted(p.name for p in photos.paths.DEMO_MASKS.iterdir())
    assert sorted(p.name for p in masked.glob("*.mask.png")) == masks


def test_a_rerun_trains_nothing_and_an_existing_output_is_refused(quick, random_sd_dir, capsys):
    out, _ = quick
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/run.json")}
    assert len(stamps) == len(photos.ARMS)
    data = json.loads((out / "photos.json").read_text())
    assert len({r["scores"]["train_s"] for r in data["rows"]}) > 1, "each cell's own training time"
    args = ["bench", "photos", "--quick", "--base-model", str(random_sd_dir), "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("balora: error: --out ")
    assert main([*args, "--overwrite", "true"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_missing_base_model_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["bench", "photos", "--quick", "--base-model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("balora: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_buckets_keep_the_whole_subject_the_centre_crop_cuts():
    crop = photos.subject_kept(photos.EDGE_CONCEPT, ["off"], 64, 16)
    buckets = photos.subject_kept(photos.EDGE_CONCEPT, ["auto"], 64, 16)
    assert max(crop) < 0.95 and min(buckets) > 0.95


def row(arm, seed, fid, bleed, drift):
    ws = {f"{w:g}": v for w, v in zip(photos.FUSIONS, (fid, fid))}
    return {"arm": arm, "seed": seed, "scores": {"fidelity": ws, "bleed": {w: bleed for w in ws},
                                                 "position": {w: None for w in ws}, "drift": drift,
                                                 "class_drift": None if drift is None else 2 * drift}}


def test_verdicts_count_paired_comparisons():
    rows = [row("whole", 0, 0.5, 40.0, 3.0), row("masked", 0, 0.5, 30.0, None), row("prior", 0, 0.4, 0, 2.0),
            row("whole", 1, 0.5, 40.0, 3.0), row("masked", 1, 0.5, 50.0, None), row("prior", 1, 0.4, 0, 4.0),
            row("crop", 0, 0.3, 0, None), row("buckets", 0, 0.2, 0, None)]
    v = {q: photos.verdict(rows, q) for q in photos.QUESTIONS}
    assert (v["masked"]["answer"], v["masked"]["wins"], v["masked"]["pairs"]) == ("mixed", 2, 4)
    assert (v["prior"]["answer"], v["prior"]["wins"], v["prior"]["pairs"]) == ("mixed", 2, 4)
    assert v["buckets"]["answer"] == "does not hold"
    assert photos.verdict(rows[:1], "masked")["answer"] == "not measurable"
    table = photos.summary(rows)
    assert table["masked"]["bleed w=1"] == {"mean": 40.0, "spread": 20.0}
