"""Verdict pages: `balora results --sweep DIR --out PAGE` for a sweep of one's own (a small sweep of the random SD
model scored with a tiny CLIP), and the main page's prompt-following verdict as two lines (at each method's best
learning rate, and over the learning rates both methods drew at)."""
import json
import re

import pytest

from balora_diffusion.bench import concept as bench
from balora_diffusion.experiments import results
from balora_diffusion.cli import main
from test_sweep import plain_concept, sweep_args


@pytest.fixture(scope="module")
def swept(random_sd_dir, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("results-sweep")
    out = root / "sweep"
    assert main(sweep_args(out, random_sd_dir, "--set", f"data_dir={plain_concept(root / 'plain')}", "--clip",
                           str(tiny_clip_dir), "--fusions", "1")) == 0
    return out


def _verdicts(page: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """(method, claim) -> (verdict, evidence lines) of the page's verdict table."""
    found = {}
    for line in page.splitlines():
        if line.startswith("| ") and "**" in line:
            method, claim, verdict, evidence = [c.strip() for c in line.strip("|").split("|")]
            found[(method, claim)] = (verdict.strip("*"), evidence.split("<br>"))
    return found


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def test_the_page_of_a_sweep_gives_each_claim_a_verdict_from_its_cells(swept, tmp_path):
    page_file = tmp_path / "docs" / "mine.md"
    assert main(["results", "--sweep", str(swept), "--out", str(page_file)]) == 0
    page = page_file.read_text()
    assert f"balora results --sweep {swept} --out {page_file}" in page
    assert (tmp_path / "docs" / "mine-grid.png").is_file() and "(mine-grid.png)" in page
    verdicts = _verdicts(page)
    assert set(verdicts) == {("balora", "robust to the learning rate (than LoRA)"), ("balora", "faster (than LoRA)"),
                             ("balora", "follows the prompt (better than LoRA)")}
    for verdict, evidence in verdicts.values():
        marks = [e[0] for e in evidence]
        expected = ("holds" if set(marks) == {"✔"} else "does not hold" if set(marks) == {"✘"} else "mixed"
                    if {"✔", "✘"} <= set(marks) else "not measured")
        assert verdict == expected, (verdict, evidence)
    assert "CLIP-T (the cosine of each image with its prompt" in page  # what following the prompt measured

    # the evidence recomputed from the cells: medians over one seed are the cells' own numbers
    cells = json.loads((swept / "summary.json").read_text())["cells"]
    final = {(c["labels"]["method"], c["labels"]["lr"]): c["final_heldout_loss"] for c in cells}
    clip_t = {(c["labels"]["method"], c["labels"]["lr"]): c["clip-t"]["1"] for c in cells}
    spread = {m: max(v for (k, _), v in final.items() if k == m) - min(v for (k, _), v in final.items() if k == m)
              for m in ("lora", "balora")}
    heldout_line = verdicts[("balora", "robust to the learning rate (than LoRA)")][1][0]
    assert heldout_line.startswith("✔" if spread["balora"] < spread["lora"] else "✘")
    assert _numbers(heldout_line) == pytest.approx([spread["balora"], spread["lora"]], rel=1e-2)
    best = {m: min((v, lr) for (k, lr), v in final.items() if k == m)[1] for m in ("lora", "balora")}
    at_best, over_grid = verdicts[("balora", "follows the prompt (better than LoRA)")][1]
    mine, theirs = clip_t[("balora", best["balora"])], clip_t[("lora", best["lora"])]
    assert f"balora {mine:.3f} (lr {best['balora']}) vs lora {theirs:.3f} (lr {best['lora']})" in at_best
    assert at_best.startswith("✔" if mine >= theirs + results.CLIP_T.margin else "✘")
    mean = {m: sum(v for (k, _), v in clip_t.items() if k == m) / 2 for m in ("lora", "balora")}
    assert f"over the 2 lrs both drew at, balora {mean['balora']:.3f} vs lora {mean['lora']:.3f}" in over_grid


def test_the_sweep_page_refuses_what_it_cannot_judge(swept, tmp_path, capsys):
    page = tmp_path / "page.md"
    assert main(["results", "--sweep", str(swept), "--out", str(page)]) == 0
    capsys.readouterr()
    cases = [(["--sweep", str(swept), "--out", str(page)], "already exists"),
             (["--sweep", str(tmp_path), "--out", str(tmp_path / "other.md")], "no summary.json")]
    no_lora = tmp_path / "no-lora"
    no_lora.mkdir()
    summary = json.loads((swept / "summary.json").read_text())
    summary["cells"] = [c for c in summary["cells"] if c["labels"]["method"] != "lora"]
    (no_lora / "summary.json").write_text(json.dumps(summary))
    cases.append((["--sweep", str(no_lora), "--out", str(tmp_path / "third.md")], "no lora cells"))
    for args, message in cases:
        assert main(["results", *args]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("balora: error: ") and message in errors[0], errors


def _record(method, lr, lr_unet, seed, final, adherence, status="done"):
    labels = {"method": method, "lr": lr, "lr_unet": lr_unet, "lr_text": lr_unet / 10, "seed": seed}
    done = status == "done"
    return {"name": f"{method}-{lr}-{seed}", "labels": labels, "status": status,
            "final_heldout_loss": final if done else None, "heldout_loss": [[0, 1.0], [10, final]] if done else [[0, 1.0]],
            "fidelity": {"1": 0.5} if done else None, "adherence": {"1": {"all": adherence}} if done else None,
            "wall_seconds": 1.0, "cpu_seconds": 1.0}


def test_prompt_following_is_judged_at_the_best_lr_and_over_the_lrs_both_drew_at():
    # LoRA draws as well as iLoRA where it trains, and diverges at x9: averaging x9 in as 0 would
    # credit iLoRA with following prompts better for what is LoRA's divergence
    records = []
    for seed in (0, 1):
        for lr, lr_unet in (("x1", 1e-4), ("x3", 3e-4), ("x9", 9e-4)):
            records.append(_record("lora", lr, lr_unet, seed, 0.05, 0.9, status="diverged" if lr == "x9" else "done"))
            records.append(_record("ilora", lr, lr_unet, seed, 0.05 + (0.001 if lr != "x3" else 0), 0.92))
    concept = {"methods": bench.analyse(records)}
    at_best, over_grid = results.prompt_at_best_lr(concept, "ilora"), results.prompt_over_grid(concept, "ilora")
    assert at_best.supports is False and "ilora 0.920 (lr x3) vs lora 0.900 (lr x1)" in at_best.text
    assert over_grid.supports is False and "the 2 lrs both drew at" in over_grid.text and "lr x9" in over_grid.text
    records = [r if r["labels"]["method"] == "lora" else {**r, "adherence": {"1": {"all": 0.99}}} for r in records]
    concept = {"methods": bench.analyse(records)}
    assert results.prompt_at_best_lr(concept, "ilora").supports and results.prompt_over_grid(concept, "ilora").supports
    claim = next(c for c in results.claims({}, concept) if "follow the prompt" in c.claim)
    assert [e.supports for e in claim.evidence] == [True, True, None, None]  # iLoRA's two lines, piLoRA unmeasured


@pytest.mark.slow
def test_the_results_page_has_both_prompt_lines_on_the_quick_path(tmp_path):
    docs = tmp_path / "docs"
    assert main(["results", "--quick", "--out", str(docs), "--concept", str(tmp_path / "concept"),
                 "--synthetic", str(tmp_path / "synthetic")]) == 0
    page = (docs / "results.md").read_text()
    row = next(line for line in page.splitlines() if "images follow the prompt better" in line)
    lines = row.split("|")[4].split("<br>")
    assert "adherence (w=1) at each method's best lr, ilora" in lines[0]
    assert "adherence (w=1) averaged over the 2 lrs both drew at, ilora" in lines[1]
    assert "judged twice, as two lines" in page
