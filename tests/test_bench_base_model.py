"""`balora bench base-model`: prompt sets, scoring, and the --quick JSON / grid outputs."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from balora_diffusion import world
from balora_diffusion.bench import base_model
from balora_diffusion.cli import main


def _record(split: str, background: bool, colour: bool, shape: bool) -> dict:
    return {"split": split, "correct": {"background": background, "object": colour, "shape": shape}}


def test_summarise_counts_fractions_per_split_and_attribute():
    records = [_record("heldout", True, True, False), _record("heldout", True, False, False),
               _record("heldout", False, True, True), _record("heldout", True, True, True)]
    summary = base_model.summarise(records)
    assert summary["heldout_samples"] == 4
    assert summary["heldout_background_accuracy"] == pytest.approx(0.75)
    assert summary["heldout_object_accuracy"] == pytest.approx(0.75)
    assert summary["heldout_shape_accuracy"] == pytest.approx(0.5)
    assert summary["seen_samples"] == 0 and summary["seen_object_accuracy"] is None


def test_score_compares_each_attribute_with_the_scene():
    scene = world.Scene("star", "red", "white", "small", "left")
    measured = {"background": "white", "object": "orange", "shape": "star", "object_fraction": 0.1}
    assert base_model.score(scene, measured) == {"background": True, "object": False, "shape": True}


def test_pick_is_a_fixed_ordered_subset():
    items = list(range(50))
    chosen = base_model.pick(items, 7)
    assert len(set(chosen)) == 7 and chosen == sorted(chosen) and set(chosen) <= set(items)
    assert base_model.pick(items, 7) == chosen
    assert base_model.pick(items[:3], 5) == items[:3]


def test_full_prompt_set_holds_every_heldout_scene():
    jobs = base_model.prompt_scenes(n_seen=10, quick=False)
    heldout = [s for split, s in jobs if split == "heldout"]
    seen = [s for split, s in jobs if split == "seen"]
    assert set(heldout) == set(world.heldout_scenes())
    assert len(seen) == 10 and not any(world.is_heldout(s) for s in seen)


def test_quick_run_on_the_shipped_model_composes_and_writes_json_and_a_grid(tmp_path):
    assert main(["bench", "base-model", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "base_model.json").read_text())
    # The shipped model composes colour/background pairs it never saw (one miss allowed).
    assert data["heldout_background_accuracy"] >= 5 / 6 and data["heldout_object_accuracy"] >= 5 / 6
    records = data["records"]
    assert len(records) == base_model.QUICK_HELDOUT + base_model.QUICK_SEEN
    for record in records:
        scene_is_heldout = any(s.caption() == record["prompt"] for s in world.heldout_scenes())
        assert scene_is_heldout == (record["split"] == "heldout")
        assert record["correct"] == {k: record["measured"][k] == record["expected"][k] for k in record["expected"]}
    for split in base_model.SPLITS:
        rows = [r for r in records if r["split"] == split]
        for key in base_model.ATTRIBUTES:
            value = data[f"{split}_{key}_accuracy"]
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(sum(r["correct"][key] for r in rows) / len(rows))
    with Image.open(tmp_path / "base_model.png") as grid:
        assert grid.width > 64 and grid.height > 64 * len(records) // 2


def test_bad_arguments_are_user_errors(capsys):
    assert main(["bench", "base-model", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["bench", "base-model", "--model", "/nonexistent/model"]) == 2
