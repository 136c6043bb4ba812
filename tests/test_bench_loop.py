"""`balora bench loop`: the quick run's report, and its one-line refusals."""
import json

import pytest

from balora_diffusion.bench.loop import PHASES
from balora_diffusion.cli import main


def test_quick_loop_bench_reports_every_method_with_its_breakdown(tmp_path, capsys):
    assert main(["bench", "loop", "--quick", "--device", "cpu", "--methods", "balora", "scaled",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loop.json").read_text())
    assert report["device"].startswith("cpu")
    assert list(report["methods"]) == ["lora", "balora", "scaled"]  # lora first: the ratios' baseline
    for name, m in report["methods"].items():
        assert m["steps_per_second"] > 0
        assert m["peak_memory_mib"] > 0
        assert set(m["breakdown_ms"]) == {*PHASES, "total"}
        assert m["breakdown_ms"]["total"] == pytest.approx(sum(m["breakdown_ms"][p] for p in PHASES))
        assert m["breakdown_ms"]["unet_forward"] > 0 and m["breakdown_ms"]["backward"] > 0
    assert report["methods"]["lora"]["ratio_to_lora"] == 1.0
    assert report["methods"]["balora"]["breakdown_ms"]["rule"] > report["methods"]["lora"]["breakdown_ms"]["rule"]
    assert report["config"]["cache_latents"] is True
    assert "lora" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "nonsense"], "unknown method component"),
    (["--rank", "0"], "--rank"),
    (["--base-model", "/nonexistent"], "not a diffusers folder"),
    (["--steps-per-round", "0"], "--steps-per-round"),
])
def test_bad_arguments_are_one_line(argv, needle, tmp_path, capsys):
    assert main(["bench", "loop", "--quick", "--device", "cpu", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("balora: error:") and needle in err[0]
    assert not (tmp_path / "loop.json").exists()
