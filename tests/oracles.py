"""Oracles: closed forms of the LLM Surgeon math that only the tests use, to check the library's
vectorised costs and updates against (each one checked itself against brute force in
``tests/test_surgeon_math.py``). Moved here from ``methods/surgeon.py``; the conventions and the
KKT solution are in :mod:`llm_surgeon.methods.surgeon`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_surgeon.curvature.factors import Curvature
from llm_surgeon.methods.surgeon.linalg import (
    IndexLike,
    Tensor,
    _as_index,
    _check_shapes,
    _spd_solve,
    _work_dtype,
)
from llm_surgeon.methods.surgeon.updates import prune_structured

__all__ = [
    "UnitPart",
    "coupled_unit_cost",
    "element_update",
    "kron_quadratic",
    "prune_coupled_unit",
    "structured_cost",
]


def kron_quadratic(dW: Tensor, G: Tensor, A: Tensor) -> Tensor:
    """ΔL = ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(ΔWᵀ G ΔW A)  (0-dim tensor)."""
    _check_shapes(dW, G, A)
    return 0.5 * torch.sum((G @ dW @ A) * dW)


def element_update(W: Tensor, Ginv: Tensor, Ainv: Tensor, i: int, j: int) -> Tensor:
    """Optimal change of all weights when removing the single weight (i, j):

        ΔW = −W_ij / ([Ginv]_ii [Ainv]_jj) · Ginv[:, i] Ainv[j, :]   (outer product),

    so that ``(W + ΔW)_ij = 0`` (up to rounding; set it to exactly 0 yourself).
    """
    _check_shapes(W, Ginv, Ainv)
    scale = W[i, j] / (Ginv[i, i] * Ainv[j, j])
    return -scale * torch.outer(Ginv[:, i], Ainv[j, :]).to(W.dtype)


def structured_cost(W: Tensor, G: Tensor, A: Tensor, Ginv: Tensor, Ainv: Tensor,
                    rows: IndexLike = None, cols: IndexLike = None) -> Tensor:
    """Exact cost of removing the rows R and the columns C of W together (0-dim tensor).

    Inclusion-exclusion form (derivation in :func:`structured_update`), with
    ``B_R = Ginv[R, R]``, ``B_C = Ainv[C, C]``:

        cost = ½ tr(B_R⁻¹ W_R: A W_R:ᵀ) + ½ tr(B_C⁻¹ W_:Cᵀ G W_:C) − ½ tr(B_R⁻¹ W_RC B_C⁻¹ W_RCᵀ)

    i.e. rows alone + columns alone − the R×C block (whose constraints both count).
    """
    _check_shapes(W, G, A)
    _check_shapes(W, Ginv, Ainv)
    R = _as_index(rows, W.shape[0], W.device, "rows")
    C = _as_index(cols, W.shape[1], W.device, "cols")
    wd = _work_dtype(W, G, A, Ginv, Ainv)
    Wc = W.to(wd)
    total = torch.zeros((), dtype=wd, device=W.device)
    if R.numel():
        BR = Ginv.to(wd)[R[:, None], R[None, :]]
        WR = Wc[R]
        total = total + 0.5 * torch.sum(_spd_solve(BR, WR @ A.to(wd)) * WR)
    if C.numel():
        BC = Ainv.to(wd)[C[:, None], C[None, :]]
        WC = Wc[:, C]
        total = total + 0.5 * torch.sum(_spd_solve(BC, (G.to(wd) @ WC).T) * WC.T)
    if R.numel() and C.numel():
        WRC = Wc[R[:, None], C[None, :]]
        total = total - 0.5 * torch.sum(_spd_solve(BR, WRC) * _spd_solve(BC, WRC.T).T)
    return total.to(W.dtype)


@dataclass(frozen=True)
class UnitPart:
    """One layer's share of a coupled unit: rows and/or columns of ``weight``.

    E.g. an MLP channel c is ``UnitPart(W_gate, f_gate, rows=[c])``,
    ``UnitPart(W_up, f_up, rows=[c])``, ``UnitPart(W_down, f_down, cols=[c])``; an attention head
    is its rows in q/k/v and its columns in o.
    """

    weight: Tensor
    factors: Curvature  # damped G, A and their inverses (kron_factors)
    rows: IndexLike = None
    cols: IndexLike = None


def coupled_unit_cost(parts: Sequence[UnitPart]) -> Tensor:
    """Cost of removing a coupled unit: Σ over its layers of the exact joint cost of that layer's
    rows and columns (:func:`structured_cost`); layers have independent curvature.

    For ranking many candidate units (all MLP channels, all heads) do not loop over this: sum
    the vectorised :func:`row_costs` / :func:`column_costs` / :func:`row_group_costs` /
    :func:`column_group_costs` of the layers involved instead (identical for one-row/one-column
    or one-group parts).
    """
    if not parts:
        raise ValueError("a unit needs at least one part")
    total = None
    for p in parts:
        f = p.factors
        c = structured_cost(p.weight, f.G, f.A, f.Ginv, f.Ainv, p.rows, p.cols)
        total = c if total is None else total + c.to(total.dtype)
    assert total is not None
    return total


def prune_coupled_unit(parts: Sequence[UnitPart]) -> tuple[list[Tensor], Tensor]:
    """Remove a coupled unit (or several units of the same layers at once: pass the union of
    their rows/columns per layer): every layer gets its own exact joint update
    (:func:`prune_structured`). Returns ``(new weights in the order of parts, total cost)``.
    A layer that appears in two parts must be merged into one part by the caller."""
    if not parts:
        raise ValueError("a unit needs at least one part")
    outs: list[Tensor] = []
    total: Tensor | None = None
    for p in parts:
        f = p.factors
        W_new, c = prune_structured(p.weight, f.G, f.A, f.Ginv, f.Ainv, p.rows, p.cols)
        outs.append(W_new)
        total = c if total is None else total + c.to(total.dtype)
    assert total is not None
    return outs, total
