"""The paper's closed-form removal costs under ``F = G ⊗ A`` (the others free to move).

With the inverses ``Ginv = G⁻¹``, ``Ainv = A⁻¹`` of the damped factors, removing

* one weight (i, j) costs ``½ W_ij² / ([Ginv]_ii [Ainv]_jj)``       (:func:`element_costs`),
* one output row r costs ``½ w_rᵀ A w_r / [Ginv]_rr``                  (:func:`row_costs`),
* one input column c costs ``½ w_cᵀ G w_c / [Ainv]_cc``                (:func:`column_costs`),
* a block of rows or columns (a head, a channel) the trace forms of :func:`row_group_costs`
  and :func:`column_group_costs`,
* a set S of weights within one row i (the M−N removed from an N:M group, chosen jointly)
  ``½ w_Sᵀ (Ainv[S,S])⁻¹ w_S / [Ginv]_ii``  (:func:`nm_subset_costs`,
  :func:`nm_group_subset_costs`).

These rank candidates; the matching updates are in :mod:`.updates` and :mod:`.solver`. (The
remove-only baselines' costs, without the others moving, are ``obd_*`` in
:mod:`llm_surgeon.methods.obd`.)
"""

from __future__ import annotations

import itertools
import math

import torch

from llm_surgeon.methods.surgeon.linalg import Tensor, _check_shapes, _spd_solve, _work_dtype
from llm_surgeon.settings import MAX_NM_SUBSETS

__all__ = ["column_costs", "column_group_costs", "element_costs", "nm_group_subset_costs",
           "nm_subset_costs", "nm_subsets", "row_costs", "row_group_costs"]


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


def nm_subsets(n: int, m: int) -> Tensor:
    """Every set of M−N of the M columns of a group, as a (C(M, M−N), M−N) int64 tensor in
    lexicographic order (``itertools.combinations``). ValueError if 1 <= N < M fails or there
    are more than ``MAX_NM_SUBSETS`` of them."""
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2 or n >= m:
        raise ValueError(f"N:M needs integers 1 <= N < M, got N={n}, M={m}")
    if math.comb(m, m - n) > MAX_NM_SUBSETS:
        raise ValueError(f"{n}:{m} has {math.comb(m, m - n)} subsets of {m - n} per group, more "
                         f"than the {MAX_NM_SUBSETS} a joint N:M choice enumerates")
    return torch.tensor(list(itertools.combinations(range(m), m - n)), dtype=torch.long)


def _nm_inverse_blocks(Ainv: Tensor, subsets: Tensor, m: int, width: int) -> Tensor:
    """(Ainv[S,S])⁻¹ for every group (M consecutive columns among the first ``width``) and
    every subset S: shape (width // M, n_subsets, M−N, M−N), computed in fp64."""
    idx = torch.arange(width, device=Ainv.device).view(width // m, m)
    cols = idx[:, subsets.to(Ainv.device)]  # (groups, subsets, k): the columns of each S
    # gather the small blocks first, then fp64 (not a full fp64 copy of Ainv)
    B = Ainv[cols[..., :, None], cols[..., None, :]].double()  # (groups, subsets, k, k)
    eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand(B.shape)
    return _spd_solve(B, eye.contiguous())


def nm_subset_costs(W: Tensor, Ginv: Tensor, Ainv: Tensor, n: int, m: int, *,
                    n_groupable_cols: int | None = None,
                    _blocks: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Exact OBS cost of removing each set S of M−N weights of each N:M group, every other
    weight (of every row) free to move: shape (out, width // M, C(M, M−N)), subsets in the
    order of :func:`nm_subsets`.

    For S within row i the S×S block of ``Ginv ⊗ Ainv`` is ``[Ginv]_ii · Ainv[S,S]``, so

        cost(S) = ½ w_Sᵀ (Ainv[S,S])⁻¹ w_S / [Ginv]_ii,

    the OBS cost of a set (``½ w_Qᵀ K⁻¹ w_Q``, :mod:`llm_surgeon.methods.surgeon`) with
    Q = S. With M−N = 1 it is :func:`element_costs`. Only the first ``n_groupable_cols``
    columns (default: all; M must divide it) form groups: a bias column never does.
    """
    _check_shapes(W, Ginv, Ainv)
    width = W.shape[1] if n_groupable_cols is None else int(n_groupable_cols)
    if not 0 <= width <= W.shape[1] or width % m:
        raise ValueError(f"M={m} must divide the groupable width {width} (<= {W.shape[1]})")
    if _blocks is None:  # (subsets, their inverse blocks): computed once by the caller
        subsets = nm_subsets(n, m)
        inv = _nm_inverse_blocks(Ainv, subsets, m, width)
    else:
        subsets, inv = _blocks
    wd = _work_dtype(W, Ginv, Ainv)
    Wg = W[:, :width].to(wd).reshape(W.shape[0], width // m, m)
    Ws = Wg[:, :, subsets.to(W.device)]  # (out, groups, subsets, k)
    quad = (torch.einsum("rgsa,gsab->rgsb", Ws, inv.to(wd)) * Ws).sum(-1)
    return 0.5 * quad / torch.diagonal(Ginv).to(wd)[:, None, None]


def nm_group_subset_costs(W: Tensor, Ginv: Tensor, Ainv: Tensor, n: int, m: int, *,
                          n_groupable_cols: int | None = None,
                          chunk_elements: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """The jointly cheapest way to make every N:M group N:M: of all C(M, M−N) sets S of M−N
    weights of a group (M consecutive columns of row i) the one of least

        cost(S) = ½ w_Sᵀ (Ainv[S,S])⁻¹ w_S / [Ginv]_ii       (:func:`nm_subset_costs`),

    ties to the first in the order of :func:`nm_subsets`. Returns ``(cost, mask)``: the least
    cost of each group, shape (out, width // M), in the work dtype (fp64 if any input is, else
    fp32), and the removal mask of the chosen sets (bool, shape of W, True = removed; columns
    past the first ``n_groupable_cols`` never). The small inverses (Ainv[S,S])⁻¹ are computed
    once per layer (they do not depend on the row); rows go in chunks of about
    ``chunk_elements`` gathered weights, so memory stays bounded on wide layers.
    """
    _check_shapes(W, Ginv, Ainv)
    width = W.shape[1] if n_groupable_cols is None else int(n_groupable_cols)
    if not 0 <= width <= W.shape[1] or width % m:
        raise ValueError(f"M={m} must divide the groupable width {width} (<= {W.shape[1]})")
    subsets = nm_subsets(n, m)
    inv = _nm_inverse_blocks(Ainv, subsets, m, width)
    out, groups = W.shape[0], width // m
    wd = _work_dtype(W, Ginv, Ainv)
    cost = torch.empty(out, groups, dtype=wd, device=W.device)
    removed = torch.zeros(out, groups, m, dtype=torch.bool, device=W.device)
    chosen_cols = subsets.to(W.device)
    rows = max(1, chunk_elements // max(1, groups * subsets.numel()))
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        c = nm_subset_costs(W[r0:r1], Ginv[r0:r1, r0:r1], Ainv, n, m, n_groupable_cols=width,
                            _blocks=(subsets, inv))
        best, arg = c.min(-1)
        cost[r0:r1] = best
        removed[r0:r1].scatter_(-1, chosen_cols[arg], True)
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    mask[:, :width] = removed.reshape(out, width)
    return cost, mask
