"""Rerun §7 of the LoRA paper ("Understanding the low-rank updates") on a model this machine trains.

Four studies, one command each, each printing a table and writing JSON (and a PNG where the paper
has a figure) under --out:

  rank      validation loss by rank r in {1, 2, 4, 8, 64} for W_q / W_q,W_v / W_q,W_k,W_v,W_o,
            beside the base model and full fine-tuning with the same budget (paper Table 6);
  types     which weights to adapt at a fixed number of trainable parameters (Table 5);
  subspace  phi(A_r=8, A_r=64, i, j), between two seeds at r=64, and for random matrices
            (§7.2, Figures 3 and 4);
  deltaw    how Delta W relates to W: ||U^T W V||_F for the top-r directions of Delta W, of W and
            of a random matrix, and the amplification factor (§7.3, Table 7).

Every fine-tuning run is cached under --out/runs (its adapter and its validation loss), so the
studies share runs: `all` trains each configuration once.

Reading order: the math (subspace_similarity, projection_norm, ...) -> reading A and Delta W out
of a LoRA model -> the runs -> one function per study -> plots -> main().
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

# ---------------------------------------------------------------- the math of §7


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A (r, k) as the columns of a (k, r) matrix, ordered by
    singular value, largest first. §7.2: "we perform singular value decomposition and obtain the
    right-singular unitary matrices U_{A_r=8} and U_{A_r=64}"; A multiplies the input x (h = W0 x
    + B A x), so these directions live in the input space, R^k."""
    A = A.detach().double()
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)  # Vh: (min(r, k), k), rows by sigma desc
    return Vh.T  # (k, min(r, k))


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int, j: int) -> float:
    """phi = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), the normalized subspace similarity of §7.2
    (based on the Grassmann distance). U1, U2 have orthonormal columns. phi is 1 when one span
    contains the other and 0 when they are orthogonal; in between it is the mean squared cosine of
    the principal angles between the two subspaces, so it always lies in [0, 1]."""
    if not (1 <= i <= U1.size(1) and 1 <= j <= U2.size(1)):
        raise ValueError(f"i must be in [1, {U1.size(1)}] and j in [1, {U2.size(1)}]")
    M = U1[:, :i].T.double() @ U2[:, :j].double()  # (i, j): cosines between the basis vectors
    return float((M ** 2).sum() / min(i, j))


def similarity_grid(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for every i <= U1's columns and j <= U2's, as a (r1, r2) tensor (row i-1, column
    j-1): the heat maps of Figures 3 and 4. The same numbers as subspace_similarity, computed at
    once: ||U1_i^T U2_j||_F^2 is a 2-D prefix sum of the squared cosines."""
    M2 = (U1.T.double() @ U2.double()) ** 2  # (r1, r2)
    sums = M2.cumsum(0).cumsum(1)  # sums[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2
    i = torch.arange(1, M2.size(0) + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, M2.size(1) + 1, dtype=torch.float64)[None, :]
    return sums / torch.minimum(i, j)


def top_directions(M: torch.Tensor, r: int):
    """(U, V): the top-r left (d, r) and right (k, r) singular vectors of M (d, k)."""
    U, _, Vh = torch.linalg.svd(M.detach().double(), full_matrices=False)
    return U[:, :r], Vh[:r].T


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W V||_F: how much of W lies in the r-dimensional subspaces spanned by U's and V's
    columns (§7.3; the paper writes U^T W V^T with V holding the right-singular vectors as rows)."""
    return float(torch.linalg.matrix_norm(U.T @ W.detach().double() @ V))


def delta_w_vs_w(W: torch.Tensor, dW: torch.Tensor, r: int, seed: int = 0) -> dict:
    """Table 7 for one weight matrix: ||U^T W V||_F with U, V the top-r singular directions of
    Delta W, of W itself and of a random Gaussian matrix; ||W||_F, ||Delta W||_F and the
    amplification factor ||Delta W||_F / ||U^T W V||_F for Delta W's directions (§7.3: "Delta W
    amplifies directions not emphasized in W")."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(W.shape, generator=g, dtype=torch.float64)
    proj = {name: projection_norm(W, *top_directions(M, r))
            for name, M in (("delta_w", dW), ("w", W), ("random", R))}
    dw_norm = float(torch.linalg.matrix_norm(dW.detach().double()))
    return {"r": r, "proj_delta_w": proj["delta_w"], "proj_w": proj["w"],
            "proj_random": proj["random"],
            "norm_w": float(torch.linalg.matrix_norm(W.detach().double())),
            "norm_delta_w": dw_norm, "amplification": dw_norm / proj["delta_w"]}
