"""The paper's closed-form removal costs under ``F = G ⊗ A`` (the others free to move).

With the inverses ``Ginv = G⁻¹``, ``Ainv = A⁻¹`` of the damped factors, removing

* one weight (i, j) costs ``½ W_ij² / ([Ginv]_ii [Ainv]_jj)``       (:func:`element_costs`),
* one output row r costs ``½ w_rᵀ A w_r / [Ginv]_rr``                  (:func:`row_costs`),
* one input column c costs ``½ w_cᵀ G w_c / [Ainv]_cc``                (:func:`column_costs`),
* a block of rows or columns (a head, a channel) the trace forms of :func:`row_group_costs`
  and :func:`column_group_costs`.

These rank candidates; the matching updates are in :mod:`.updates` and :mod:`.solver`. (The
remove-only baselines' costs, without the others moving, are ``obd_*`` in
:mod:`llm_surgeon.methods.obd`.)
"""

from __future__ import annotations

import torch

from llm_surgeon.methods.surgeon.linalg import Tensor, _check_shapes, _spd_solve, _work_dtype

__all__ = ["column_costs", "column_group_costs", "element_costs", "row_costs", "row_group_costs"]


def element_costs(W: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    """OBS cost of removing each single weight (others free to move), shape of ``W``:

        cost_ij = ½ W_ij² / ([Ginv]_ii [Ainv]_jj).
    """
    _check_shapes(W, Ginv, Ainv)
    den = torch.outer(torch.diagonal(Ginv), torch.diagonal(Ainv)).to(W.dtype)
    return 0.5 * W.square() / den


def row_costs(W: Tensor, A: Tensor, Ginv: Tensor) -> Tensor:
    """Cost of removing each output row r alone (shape (out,)):  ½ w_rᵀ A w_r / [Ginv]_rr."""
    _check_shapes(W, Ginv, A)
    return 0.5 * ((W @ A.to(W.dtype)) * W).sum(1) / torch.diagonal(Ginv).to(W.dtype)


def column_costs(W: Tensor, G: Tensor, Ainv: Tensor) -> Tensor:
    """Cost of removing each input column c alone (shape (in,)):  ½ w_cᵀ G w_c / [Ainv]_cc,
    with w_c = W[:, c]."""
    _check_shapes(W, G, Ainv)
    return 0.5 * ((G.to(W.dtype) @ W) * W).sum(0) / torch.diagonal(Ainv).to(W.dtype)


def _group_index(groups: int | Tensor, n: int, device: torch.device) -> Tensor:
    if isinstance(groups, int):
        if groups < 1 or n % groups:
            raise ValueError(f"group size {groups} does not divide {n}")
        return torch.arange(n, device=device).view(-1, groups)
    g = torch.as_tensor(groups, device=device).long()
    if g.ndim != 2 or g.numel() == 0:
        raise ValueError("groups must be an int group size or an (n_groups, size) index tensor")
    if int(g.min()) < 0 or int(g.max()) >= n:
        raise ValueError(f"group indices must lie in [0, {n})")
    return g


def row_group_costs(W: Tensor, A: Tensor, Ginv: Tensor, groups: int | Tensor) -> Tensor:
    """Cost of removing each group of rows R_g alone (e.g. an attention head), shape (n_groups,):

        cost_g = ½ tr( (Ginv[R_g, R_g])⁻¹ W[R_g, :] A W[R_g, :]ᵀ ).

    ``groups``: a group size (consecutive blocks of rows) or an (n_groups, size) index tensor.
    Batched over groups; group size 1 gives :func:`row_costs`.
    """
    _check_shapes(W, Ginv, A)
    idx = _group_index(groups, W.shape[0], W.device)
    wd = _work_dtype(W, A, Ginv)
    Wc = W.to(wd)
    WA = Wc @ A.to(wd)
    M = WA[idx] @ Wc[idx].transpose(1, 2)  # (ng, g, g) = W_g A W_gᵀ
    B = Ginv.to(wd)[idx[:, :, None], idx[:, None, :]]  # (ng, g, g)
    X = _spd_solve(B, M)
    return (0.5 * torch.diagonal(X, dim1=1, dim2=2).sum(-1)).to(W.dtype)


def column_group_costs(W: Tensor, G: Tensor, Ainv: Tensor, groups: int | Tensor) -> Tensor:
    """Cost of removing each group of columns C_g alone, shape (n_groups,):

        cost_g = ½ tr( W[:, C_g]ᵀ G W[:, C_g] (Ainv[C_g, C_g])⁻¹ ).

    ``groups``: a group size (consecutive blocks of columns) or an (n_groups, size) index tensor.
    """
    _check_shapes(W, G, Ainv)
    idx = _group_index(groups, W.shape[1], W.device)
    wd = _work_dtype(W, G, Ainv)
    Wc = W.to(wd)
    GW = G.to(wd) @ Wc
    M = GW[:, idx].permute(1, 2, 0) @ Wc[:, idx].permute(1, 0, 2)  # (ng, g, g) = W_gᵀ G W_g
    B = Ainv.to(wd)[idx[:, :, None], idx[:, None, :]]
    X = _spd_solve(B, M)  # B⁻¹ M; tr(M B⁻¹) = tr(B⁻¹ M)
    return (0.5 * torch.diagonal(X, dim1=1, dim2=2).sum(-1)).to(W.dtype)
