"""studies.py: the §7 math on constructed cases, and the studies end to end on a tiny model."""
import math

import pytest
import torch

from studies import (delta_w_vs_w, projection_norm, right_singular_vectors, similarity_grid,
                     subspace_similarity, top_directions)


def orthonormal(k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))[0]


# ---------------------------------------------------------------- subspace similarity (§7.2)

def test_phi_is_one_for_identical_subspaces():
    U = orthonormal(32, 8, 0)
    for i in range(1, 9):
        assert subspace_similarity(U, U, i, i) == pytest.approx(1.0)
    # A different basis of the same span: phi depends on the subspace, not the basis.
    Q = orthonormal(8, 8, 1)
    assert subspace_similarity(U, U @ Q, 8, 8) == pytest.approx(1.0)
    # A subspace inside a bigger one is fully contained: phi = 1 (normalized by min(i, j)).
    assert subspace_similarity(U, U, 3, 8) == pytest.approx(1.0)


def test_phi_is_zero_for_orthogonal_subspaces():
    Q = orthonormal(32, 16, 2)
    assert subspace_similarity(Q[:, :8], Q[:, 8:], 8, 8) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(Q[:, :8], Q[:, 8:], 3, 5) == pytest.approx(0.0, abs=1e-12)


def test_phi_hand_computed_case():
    # span{e1, e2} against span{(e1 + e3)/sqrt2}: squared cosine 1/2, min(i, j) = 1.
    U1 = torch.eye(4, dtype=torch.float64)[:, :2]
    U2 = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64) / math.sqrt(2)
    assert subspace_similarity(U1, U2, 2, 1) == pytest.approx(0.5)
    assert subspace_similarity(U1, U2, 1, 1) == pytest.approx(0.5)
    # span{e1} against span{e2}: orthogonal.
    assert subspace_similarity(U1[:, 1:], U2, 1, 1) == pytest.approx(0.0)


def test_phi_always_in_unit_interval_and_grid_matches_pointwise():
    for seed in range(5):
        U1, U2 = orthonormal(16, 8, seed), orthonormal(16, 12, seed + 100)
        grid = similarity_grid(U1, U2)
        assert grid.shape == (8, 12)
        assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0 + 1e-12
        for i, j in [(1, 1), (3, 7), (8, 12), (8, 1)]:
            assert float(grid[i - 1, j - 1]) == pytest.approx(subspace_similarity(U1, U2, i, j))
    # A full basis contains everything: phi = 1 against it, whatever the other subspace.
    assert torch.allclose(similarity_grid(U1, orthonormal(16, 16, 9))[:, -1],
                          torch.ones(8, dtype=torch.float64))


def test_phi_rejects_out_of_range_indices():
    U = orthonormal(8, 4, 0)
    with pytest.raises(ValueError):
        subspace_similarity(U, U, 0, 1)
    with pytest.raises(ValueError):
        subspace_similarity(U, U, 1, 5)


def test_right_singular_vectors_of_A_span_its_row_space_in_order():
    # A = diag(3, 1) on the first two input coordinates of R^5: the right-singular vectors are
    # e1 (sigma 3) then e2 (sigma 1), up to sign.
    A = torch.zeros(2, 5)
    A[0, 0], A[1, 1] = 1.0, 3.0
    V = right_singular_vectors(A)
    assert V.shape == (5, 2)
    assert abs(float(V[1, 0])) == pytest.approx(1.0) and abs(float(V[0, 1])) == pytest.approx(1.0)
    # The span is A's row space, whatever B multiplies it by: phi with A's rows is 1.
    rows = torch.linalg.qr(A.T.double())[0]
    assert subspace_similarity(V, rows, 2, 2) == pytest.approx(1.0)


# ---------------------------------------------------------------- Delta W against W (§7.3)

def test_projection_norm_matches_hand_computation():
    W = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    e = torch.eye(3, dtype=torch.float64)
    # U^T W V picks the block of W in rows U, columns V.
    assert projection_norm(W, e[:, :1], e[:, :1]) == pytest.approx(1.0)
    assert projection_norm(W, e[:, :2], e[:, :2]) == pytest.approx(math.sqrt(1 + 4 + 9 + 16))
    assert projection_norm(W, e[:, 2:], e[:, :2]) == pytest.approx(0.0)
    # A rotated direction: u = (e1 + e2)/sqrt2, v = e2 -> (2 + 4)/sqrt2.
    u = (e[:, :1] + e[:, 1:2]) / math.sqrt(2)
    assert projection_norm(W, u, e[:, 1:2]) == pytest.approx(6 / math.sqrt(2))
    # Its own top-r directions give the norm of W's top-r singular values.
    s = torch.linalg.svdvals(W)
    assert projection_norm(W, *top_directions(W, 2)) == pytest.approx(float(s[:2].norm()))


def test_delta_w_vs_w_on_a_constructed_update():
    # W is diagonal with large values on coordinates 0..3 and tiny ones elsewhere; Delta W is a
    # rank-2 update on coordinates 6, 7, which W barely has: the amplification factor is large,
    # W's own directions project to its top singular values, Delta W's to W's tiny block.
    d = 8
    W = torch.diag(torch.tensor([10.0, 9.0, 8.0, 7.0, 0.5, 0.4, 0.3, 0.2], dtype=torch.float64))
    dW = torch.zeros(d, d, dtype=torch.float64)
    dW[6, 6], dW[7, 7] = 2.0, 1.0
    out = delta_w_vs_w(W, dW, r=2)
    assert out["proj_w"] == pytest.approx(math.hypot(10.0, 9.0))
    assert out["proj_delta_w"] == pytest.approx(math.hypot(0.3, 0.2))
    assert out["norm_w"] == pytest.approx(float(W.norm()))
    assert out["norm_delta_w"] == pytest.approx(math.sqrt(5))
    assert out["amplification"] == pytest.approx(math.sqrt(5) / math.hypot(0.3, 0.2))
    assert 0 <= out["proj_random"] <= out["proj_w"]
