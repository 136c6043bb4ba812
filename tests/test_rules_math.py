"""The update rules' pure functions against their mathematical definitions."""
import math

import pytest
import torch

from balora_diffusion.rules import (balanced_projection, hard_imbalance_projection, imbalance_step,
                                    precondition_grads)
from balora_diffusion.rules.balora import balance_with_gauge
from balora_diffusion.rules.balora_reference import balanced_projection_reference
from balora_diffusion.rules.ilora_reference import imbalance_step_reference
from balora_diffusion.rules.scaled_reference import precondition_grads_reference

# (batch, r, m, n): wide, tall, square-ish, unbatched
SHAPES = [((6,), 4, 20, 30), ((3,), 8, 40, 12), ((2, 2), 2, 5, 5), ((), 4, 16, 24)]


def make_pair(batch, r, m, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, r, n, generator=g, dtype=torch.float64)
    B = torch.randn(*batch, m, r, generator=g, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def gram_A(A):
    return A.double() @ A.double().mT


def gram_B(B):
    return B.double().mT @ B.double()


def diag_part(M):
    return torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1))


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_preserves_product_and_balances_to_singular_values(shape):
    A, B = make_pair(*shape)
    A2, B2 = balanced_projection(A, B)
    assert A2.dtype == B2.dtype == torch.float32
    product = B.double() @ A.double()
    flat_new = (B2.double() @ A2.double()).reshape(-1, *product.shape[-2:])
    for new, old in zip(flat_new, product.reshape(-1, *product.shape[-2:])):
        assert rel_err(new, old) <= 1e-5
    AA, BB = gram_A(A2), gram_B(B2)
    sigma = torch.linalg.svdvals(product)[..., : shape[1]]
    assert rel_err(AA, BB) < 1e-5
    assert rel_err(AA, torch.diag_embed(sigma)) < 1e-5
    assert (AA - diag_part(AA)).abs().max() < 1e-5 * sigma.max()


def test_projection_of_ill_conditioned_and_strongly_imbalanced_pairs():
    """As after a few steps from peft's init: A of order 1 with spread-out rows, B of order 1e-4."""
    A, B = make_pair((6,), 4, 20, 30, seed=19)
    A = A * torch.tensor([1.0, 1e-1, 1e-2, 1e-3]).unsqueeze(-1)    # cond(A) ~ 1e3
    B = 1e-4 * B
    A2, B2 = balanced_projection(A, B)
    for k in range(6):
        assert rel_err(B2[k] @ A2[k], B[k] @ A[k]) <= 1e-5
    assert rel_err(gram_A(A2), gram_B(B2)) < 1e-5
    Ar, Br = balanced_projection_reference(A.double(), B.double())
    assert rel_err(A2, Ar) < 1e-5 and rel_err(B2, Br) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_is_idempotent_without_sign_flips(shape):
    A2, B2 = balanced_projection(*make_pair(*shape, seed=1))
    A3, B3 = balanced_projection(A2, B2)
    assert rel_err(A3, A2) < 1e-5 and rel_err(B3, B2) < 1e-5
    # every component keeps its sign: row i of A3 points along row i of A2
    assert ((A3 * A2).sum(-1) > 0).all() and ((B3 * B2).sum(-2) > 0).all()


