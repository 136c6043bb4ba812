"""The synthetic benchmark: problem definitions against linear algebra, statistics against numpy,
and the quick CLI run's outputs against the protocol and the raw curves they were computed from."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from balora_diffusion.bench import curves as C
from balora_diffusion.bench.methods import METHOD_SPECS
from balora_diffusion.bench.synthetic_problems import OneLayer, TwoLayer
from balora_diffusion.cli import main

ONE_LAYER_GRID = np.linspace(5e-3, 5e-1, 20)
TWO_LAYER_GRID = np.linspace(1e-5, 3e-1, 50)
REQUIRED = {"best_lr", "median_final_gap", "steps_to_1e-2", "steps_to_1e-4"}


# ---------------------------------------------------------------- problems

def test_one_layer_optimum_is_eckart_young_and_attained():
    prob = OneLayer.make([3, 4, 5])
    for s in range(3):
        d = (prob.z[s] - prob.w0[s]).numpy()
        sv = np.linalg.svd(d, compute_uv=False)
        assert prob.optimum[s].item() == pytest.approx(0.5 * np.sum(sv[4:] ** 2), rel=1e-12)
    # the truncated SVD (B = U_r S_r, A = Vh_r) attains it, a random rank-4 pair does not beat it
    u, sv, vh = torch.linalg.svd(prob.z - prob.w0)
    best = prob.losses([(vh[:, :4, :], u[:, :, :4] * sv[:, None, :4])])
    torch.testing.assert_close(best, prob.optimum, rtol=1e-10, atol=1e-10)
    rand = prob.losses([(torch.randn(3, 4, 20, dtype=torch.float64), torch.randn(3, 20, 4, dtype=torch.float64))])
    assert (rand > prob.optimum).all()


def test_one_layer_init_follows_the_paper():
    prob = OneLayer.make(range(4))
    (a, b), = prob.init
    assert a.shape == (4, 4, 20) and b.shape == (4, 20, 4)
    assert (b == 0).all() and a.std().item() == pytest.approx(1.0, abs=0.15)
    assert prob.z.shape == prob.w0.shape == (4, 20, 20)
    assert not torch.equal(prob.z[0], prob.z[1])  # seeds differ


def test_two_layer_planted_solution_reaches_zero_loss():
    prob = TwoLayer.make([7, 8])
    factors = []
    for p in prob.planted:
        assert (torch.linalg.matrix_rank(p) == 4).all()
        u, sv, vh = torch.linalg.svd(p)
        factors.append((vh[:, :4, :], u[:, :, :4] * sv[:, None, :4]))
    torch.testing.assert_close(prob.losses(factors), torch.zeros(2, dtype=torch.float64), atol=1e-20, rtol=0)
    at_init = prob.losses(prob.init)
    expected = 0.5 * ((prob.target - prob.w1 @ prob.w2) ** 2).sum((-2, -1))  # B = 0
    torch.testing.assert_close(at_init, expected)
    assert (at_init > 1.0).all()


# ---------------------------------------------------------------- statistics

def test_steps_to_reach_matches_a_scan():
    rng = np.random.default_rng(0)
    curves = np.exp(-np.cumsum(rng.uniform(0, 0.5, size=(60, 7)), axis=0))
    curves[:, 3] = 1.0  # never
    curves[10:, 5] = np.nan  # diverged
    for thr in (0.5, 1e-2, 1e-4):
        expect = []
        for s in range(curves.shape[1]):
            hits = [t for t in range(curves.shape[0]) if curves[t, s] <= thr]
            expect.append(hits[0] if hits else np.inf)
        np.testing.assert_array_equal(C.steps_to_reach(curves, thr), expect)
        assert C.median_steps_to_reach(curves, thr) == np.median(expect)


def test_select_lr_ranks_by_median_and_treats_nan_as_worst():
    finals = np.array([[1.0, 1.0, 9.0], [0.5, np.nan, np.nan], [0.8, 0.7, 100.0], [0.7, 0.7, 1e9]])
    assert C.select_lr(finals) == 3  # medians 1, inf, 0.8, 0.7
    assert C.select_lr(np.array([[2.0], [1.0], [1.0]])) == 1  # tie -> first (smaller) lr


# ---------------------------------------------------------------- the quick CLI run

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert main(["bench", "synthetic", "--out", str(out), "--quick"]) == 0
    return out, _strict_json(out / "synthetic.json"), _strict_json(out / "synthetic_protocol.json")


def _strict_json(path):
    """Parse refusing NaN / Infinity, which Python writes by default but JSON does not allow."""
    def refuse(name):
        raise ValueError(f"{path.name} holds the non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_shape_and_keys(quick_run):
    out, results, protocol = quick_run
    assert set(results) == {"one_layer", "two_layer"}
    for per_method in results.values():
        assert list(per_method) == list(METHOD_SPECS)
        for r in per_method.values():
            assert REQUIRED <= set(r)
    assert protocol["quick"] is True and set(protocol["experiments"]) == {"one_layer", "two_layer"}
    assert sorted(p.name for p in out.iterdir()) == ["synthetic.json", "synthetic.png", "synthetic_protocol.json"]
    with Image.open(out / "synthetic.png") as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 200


def test_best_lr_is_a_grid_value_and_the_argmin(quick_run):
    _, results, protocol = quick_run
    for name, grid in (("one_layer", ONE_LAYER_GRID), ("two_layer", TWO_LAYER_GRID)):
        lrs = protocol["experiments"][name]["lrs"]
        assert all(np.isclose(grid, lr, rtol=1e-12, atol=0).any() for lr in lrs)
        for r in results[name].values():
            by_lr = [np.inf if g is None else g for g in r["median_final_gap_by_lr"]]
            assert r["best_lr"] == lrs[int(np.argmin(by_lr))]
            assert (np.inf if r["median_final_gap"] is None else r["median_final_gap"]) == pytest.approx(min(by_lr), rel=1e-12)


def test_summaries_match_numpy_on_the_seed_curves(quick_run):
    _, results, protocol = quick_run
    for name, per_method in results.items():
        steps = protocol["experiments"][name]["steps"]
        for method, r in per_method.items():
            seed_curves = np.array(r["seed_curves"], dtype=float)  # [seed][step]
            assert seed_curves.shape == (2, steps + 1)
            if not np.isfinite(seed_curves).all():
                continue  # a diverged seed: numpy's percentile of inf is not a number to compare
            np.testing.assert_allclose(r["median_curve"], np.median(seed_curves, axis=0), rtol=1e-12)
            np.testing.assert_allclose(r["q25_curve"], np.percentile(seed_curves, 25, axis=0), rtol=1e-12)
            np.testing.assert_allclose(r["q75_curve"], np.percentile(seed_curves, 75, axis=0), rtol=1e-12)
            assert r["median_final_gap"] == pytest.approx(np.median(seed_curves[:, -1]), rel=1e-12)
            for key, thr in (("steps_to_1e-2", 1e-2), ("steps_to_1e-4", 1e-4)):
                first = [next((t for t, g in enumerate(c) if g <= thr), np.inf) for c in seed_curves]
                med = np.median(first)
                assert r[key] == (None if np.isinf(med) else med), (name, method, key)
            # a gap is a loss minus the optimal loss: never below 0 beyond float64 rounding
            assert seed_curves.min() >= -1e-9 * max(1.0, seed_curves[:, 0].max()), (name, method)


def test_initial_gap_matches_an_independent_svd(quick_run):
    _, results, protocol = quick_run
    seeds = protocol["experiments"]["one_layer"]["seeds"]
    prob = OneLayer.make(seeds)
    for s in range(len(seeds)):
        sv = np.linalg.svd((prob.z[s] - prob.w0[s]).numpy(), compute_uv=False)
        # at step 0, B = 0: loss = 1/2 ||Z - W0||^2, gap = 1/2 * (sum of the top-4 squared singular values)
        for r in results["one_layer"].values():
            assert r["seed_curves"][s][0] == pytest.approx(0.5 * np.sum(sv[:4] ** 2), rel=1e-10)


def test_lora_and_balora_reduce_the_gap(quick_run):
    _, results, _ = quick_run
    for method in ("lora", "balora"):
        med = results["one_layer"][method]["median_curve"]
        assert med[-1] < 0.05 * med[0]
        assert np.median(np.diff(med)) < 0  # mostly decreasing, not one lucky step
    assert results["two_layer"]["lora"]["median_curve"][-1] < 0.5 * results["two_layer"]["lora"]["median_curve"][0]


def test_unknown_method_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "synthetic", "--out", str(tmp_path), "--quick", "--methods", "lora", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
