"""`balora bench concept` and the results page: the quick run end to end, the analysis on known numbers."""
import json
import math

import pytest

from balora_diffusion.bench import concept as bench
from balora_diffusion.experiments import results
from balora_diffusion.cli import main

KEYS = ("best_lr", "steps_to_lora_final", "ratio_to_lora", "final_heldout_spread", "fidelity", "adherence")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("concept")
    assert main(["bench", "concept", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_benchmark_writes_concept_json_shaped_as_documented(quick):
    data = json.loads((quick / "concept.json").read_text())
    assert set(data["methods"]) == set(bench.QUICK.methods)
    for method, row in data["methods"].items():
        assert all(key in row for key in KEYS), method
        assert row["best_lr"] in [f"x{lr}" for lr in bench.QUICK.lrs]
        assert len(row["by_lr"]) == len(bench.QUICK.lrs)
    lora = data["methods"]["lora"]
    assert lora["ratio_to_lora"] == 1.0 and lora["steps_to_lora_final"] <= bench.QUICK.steps
    assert data["methods"]["ilora"]["best_lambda"] in bench.QUICK.lambdas
    assert data["protocol"]["cells"] == bench.QUICK.cells() == len(list((quick / "cells").iterdir()))
    for name in ("concept.md", "concept.png", "summary.md", "summary.json", "grid.png"):
        assert (quick / name).is_file(), name


def test_rerunning_the_benchmark_trains_nothing(quick):
    stamps = {p: p.stat().st_mtime_ns for p in (quick / "cells").glob("*/run.json")}
    assert main(["bench", "concept", "--quick", "--out", str(quick)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    history = json.loads((quick / "history.json").read_text())
    assert [h["trained_cells"] for h in history][-2:] == [bench.QUICK.cells(), 0]


def test_the_results_page_is_written_from_the_benchmarks(quick, tmp_path):
    docs = tmp_path / "docs"
    assert main(["results", "--quick", "--out", str(docs), "--concept", str(quick),
                 "--synthetic", str(tmp_path / "synthetic")]) == 0
    page = (docs / "results.md").read_text()
    for name in ("concept.png", "concept-grid.png", "synthetic.png"):
        assert (docs / "img" / name).is_file() and f"img/{name}" in page
    assert f"balora results --out {docs} --quick" in page
    verdict_rows = [line for line in page.splitlines() if line.startswith("| ") and "**" in line]
    assert len(verdict_rows) == len(results.claims({}, {"methods": {}}))
    assert (quick / "concept.md").read_text() in page


def record(method, lr, lr_unet, seed, curve, lam=None, status="done", fidelity=0.5, adherence=0.5):
    labels = {"method": method, "lr": lr, "lr_unet": lr_unet, "lr_text": lr_unet / 10, "seed": seed}
    if lam is not None:
        labels[bench.LAMBDA_KEY] = lam
    return {"labels": labels, "status": status, "heldout_loss": [[25 * i, v] for i, v in enumerate(curve)],
            "final_heldout_loss": curve[-1] if status == "done" else None,
            "fidelity": {"1": fidelity} if status == "done" else None,
            "adherence": {"1": {"all": adherence}} if status == "done" else None}


def test_steps_to_reach_is_the_median_first_crossing_over_seeds():
    recs = [record("m", "x1", 1e-3, s, curve) for s, curve in
            enumerate([[1, 0.5, 0.2, 0.1], [1, 0.9, 0.3, 0.2], [1, 0.4, 0.35, 0.3]])]
    assert bench.steps_to_reach(recs, 0.35) == 50  # every seed crosses at step 50
    assert bench.steps_to_reach(recs, 0.3) == 50
    assert bench.steps_to_reach(recs, 0.2) == 75
    assert math.isinf(bench.steps_to_reach(recs, 0.05))


def test_analysis_ratio_spread_lambda_choice_and_divergence():
    recs = []
    for s in range(3):
        recs += [record("lora", "x1", 1e-3, s, [1, 0.6, 0.4, 0.3], adherence=0.9),
                 record("lora", "x3", 3e-3, s, [1, 0.5, 0.3, 0.2], adherence=0.7),
                 # ilora: lambda 10 is better at x1 and diverges at x3, where lambda 1 is kept
                 record("ilora", "x1", 1e-3, s, [1, 0.4, 0.25, 0.2], lam="10", adherence=0.8),
                 record("ilora", "x1", 1e-3, s, [1, 0.6, 0.5, 0.45], lam="1"),
                 record("ilora", "x3", 3e-3, s, [1, 0.5, 0.3, 0.25], lam="1", adherence=0.6),
                 record("ilora", "x3", 3e-3, s, [1, 2.0], lam="10", status="diverged"),
                 record("balora", "x1", 1e-3, s, [1, 0.3, 0.2, 0.15]),
                 record("balora", "x3", 3e-3, s, [1, 9.0], status="diverged")]
    table = bench.analyse(recs)
    lora, ilora, balora = table["lora"], table["ilora"], table["balora"]
    assert lora["best_lr"] == "x3" and lora["final_heldout"] == 0.2
    assert lora["steps_to_lora_final"] == 75 and lora["ratio_to_lora"] == 1.0
    assert lora["final_heldout_spread"] == pytest.approx(0.1)
    assert lora["adherence_spread"] == pytest.approx(0.2) and lora["adherence"] == pytest.approx(0.7)
    assert ilora["best_lr"] == "x1" and ilora["best_lambda"] == 10.0
    assert ilora["by_lr"]["x3"]["lambda"] == 1.0 and ilora["by_lr"]["x3"]["diverged_seeds"] == 0
    assert ilora["steps_to_lora_final"] == 75 and ilora["ratio_to_lora"] == 1.0
    assert ilora["final_heldout_spread"] == pytest.approx(0.05)
    assert balora["best_lr"] == "x1" and balora["steps_to_lora_final"] == 50
    assert balora["ratio_to_lora"] == pytest.approx(50 / 75)
    assert balora["diverged_lrs"] == ["x3"] and balora["by_lr"]["x3"]["diverged_seeds"] == 3


def test_a_claim_holds_only_when_all_its_evidence_supports_it():
    yes, no, unknown = results.Evidence("a", True), results.Evidence("b", False), results.Evidence("c", None)
    assert results.Claim("p", "c", (yes, yes, unknown)).verdict == "holds"
    assert results.Claim("p", "c", (no, unknown)).verdict == "does not hold"
    assert results.Claim("p", "c", (yes, no)).verdict == "mixed"
    assert results.Claim("p", "c", (unknown,)).verdict == "not measured"


def test_a_method_that_diverges_somewhere_is_not_robust():
    concept = {"methods": {
        "lora": {"diverged_lrs": [], "final_heldout_spread": 0.5, "adherence_spread": 0.5},
        "ilora": {"diverged_lrs": ["x9"], "final_heldout_spread": 0.01, "adherence_spread": 0.01}}}
    heldout, adherence = results.concept_robust(concept, "ilora")
    assert heldout.supports is False and adherence.supports is True


def test_faster_needs_a_margin():
    synthetic = {e: {"lora": {"median_final_gap": 1.0}, "balora": {"median_final_gap": g}}
                 for e, g in zip(results.EXPERIMENTS, (0.5, 0.95))}
    assert [e.supports for e in results.synthetic_faster(synthetic, "balora")] == [True, False]