def test_alignment_picks_the_sign_closest_to_the_input():
    A, B = make_pair((32,), 4, 20, 30, seed=2)
    A2, B2 = balanced_projection(A, B)
    agreement = (A2 * A).sum(-1) + (B2 * B).sum(-2)
    assert (agreement >= 0).all()
    Au, Bu = balanced_projection(A, B, align=False)
    # the raw projection differs from the aligned one by a sign per component, and some signs do differ
    sign = torch.sign((Au * A2).sum(-1))
    torch.testing.assert_close(Au, sign.unsqueeze(-1) * A2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Bu, B2 * sign.unsqueeze(-2), atol=1e-5, rtol=1e-5)
    assert (sign < 0).any()
    torch.testing.assert_close(Bu @ Au, B @ A, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_matches_full_svd_reference(shape):
    A, B = make_pair(*shape, seed=3)
    A2, B2 = balanced_projection(A, B)
    Ar, Br = balanced_projection_reference(A.double(), B.double())
    assert rel_err(A2, Ar) < 1e-5 and rel_err(B2, Br) < 1e-5


def test_unaligned_projection_matches_reference_up_to_signs():
    A, B = make_pair((8,), 4, 20, 30, seed=4)
    Au, Bu = balanced_projection(A, B, align=False)
    Ar, Br = balanced_projection_reference(A.double(), B.double(), align=False)
    sign = torch.sign((Au.double() * Ar).sum(-1))
    assert rel_err(Au, sign.unsqueeze(-1) * Ar) < 1e-5
    assert rel_err(Bu, Br * sign.unsqueeze(-2)) < 1e-5


def test_zero_and_rank_deficient_pairs_are_returned_unchanged():
    A, B = make_pair((4,), 4, 20, 30, seed=5)
    B[0] = 0                                   # peft's init
    B[1, :, 3] = 0                             # product of rank 3 < r
    B[2, :, 2] = B[2, :, 1] * 1e-9             # numerically rank-deficient
    A2, B2 = balanced_projection(A, B)
    for k in range(3):
        assert torch.equal(A2[k], A[k]) and torch.equal(B2[k], B[k])
    assert not torch.equal(A2[3], A[3])        # the healthy element of the batch is still projected
    assert rel_err(gram_A(A2[3]), gram_B(B2[3])) < 1e-5
    Ar, Br = balanced_projection_reference(A, B)
    assert rel_err(A2, Ar) < 1e-5 and rel_err(B2, Br) < 1e-5


def test_rank_above_a_dimension_is_left_alone():
    A, B = make_pair((2,), 6, 4, 30, seed=6)   # r = 6 > m = 4: B @ A has rank <= 4
    A2, B2 = balanced_projection(A, B)
    assert torch.equal(A2, A) and torch.equal(B2, B)


def test_gauge_change_maps_old_factors_to_new():
    A, B = make_pair((5,), 4, 20, 30, seed=7)
    B[0] = 0
    out = balance_with_gauge(A, B)
    G, G_inv = out.G, out.G_inv
    torch.testing.assert_close(G @ A.double(), out.A.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.double() @ G_inv, out.B.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(G @ G_inv, torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-9, rtol=0)
    assert out.ok.tolist() == [False, True, True, True, True]
    assert torch.equal(G[0], torch.eye(4, dtype=torch.float64))


def test_hard_ilora_projection_reaches_the_target_ratio():
    A, B = make_pair((4,), 4, 20, 30, seed=8)
    rho = 4 / 20
    A2, B2 = hard_imbalance_projection(A, B)
    assert rel_err(B2 @ A2, B @ A) <= 1e-5
    assert rel_err(gram_A(A2), rho * gram_B(B2)) < 1e-5
    c = math.sqrt(rho)
    Ar, Br_scaled = balanced_projection_reference(A.double(), c * B.double())
    assert rel_err(A2, Ar) < 1e-5 and rel_err(B2, Br_scaled / c) < 1e-5
    Z = torch.zeros_like(B)
    A3, B3 = hard_imbalance_projection(A, Z, rho=0.3)
    assert torch.equal(A3, A) and torch.equal(B3, Z)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [None, 0.7])
def test_ilora_step_is_a_gradient_step_on_the_imbalance_energy(shape, rho):
    A, B = make_pair(*shape, seed=9, dtype=torch.float64)
    A, B = 0.3 * A, 0.3 * B
    A2, B2 = imbalance_step(A, B, lr=0.05, lam=2.0, rho=rho)
    Ar, Br = imbalance_step_reference(A, B, lr=0.05, lam=2.0, rho=rho)
    torch.testing.assert_close(A2, Ar, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(B2, Br, atol=1e-12, rtol=1e-10)
    A32, B32 = imbalance_step(A.float(), B.float(), lr=0.05, lam=2.0, rho=rho)
    assert A32.dtype == torch.float32 and rel_err(A32, Ar) < 1e-5 and rel_err(B32, Br) < 1e-5


def test_ilora_step_decreases_the_energy_and_fixes_its_target():
    A, B = make_pair((4,), 4, 20, 30, seed=10)

    def energy(a, b):
        return ((gram_A(a) - 4 / 20 * gram_B(b)) ** 2).sum().item()

    A2, B2 = imbalance_step(A, B, lr=1e-4, lam=1.0)
    assert energy(A2, B2) < energy(A, B)
    At, Bt = hard_imbalance_projection(A, B)   # already at A A^T = rho B^T B
    A3, B3 = imbalance_step(At, Bt, lr=1e-2, lam=1.0)
    assert rel_err(A3, At) < 1e-5 and rel_err(B3, Bt) < 1e-5


@pytest.mark.parametrize("reg", [0.0, 1e-3, 10.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_preconditioner_solves_its_damped_normal_equations(shape, reg):
    A, B = make_pair(*shape, seed=11)
    gA, gB = make_pair(*shape, seed=12)
    new_A, new_B = precondition_grads(A, B, gA, gB, reg)
    eye = torch.eye(shape[1], dtype=torch.float64)
    # (B^T B + reg I) new_A = grad_A and new_B (A A^T + reg I) = grad_B
    torch.testing.assert_close((gram_B(B) + reg * eye) @ new_A.double(), gA.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_B.double() @ (gram_A(A) + reg * eye), gB.double(), atol=1e-4, rtol=1e-4)
    ref_A, ref_B = precondition_grads_reference(A, B, gA, gB, reg)
    assert rel_err(new_A, ref_A) < 1e-5 and rel_err(new_B, ref_B) < 1e-5


def test_preconditioner_without_damping_survives_zero_B():
    A, B = make_pair((3,), 4, 20, 30, seed=13)
    gA, gB = make_pair((3,), 4, 20, 30, seed=14)
    B[0] = 0
    gA[0] = 0                                  # B = 0 makes grad_A = s B^T dW = 0
    new_A, new_B = precondition_grads(A, B, gA, gB, reg=0.0)
    assert torch.isfinite(new_A).all() and torch.isfinite(new_B).all()
    assert torch.equal(new_A[0], torch.zeros_like(new_A[0]))
    ref_A, ref_B = precondition_grads_reference(A, B, gA, gB, 0.0)
    assert rel_err(new_A, ref_A) < 1e-5 and rel_err(new_B, ref_B) < 1e-5


def _fp32_of(A, B, gA, gB):
    return {
        "projection": balanced_projection(A, B),
        "hard_ilora": hard_imbalance_projection(A, B),
        "ilora": imbalance_step(A, B, lr=0.01, lam=1.0),
        "scaled": precondition_grads(A, B, gA, gB, reg=1e-3),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype_and_match_fp32(dtype):
    A, B = make_pair((4,), 4, 20, 30, seed=15, dtype=dtype)
    gA, gB = make_pair((4,), 4, 20, 30, seed=16, dtype=dtype)
    half = _fp32_of(A, B, gA, gB)
    # fp32 on the same (rounded) inputs: the only difference allowed is the output's rounding
    full = _fp32_of(A.float(), B.float(), gA.float(), gB.float())
    eps = torch.finfo(dtype).eps
    for name in half:
        for h, f in zip(half[name], full[name]):
            assert h.dtype == dtype, name
            torch.testing.assert_close(h.float(), f, rtol=eps, atol=eps * f.abs().max().item(), msg=name)


def test_batched_calls_equal_looped_calls():
    A, B = make_pair((5,), 4, 20, 30, seed=17)
    gA, gB = make_pair((5,), 4, 20, 30, seed=18)
    B[1] = 0
    batched = _fp32_of(A, B, gA, gB)
    looped = [_fp32_of(A[k], B[k], gA[k], gB[k]) for k in range(5)]
    for name, outs in batched.items():
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, torch.stack([lp[name][i] for lp in looped]),
                                       atol=1e-6, rtol=1e-5, msg=name)


def test_mismatched_shapes_are_rejected():
    A, B = make_pair((), 4, 20, 30)
    with pytest.raises(ValueError, match="A .* and B"):
        balanced_projection(A, B[:, :3])
    with pytest.raises(ValueError):
        imbalance_step(A.unsqueeze(0), B, lr=0.1, lam=1.0)
