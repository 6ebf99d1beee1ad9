"""Semi-structured N:M sparsity, independent of any method: masks, group costs and checks.

"N:M" keeps at most N nonzeros in every group of M consecutive input columns of every row of a
weight ``W`` (out, in) ("2:4" keeps 2 of every 4). Only the first ``n_groupable_cols`` columns
form groups (the rest, e.g. an appended bias column, are never removed). Used by the global
threshold (:mod:`llm_surgeon.methods.threshold`), the layer-wise methods and the final check.
"""

from __future__ import annotations

import torch

__all__ = ["assert_nm", "check_nm", "nm_group_costs", "nm_mask"]

Tensor = torch.Tensor


def _nm_width(x: Tensor, n: int, m: int, n_groupable_cols: int | None) -> int:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (out, in) tensor, got shape {tuple(x.shape)}")
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2 or n >= m:
        raise ValueError(f"N:M needs integers 1 <= N < M, got N={n}, M={m}")
    width = x.shape[1] if n_groupable_cols is None else int(n_groupable_cols)
    if not 0 <= width <= x.shape[1]:
        raise ValueError(f"n_groupable_cols={width} outside [0, {x.shape[1]}]")
    if width % m:
        raise ValueError(f"M={m} does not divide the groupable width {width}")
    return width


def nm_mask(scores: Tensor, n: int, m: int, *, n_groupable_cols: int | None = None,
            groups: Tensor | None = None) -> Tensor:
    """N:M removal mask (True = remove): in every group of M consecutive input columns of every
    row, the M−N entries with the lowest score (N kept: "2:4" keeps 2 of every 4).

    Only the first ``n_groupable_cols`` columns (default: all) form groups; the rest (e.g. an
    appended bias column: pass ``W.shape[1] − 1``) are never removed. Ties go to the lower
    column index. ``groups`` (bool, shape (out, n_groupable_cols // M)) restricts the removal to
    the selected groups (for shots that prune only some groups).
    Raises ValueError if M does not divide the groupable width, N >= M or N < 1.
    """
    width = _nm_width(scores, n, m, n_groupable_cols)
    if bool(torch.isnan(scores).any()):
        raise ValueError("N:M scores contain NaN")
    out = scores.shape[0]
    S = scores[:, :width].reshape(out, width // m, m)
    order = torch.argsort(S, dim=-1, stable=True)[..., : m - n]
    mk = torch.zeros(S.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)
    if groups is not None:
        if groups.shape != S.shape[:2]:
            raise ValueError(f"groups must have shape {tuple(S.shape[:2])}")
        mk &= groups.to(torch.bool)[..., None]
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask[:, :width] = mk.reshape(out, width)
    return mask


def nm_group_costs(scores: Tensor, n: int, m: int, *,
                   n_groupable_cols: int | None = None) -> Tensor:
    """Per-group cost (shape (out, n_groupable_cols // M)): the sum of the M−N lowest scores in
    each group, i.e. the cost of making the group N:M assuming independent elements (as the
    released code ranks groups)."""
    width = _nm_width(scores, n, m, n_groupable_cols)
    S = scores[:, :width].reshape(scores.shape[0], width // m, m)
    return torch.sort(S, dim=-1).values[..., : m - n].sum(-1)


def _nm_counts(x: Tensor, n: int, m: int, n_groupable_cols: int | None) -> Tensor:
    width = _nm_width(x, n, m, n_groupable_cols)
    nz = x[:, :width] != 0
    return nz.reshape(x.shape[0], width // m, m).sum(-1)


def check_nm(x: Tensor, n: int, m: int, *, n_groupable_cols: int | None = None) -> bool:
    """True iff every group of M consecutive columns (within the first ``n_groupable_cols``) of
    every row has at most N nonzeros. ``x`` is a weight or a *keep* mask (True = kept); to check
    a removal mask pass ``~mask``."""
    return bool((_nm_counts(x, n, m, n_groupable_cols) <= n).all())


def assert_nm(x: Tensor, n: int, m: int, *, n_groupable_cols: int | None = None,
              name: str = "layer") -> None:
    """Like :func:`check_nm` but raises ValueError naming the first offending row and group."""
    counts = _nm_counts(x, n, m, n_groupable_cols)
    bad = (counts > n).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(f"{name}: not {n}:{m}: row {r}, columns {g * m}..{g * m + m - 1} have "
                         f"{int(counts[r, g])} nonzeros ({bad.shape[0]} bad groups in total)")

