"""Gradient fusion's closed form against a direct least-squares solve on stacked inputs."""
import pytest
import torch

from balora_diffusion.gradient_fusion import LayerTerms, gram, solve_layers, truncate

D, OUT = 10, 7


def _concept(gen, rank: int, columns: int, input_rank: int | None = None):
    """(U, A, X): a rank-`rank` update and `columns` inputs spanning `input_rank` directions."""
    up = torch.randn(OUT, rank, generator=gen, dtype=torch.float64)
    down = torch.randn(rank, D, generator=gen, dtype=torch.float64)
    span = torch.randn(D, input_rank or D, generator=gen, dtype=torch.float64)
    return up, down, span @ torch.randn(input_rank or D, columns, generator=gen, dtype=torch.float64)


def _terms(concepts) -> LayerTerms:
    grams = [gram(x.T) for _, _, x in concepts]
    return LayerTerms([u for u, _, _ in concepts], [a @ g for (_, a, _), g in zip(concepts, grams)],
                      sum(grams))


def _lstsq(concepts, ridge_shift: float = 0.0) -> torch.Tensor:
    """argmin_dW sum_i ||dW X_i - U_i A_i X_i||^2 + shift ||dW||^2, the minimum-norm one, by lstsq on
    the stacked inputs (a ridge as sqrt(shift) I columns with zero targets)."""
    x = torch.cat([x for _, _, x in concepts], dim=1)
    y = torch.cat([u @ a @ x for u, a, x in concepts], dim=1)
    if ridge_shift:
        x = torch.cat([x, ridge_shift ** 0.5 * torch.eye(D, dtype=x.dtype)], dim=1)
        y = torch.cat([y, torch.zeros(OUT, D, dtype=y.dtype)], dim=1)
    return torch.linalg.lstsq(x.T, y.T, driver="gelsd").solution.T


def test_fused_factors_solve_the_stacked_least_squares_problem_with_a_rank_deficient_concept():
    gen = torch.Generator().manual_seed(0)
    concepts = [_concept(gen, 1, 30), _concept(gen, 2, 30, input_rank=3), _concept(gen, 3, 4)]
    fused = solve_layers({"layer": _terms(concepts)}, ridge=0.0)["layer"]
    torch.testing.assert_close(fused.up @ fused.down, _lstsq(concepts), rtol=1e-9, atol=1e-9)
    assert fused.up.shape == (OUT, 6) and fused.down.shape == (6, D)  # rank <= 1 + 2 + 3, no SVD
    assert not fused.singular
    g = _terms(concepts).gram
    assert fused.condition == pytest.approx(float(torch.linalg.cond(g)), rel=1e-6)


def test_a_gram_no_input_fills_is_flagged_and_its_unreached_directions_get_no_update():
    gen = torch.Generator().manual_seed(1)
    concepts = [_concept(gen, 2, 20, input_rank=2), _concept(gen, 2, 20, input_rank=3)]  # 5 of 10 directions
    fused = solve_layers({"layer": _terms(concepts)}, ridge=0.0)["layer"]
    assert fused.singular and fused.condition == float("inf")
    delta = fused.up @ fused.down
    torch.testing.assert_close(delta, _lstsq(concepts), rtol=1e-8, atol=1e-8)  # the minimum-norm solution
    unreached = torch.linalg.svd(torch.cat([x for _, _, x in concepts], dim=1)).U[:, 5:]
    assert delta.abs().max() > 0.1 and (delta @ unreached).abs().max() < 1e-8


def test_the_ridge_is_relative_to_the_mean_eigenvalue_and_matches_ridge_least_squares():
    gen = torch.Generator().manual_seed(2)
    concepts = [_concept(gen, 2, 15), _concept(gen, 1, 15)]
    terms = _terms(concepts)
    ridge = 0.05
    fused = solve_layers({"layer": terms}, ridge=ridge)["layer"]
    shift = ridge * float(torch.trace(terms.gram)) / D
    torch.testing.assert_close(fused.up @ fused.down, _lstsq(concepts, shift), rtol=1e-9, atol=1e-9)
    assert (fused.up @ fused.down - _lstsq(concepts)).abs().max() > 1e-3  # the ridge did something


def test_layers_of_one_width_are_solved_together_each_as_if_alone():
    gen = torch.Generator().manual_seed(3)
    first = [_concept(gen, 1, 12), _concept(gen, 4, 12)]
    second = [_concept(gen, 2, 12), _concept(gen, 1, 12, input_rank=4)]
    fused = solve_layers({"a": _terms(first), "b": _terms(second)}, ridge=0.0)
    for name, concepts in (("a", first), ("b", second)):
        torch.testing.assert_close(fused[name].up @ fused[name].down, _lstsq(concepts), rtol=1e-9, atol=1e-9)
    assert fused["a"].down.shape[0] == 5 and fused["b"].down.shape[0] == 3  # padding cut off again


def test_float32_factors_are_solved_in_float64():
    gen = torch.Generator().manual_seed(4)
    concepts = [_concept(gen, 2, 25), _concept(gen, 2, 25)]
    terms = _terms(concepts)
    single = LayerTerms([u.float() for u in terms.ups], [p.float() for p in terms.projected], terms.gram)
    fused = solve_layers({"layer": single}, ridge=0.0)["layer"]
    assert fused.down.dtype == torch.float64
    torch.testing.assert_close(fused.up @ fused.down, _lstsq(concepts), rtol=1e-5, atol=1e-5)


def test_gram_takes_every_leading_position_as_a_column():
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(gram(x), sum(x[i, j, :, None].double() @ x[i, j, None, :].double()
                                            for i in range(3) for j in range(5)))


@pytest.mark.parametrize("rank", [1, 3])
def test_truncation_is_the_best_low_rank_approximation_in_balanced_factors(rank):
    gen = torch.Generator().manual_seed(5)
    up, down = torch.randn(OUT, 5, generator=gen), torch.randn(5, D, generator=gen)
    short_up, short_down, lost = truncate(up, down, rank)
    u, s, vh = torch.linalg.svd(up.double() @ down.double())
    torch.testing.assert_close(short_up @ short_down, (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=1e-9, atol=1e-9)
    assert lost == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-9)
    torch.testing.assert_close(short_up.T @ short_up, short_down @ short_down.T, rtol=1e-9, atol=1e-9)


def test_truncation_past_the_products_rank_loses_nothing():
    up, down = torch.randn(OUT, 3, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    short_up, short_down, lost = truncate(up, down, 8)
    assert short_up.shape[1] == 3 and lost < 1e-12
    torch.testing.assert_close(short_up @ short_down, up @ down, rtol=1e-10, atol=1e-10)
