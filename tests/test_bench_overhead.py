"""The overhead benchmark: SD 1.5 LoRA shapes against the architecture, the timing loop's schedule,
that the random pairs really exercise the projection, and the quick CLI run's report."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from balora_diffusion.bench import overhead as O
from balora_diffusion.bench.methods import METHOD_SPECS
from balora_diffusion.bench.sd15_shapes import text_encoder_shapes, unet_shapes
from balora_diffusion.cli import main


def test_unet_attention_projection_shapes():
    shapes = unet_shapes()
    # 16 transformer blocks (down 2+2+2, mid 1, up 3+3+3) x 2 attentions x 4 projections
    assert len(shapes) == 16 * 2 * 4
    blocks = {320: 2 + 3, 640: 2 + 3, 1280: 2 + 1 + 3}  # transformer blocks per channel width
    expected = Counter()
    for c, k in blocks.items():
        expected[(c, c)] += 6 * k  # attn1 q/k/v/out, attn2 q/out
        expected[(c, 768)] += 2 * k  # attn2 k/v read the 768-wide text states
    assert Counter((m, n) for _, m, n in shapes) == expected
    named = {name: (m, n) for name, m, n in shapes}
    assert named["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 768)
    assert named["mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"] == (1280, 1280)
    assert named["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"] == (320, 768)


def test_text_encoder_projection_shapes():
    shapes = text_encoder_shapes()
    assert len(shapes) == 12 * 4
    assert {(m, n) for _, m, n in shapes} == {(768, 768)}
    assert {name.rsplit(".", 1)[-1] for name, _, _ in shapes} == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_quick_shapes_are_one_per_distinct_shape():
    full, quick = O.sd15_shapes(False), O.sd15_shapes(True)
    assert len(full) == 128 + 48
    assert sorted((m, n) for _, m, n in quick) == sorted({(m, n) for _, m, n in full})


def test_random_pairs_are_projected_not_skipped():
    from balora_diffusion.rules import balanced_projection

    names, factors, grads = O.make_factors(O.sd15_shapes(True), rank=4, device=torch.device("cpu"))
    assert len(grads) == 2 * len(factors) and all(p.grad is not None for ab in factors for p in ab)
    opts = O.build_optimizers(["balora"], names, factors)
    opts["balora"].step()
    for a, b in factors:
        # after a BaLoRA step the pair is balanced, so it really went through the projection
        torch.testing.assert_close(a @ a.T, b.T @ b, rtol=1e-3, atol=1e-6)
        a2, b2 = balanced_projection(a.detach(), b.detach())
        torch.testing.assert_close(a2, a.detach(), rtol=1e-3, atol=1e-5)


class _Recorder:
    def __init__(self, label, log):
        self.label, self.log = label, log

    def step(self):
        self.log.append(self.label)


def test_time_steps_interleaves_rounds_and_restores_grads():
    log: list[str] = []
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    saved = [torch.full((3,), 2.0)]
    opts = {k: _Recorder(k, log) for k in ("x", "y", "z")}
    times = O.time_steps(opts, [p], saved, torch.device("cpu"), warmup=2, rounds=3, steps_per_round=2)
    assert log[:6] == ["x", "x", "y", "y", "z", "z"]  # warm-up
    assert log[6:] == ["x"] * 2 + ["y"] * 2 + ["z"] * 2 + ["y"] * 2 + ["z"] * 2 + ["x"] * 2 \
        + ["z"] * 2 + ["x"] * 2 + ["y"] * 2  # each round starts one method later
    assert {k: len(v) for k, v in times.items()} == {"x": 6, "y": 6, "z": 6}
    assert all(t >= 0 for v in times.values() for t in v)
    assert torch.equal(p.grad, saved[0])  # the step saw the saved gradient, not a stale one


def test_summary_ratios_are_relative_to_the_adamw_median():
    times = {"adamw": [0.010, 0.012, 0.011], "lora": [0.020, 0.021, 0.019, 0.5]}
    rows = O.summarize(times)
    assert rows["adamw"]["ms_per_step"] == pytest.approx(11.0)
    assert rows["lora"]["ms_per_step"] == pytest.approx(20.5)  # median: robust to the 0.5 s outlier
    assert rows["lora"]["ratio"] == pytest.approx(20.5 / 11.0)


def test_quick_cli_run(tmp_path):
    assert main(["bench", "overhead", "--quick", "--ranks", "2", "8", "--device", "cpu", "--rounds", "3",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert report["pairs"] == 7 and len(report["shapes"]) == 7
    assert (report["warmup"], report["rounds"], report["steps_per_round"]) == (1, 3, 1)
    assert set(report["ranks"]) == {"2", "8"}
    for rows in report["ranks"].values():
        assert list(rows) == ["adamw", *METHOD_SPECS]
        base = rows["adamw"]["ms_per_step"]
        for r in rows.values():
            assert r["timed_steps"] == report["rounds"] * report["steps_per_round"]
            assert 0 < r["ms_q25"] <= r["ms_per_step"] <= r["ms_q75"]
            assert r["ratio"] == pytest.approx(r["ms_per_step"] / base)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful where CUDA is absent")
def test_cuda_without_cuda_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "overhead", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "overhead.json").exists()
