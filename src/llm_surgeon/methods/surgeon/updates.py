"""The paper's correlated updates: the optimal change of the remaining weights when a set of
weights, or whole rows and columns, is removed (``(W + ΔW)_Q = 0`` at least loss under
``F = G ⊗ A``; the KKT solution is in the package docstring of :mod:`llm_surgeon.methods.surgeon`).

* :func:`correlated_update`: a set Q of single weights, exactly (dense in |Q|; for large Q see
  :func:`llm_surgeon.methods.surgeon.solver.prune_unstructured`);
* :func:`structured_update` / :func:`prune_structured`: rows R and columns C together.
"""

from __future__ import annotations

import torch

from llm_surgeon.methods.surgeon.linalg import (
    IndexLike,
    Tensor,
    _as_index,
    _check_shapes,
    _spd_solve,
    _work_dtype,
)

__all__ = ["correlated_update", "prune_structured", "structured_update"]


def _scatter_update(lam: Tensor, qi: Tensor, qj: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    """Ginv Λ Ainv with Λ holding λ_q at (qi_q, qj_q): ``Ginv[:, rows] @ (Λ[rows] @ Ainv)``."""
    rows, inv = torch.unique(qi, return_inverse=True)
    Lam = torch.zeros(rows.numel(), Ainv.shape[0], dtype=lam.dtype, device=lam.device)
    Lam.index_put_((inv, qj), lam, accumulate=True)
    return Ginv[:, rows] @ (Lam @ Ainv)


def correlated_update(W: Tensor, Ginv: Tensor, Ainv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Exact joint removal of the weights in ``mask`` (bool, shape of W): ``(ΔW, cost)``.

    With Q the masked positions (i_q, j_q), ``K_qp = Ginv[i_q, i_p] · Ainv[j_q, j_p]``,
    ``λ = K⁻¹ w_Q``:

        ΔW = −Σ_q λ_q Ginv[:, i_q] Ainv[j_q, :],      cost = ½ w_Qᵀ K⁻¹ w_Q = ½ w_Qᵀ λ.

    Dense in |Q| (a |Q|×|Q| Cholesky): use for |Q| up to a few thousand, else
    :func:`prune_unstructured`. ``(W + ΔW)_Q`` is zero up to rounding only.
    """
    _check_shapes(W, Ginv, Ainv)
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor of W's shape")
    wd = _work_dtype(W, Ginv, Ainv)
    Wc, Gi, Ai = W.to(wd), Ginv.to(wd), Ainv.to(wd)
    qi, qj = mask.nonzero().unbind(1)
    if qi.numel() == 0:
        return torch.zeros_like(W), W.new_zeros(())
    K = Gi[qi[:, None], qi[None, :]] * Ai[qj[:, None], qj[None, :]]
    wq = Wc[qi, qj]
    lam = _spd_solve(K, wq[:, None])[:, 0]
    dW = -_scatter_update(lam, qi, qj, Gi, Ai)
    return dW.to(W.dtype), (0.5 * torch.dot(wq, lam)).to(W.dtype)


def structured_update(W: Tensor, G: Tensor, A: Tensor, Ginv: Tensor, Ainv: Tensor,
                      rows: IndexLike = None, cols: IndexLike = None) -> tuple[Tensor, Tensor]:
    """Exact joint removal of the rows R and columns C of W: ``(ΔW, cost)``.

    Removing rows R and columns C constrains every element of those rows and columns. With
    ``P_R = Ginv[:, R] (Ginv[R, R])⁻¹`` (out×|R|, ``P_R[R] = I``) and
    ``P_C = (Ainv[C, C])⁻¹ Ainv[C, :]`` (|C|×in, ``P_C[:, C] = I``) the minimiser is

        W + ΔW = (I − P_R S_R) W (I − S_Cᵀ P_C)                (S_R, S_C: row/column selectors)
        ΔW = −P_R W[R, :] − W[:, C] P_C + P_R W[R, C] P_C,

    reducing to ``−Ginv[:, R] Ginv[R,R]⁻¹ W[R, :]`` (rows only) and
    ``−W[:, C] Ainv[C,C]⁻¹ Ainv[C, :]`` (columns only). Derivation: split rows into kept (1) and
    removed (2), columns likewise; only ΔW_11 is free and stationarity of ½ tr(ΔWᵀGΔWA) gives
    ``(G ΔW A)_11 = 0``, i.e.
    ``ΔW_11 = −G11⁻¹G12 ΔW_21 − ΔW_12 A21 A11⁻¹ − G11⁻¹G12 ΔW_22 A21 A11⁻¹``,
    with ΔW_12, ΔW_21, ΔW_22 fixed to −W; block inversion turns ``G11⁻¹G12`` into
    ``−Ginv12 Ginv22⁻¹`` and ``A21 A11⁻¹`` into ``−Ainv22⁻¹ Ainv21``, which is the formula above.
    ``Π_G = I − P_R S_R`` is a G-orthogonal projector and ``Π_A = I − S_Cᵀ P_C`` an A-orthogonal
    one (acting on the right), so the cost splits into orthogonal parts (``B_R = Ginv[R, R]``,
    ``B_C = Ainv[C, C]``):

        cost = ½ tr(B_R⁻¹ W_R A W_Rᵀ) + ½ tr(B_C⁻¹ Vᵀ G V),   V = (Π_G W)[:, C],

    rows first, then columns of the row-pruned matrix (equal to the inclusion-exclusion form
    ``structured_cost`` in ``tests/oracles.py``, which the tests check it against).
    The removed rows/columns of ``W + ΔW`` are zero up to rounding only; use
    :func:`prune_structured` for exact zeros.
    """
    _check_shapes(W, G, A)
    _check_shapes(W, Ginv, Ainv)
    R = _as_index(rows, W.shape[0], W.device, "rows")
    C = _as_index(cols, W.shape[1], W.device, "cols")
    wd = _work_dtype(W, G, A, Ginv, Ainv)
    Wc = W.to(wd)
    Wn = Wc
    cost = torch.zeros((), dtype=wd, device=W.device)
    if R.numel():
        Gi = Ginv.to(wd)
        WR = Wc[R]
        X = _spd_solve(Gi[R[:, None], R[None, :]], torch.cat([WR @ A.to(wd), Gi[R, :]], 1))
        cost = cost + 0.5 * torch.sum(X[:, : Wc.shape[1]] * WR)
        Wn = Wn - X[:, Wc.shape[1]:].T @ WR  # X[:, in:] = B_R⁻¹ Ginv[R, :] = P_Rᵀ
    if C.numel():
        Ai = Ainv.to(wd)
        V = Wn[:, C]
        X = _spd_solve(Ai[C[:, None], C[None, :]], torch.cat([(G.to(wd) @ V).T, Ai[C, :]], 1))
        cost = cost + 0.5 * torch.sum(X[:, : Wc.shape[0]] * V.T)
        Wn = Wn - V @ X[:, Wc.shape[0]:]  # X[:, out:] = B_C⁻¹ Ainv[C, :] = P_C
    return (Wn - Wc).to(W.dtype), cost.to(W.dtype)


def prune_structured(W: Tensor, G: Tensor, A: Tensor, Ginv: Tensor, Ainv: Tensor,
                     rows: IndexLike = None, cols: IndexLike = None) -> tuple[Tensor, Tensor]:
    """:func:`structured_update` applied: ``(W_new, cost)`` with the removed rows and columns
    exactly 0. Include rows/columns removed in earlier shots, or they may become nonzero."""
    dW, cost = structured_update(W, G, A, Ginv, Ainv, rows, cols)
    W_new = W + dW
    R = _as_index(rows, W.shape[0], W.device, "rows")
    C = _as_index(cols, W.shape[1], W.device, "cols")
    W_new[R] = 0
    W_new[:, C] = 0
    return W_new, cost
