"""The remove-only baselines of the LLM Surgeon paper: magnitude, L-OBD and K-OBD.

They share the surgeon's machinery (curvature, global threshold, shots) but never update the
remaining weights: a removed set Q is simply zeroed, and its cost is the loss increase of that
zeroing under the method's curvature F:

    cost(Q) = ½ w_Qᵀ F_QQ w_Q,     F = I ⊗ I (magnitude),  I ⊗ A (L-OBD),  G ⊗ A (K-OBD).

Under F = G ⊗ A this gives, for W of shape (out, in):

    one weight (i, j):   ½ W_ij² G_ii A_jj
    a row r:             ½ G_rr · w_rᵀ A w_r
    a column c:          ½ A_cc · w_cᵀ G w_c

with G = I or A = I where the method has no such factor (a missing factor is passed as None).
The functions are named ``obd_*`` and all take ``(W, G, A)``: they are the costs of *zeroing*
under the factors themselves, not the surgeon's costs with the others free to move
(:mod:`llm_surgeon.methods.surgeon.costs`, which take inverse factors).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from llm_surgeon.methods.base import Curvature, GlobalMethod, Removal


def _diag(M: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if M is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    return torch.diagonal(M).to(like.dtype)


def obd_element_costs(W: torch.Tensor, G: torch.Tensor | None,
                      A: torch.Tensor | None) -> torch.Tensor:
    """½ W_ij² G_ii A_jj for every weight (shape of W)."""
    out, inp = W.shape
    return 0.5 * W.square() * _diag(G, out, W)[:, None] * _diag(A, inp, W)[None, :]


def obd_row_costs(W: torch.Tensor, G: torch.Tensor | None,
                  A: torch.Tensor | None) -> torch.Tensor:
    """½ G_rr · w_rᵀ A w_r for every row r (shape (out,))."""
    quad = W.square().sum(1) if A is None else ((W @ A.to(W.dtype)) * W).sum(1)
    return 0.5 * _diag(G, W.shape[0], W) * quad


def obd_column_costs(W: torch.Tensor, G: torch.Tensor | None,
                     A: torch.Tensor | None) -> torch.Tensor:
    """½ A_cc · w_cᵀ G w_c for every column c (shape (in,))."""
    quad = W.square().sum(0) if G is None else ((G.to(W.dtype) @ W) * W).sum(0)
    return 0.5 * _diag(A, W.shape[1], W) * quad


def _diag_blocks(M: torch.Tensor | None, n_groups: int, width: int,
                 like: torch.Tensor) -> torch.Tensor:
    """The (n_groups, width, width) diagonal blocks of M (identity blocks when M is None)."""
    if M is None:
        eye = torch.eye(width, dtype=like.dtype, device=like.device)
        return eye.expand(n_groups, width, width)
    idx = torch.arange(n_groups * width, device=like.device).view(n_groups, width)
    return M.to(like.dtype)[idx[:, :, None], idx[:, None, :]]


def obd_row_group_costs(W: torch.Tensor, G: torch.Tensor | None, A: torch.Tensor | None,
                    width: int) -> torch.Tensor:
    """Zeroing cost of each block R_g of ``width`` consecutive rows (a head's rows, an MLP
    channel's row):  ½ Σ_{r,s∈R_g} G_rs · w_rᵀ A w_s = ½ tr(G_RR W_R A W_Rᵀ)."""
    n = W.shape[0] // width
    Wg = W[: n * width].reshape(n, width, -1)
    WAg = Wg if A is None else Wg @ A.to(W.dtype)
    M = WAg @ Wg.transpose(1, 2)
    return 0.5 * (_diag_blocks(G, n, width, W) * M).sum((1, 2))


def obd_column_group_costs(W: torch.Tensor, G: torch.Tensor | None, A: torch.Tensor | None,
                       width: int, n_groups: int) -> torch.Tensor:
    """Zeroing cost of each block C_g of ``width`` consecutive columns among the first
    ``n_groups · width`` (a bias column after them is never part of a unit):
    ½ tr(A_CC W_Cᵀ G W_C)."""
    Wc = W[:, : n_groups * width]
    GW = Wc if G is None else G.to(W.dtype) @ Wc
    Wg = Wc.T.reshape(n_groups, width, -1)
    M = GW.T.reshape(n_groups, width, -1) @ Wg.transpose(1, 2)
    return 0.5 * (_diag_blocks(A, n_groups, width, W) * M).sum((1, 2))


# ---- the global-method interface (see methods/base.py) -------------------------------------


class ZeroingMethod(GlobalMethod):
    """A remove-only method: costs of zeroing under I⊗I, I⊗A or G⊗A; removal = zeroing."""

    updates = False
    structures = ("unstructured", "nm", "rows-columns", "heads-channels")
    use_A: ClassVar[bool]
    use_G: ClassVar[bool]

    def _factors(self, curv: Curvature | None) -> tuple[torch.Tensor | None,
                                                         torch.Tensor | None]:
        if curv is None:
            return None, None
        return (curv.G if self.use_G else None), (curv.A if self.use_A else None)

    def element_costs(self, W: torch.Tensor, curv: Curvature | None) -> torch.Tensor:
        return obd_element_costs(W, *self._factors(curv))

    def line_costs(self, W: torch.Tensor, curv: Curvature | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        G, A = self._factors(curv)
        return obd_row_costs(W, G, A), obd_column_costs(W, G, A)

    def unit_costs(self, W: torch.Tensor, curv: Curvature | None, axis: str, width: int,
                   count: int) -> torch.Tensor:
        """Zeroing cost of this layer's share of each of ``count`` coupled units."""
        G, A = self._factors(curv)
        if axis == "rows":
            return obd_row_group_costs(W, G, A, width)
        return obd_column_group_costs(W, G, A, width, count)

    def apply(self, W: torch.Tensor, curv: Curvature | None, removal: Removal) -> torch.Tensor:
        return zero_removed(W, removal)


class Magnitude(ZeroingMethod):
    """Magnitude pruning: cost ½ W_ij² (F = I ⊗ I); no curvature pass."""

    name = "magnitude"
    curvature = "none"
    use_A, use_G = False, False


class LOBD(ZeroingMethod):
    """L-OBD: F = I ⊗ A from one forward sweep; without G the costs share no scale across
    layers, so every layer loses the target fraction (per-layer allocation)."""

    name = "l-obd"
    curvature = "activations"
    allocation = "layer"
    use_A, use_G = True, False


class KOBD(ZeroingMethod):
    """K-OBD: F = G ⊗ A (K-FAC), zeroing only."""

    name = "k-obd"
    curvature = "kfac"
    use_A, use_G = True, True


def zero_removed(W: torch.Tensor, removal: Removal) -> torch.Tensor:
    """W with the removed elements, rows and columns set to zero (no other change)."""
    out = W.clone()
    if removal.mask is not None:
        out[removal.mask] = 0
    if removal.rows is not None and removal.rows.numel():
        out[removal.rows] = 0
    if removal.cols is not None and removal.cols.numel():
        out[:, removal.cols] = 0
    return out


MAGNITUDE = Magnitude()
L_OBD = LOBD()
K_OBD = KOBD()
