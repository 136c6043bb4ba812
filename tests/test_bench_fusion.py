"""`balora bench fusion`: its verdicts and scores against hand-made cases, the SD 1.5 cost against
the shapes' arithmetic, and the --quick run through the real command."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from balora_diffusion.bench import fusion as bench
from balora_diffusion.bench.fusion_cost import Layer, columns_per_call, cost, sd15_layers
from balora_diffusion.cli import main as cli_main
from balora_diffusion.formats.read import read_adapter


def _row(method, fusion, concept, own, fused, seed=0):
    return {"method": method, "seed": seed, "fusion": fusion, "concept": concept, "own_fidelity": own,
            "fused_fidelity": fused, "retention": bench.retention(fused, own)}


def test_retention_is_the_fused_share_of_the_own_fidelity_and_none_without_a_concept():
    assert bench.retention(0.1, 0.4) == pytest.approx(0.25)
    assert bench.retention(0.0, bench.MIN_OWN_FIDELITY) == 0.0
    assert bench.retention(0.3, bench.MIN_OWN_FIDELITY / 2) is None


def test_verdicts_compare_paired_retentions():
    rows = []
    for concept, own in (("<a>", 0.4), ("<b>", 0.2)):
        for method, sum_kept, gradient_kept in (("lora", 0.1, 0.5), ("balora", 0.2, 0.9)):
            rows += [_row(method, "sum", concept, own, sum_kept * own), _row(method, "gradient", concept, own,
                                                                            gradient_kept * own)]
    verdicts = bench.verdicts(rows)
    assert (verdicts["gradient_over_sum"]["answer"], verdicts["gradient_over_sum"]["wins"],
            verdicts["gradient_over_sum"]["pairs"]) == ("yes", 4, 4)
    # balora against lora on the same fusion and concept: better with both fusions, for both concepts
    assert verdicts["factor_aware_over_lora"]["answer"] == "yes" and verdicts["factor_aware_over_lora"]["pairs"] == 4
    # one pair the other way round makes it mixed; every pair the other way, no
    flipped = [dict(r, retention=0.95) if (r["method"], r["fusion"], r["concept"]) == ("lora", "sum", "<a>") else r
               for r in rows]
    assert bench.verdicts(flipped)["gradient_over_sum"]["answer"] == "mixed"
    # the page names where gradient fusion does not help: that one pair, with both retentions
    assert bench.verdicts(flipped)["gradient_over_sum"]["losses"] == ["lora seed 0 <a> (0.500 against 0.950)"]
    assert verdicts["gradient_over_sum"]["losses"] == []
    swapped = [dict(r, fusion={"sum": "gradient", "gradient": "sum"}[r["fusion"]]) for r in rows]
    assert bench.verdicts(swapped)["gradient_over_sum"]["answer"] == "no"
    # a concept its own adapter never drew is no comparison at all
    faint = [dict(r, retention=bench.retention(r["fused_fidelity"], 0.0)) for r in rows]
    assert bench.verdicts(faint)["gradient_over_sum"]["pairs"] == 0
    assert bench.verdicts(faint)["gradient_over_sum"]["answer"].startswith("not measurable")


def test_drift_is_the_mean_absolute_pixel_difference():
    base = [Image.new("RGB", (4, 4), (10, 20, 30)), Image.new("RGB", (4, 4), (0, 0, 0))]
    moved = [Image.new("RGB", (4, 4), (7, 20, 30)), Image.new("RGB", (4, 4), (0, 0, 6))]
    assert bench.pixel_drift(moved, base) == pytest.approx(((3 / 3) + (6 / 3)) / 2)
    assert bench.pixel_drift(base, base) == 0.0


def test_sd15_cost_follows_from_its_shapes():
    layers = sd15_layers()
    assert len(layers) == 176
    widths = {}
    for layer in layers:
        widths[layer.inputs] = widths.get(layer.inputs, 0) + 1
    # 32 cross-attention to_k / to_v read the 768-wide text states, as do the text encoder's 48 layers
    assert widths == {320: 30, 640: 30, 768: 80, 1280: 36}
    assert columns_per_call("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 64 * 64
    assert columns_per_call("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q") == 16 * 16
    assert columns_per_call("up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_q") == 64 * 64
    assert columns_per_call("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == 8 * 8
    assert columns_per_call("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v") == 77
    # one layer by hand: d = 10, 2 concepts of rank 3, 5 columns a call
    one = cost([Layer("down_blocks.0.x", 7, 10, 5)], concepts=2, rank=3)
    assert one["gram_bytes"] == 10 * 10 * 8 and one["peak_gram_bytes"] == 2 * 800
    assert one["solve_flops"] == 9 * 1000 + 2 * 1000 + 2 * 2 * 3 * 100 + 2 * 6 * 100
    assert one["record_flops_unet_call"] == 2 * 5 * 100 and one["record_flops_text_call"] == 0


def test_quick_bench_writes_its_page_and_fused_adapters(tmp_path):
    out, page = tmp_path / "out", tmp_path / "docs" / "fused-results.md"
    page.parent.mkdir()
    assert cli_main(["bench", "fusion", "--quick", "--out", str(out), "--page", str(page)]) == 0
    result = json.loads((out / "fusion.json").read_text())
    plan = bench.QUICK
    assert len(result["rows"]) == len(plan.methods) * len(plan.seeds) * 2 * 2
    assert {(r["method"], r["fusion"], r["concept"]) for r in result["rows"]} == {
        (m, f, c) for m in plan.methods for f in bench.FUSIONS for c in ("<zorb>", "<quax>")}
    for r in result["rows"]:
        assert 0 <= r["own_fidelity"] <= 1 and 0 <= r["fused_bleed"] <= 1 and r["fused_drift"] >= 0
    for method in plan.methods:
        for fusion in bench.FUSIONS:
            fused = read_adapter(out / "fused" / f"{method}-s0-{fusion}")
            assert fused.tokens == ["<zorb>", "<quax>"]
    assert [t["concepts"] for t in result["fuse_times"]] == [n for n in plan.cost_concepts for _ in bench.FUSIONS]
    assert [(p["concept"], p["with"]) for p in result["parts"]] == [
        (c, label) for c in ("<zorb>", "<quax>") for label in bench.PARTS]
    text = page.read_text()
    assert text == (out / "fusion.md").read_text().replace("fusion.png", page.with_suffix(".png").name)
    assert f"--page {page}" in text and "## Verdicts" in text and page.with_suffix(".png").is_file()
    for verdict in result["verdicts"].values():
        assert verdict["question"] in text
    # a second run without --overwrite is refused before any work, and leaves the page alone
    refused = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", "bench", "fusion", "--quick", "--out",
                              str(out)], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("balora: error: "), refused.stderr
    assert "fusion.json" in lines[0]
