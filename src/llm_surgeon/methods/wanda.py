"""Wanda layer-wise math (Sun, Liu, Bair & Kolter, 2023): pruning by weights and activations.

Pure tensor functions: no hooks, no models, no I/O.

``W`` is ``(out, in)`` like ``nn.Linear.weight``; the layer inputs are token rows ``X``
``(n, in)``. The score of weight ``W_ij`` is

    S_ij = |W_ij| · ‖X_j‖₂,     ‖X_j‖₂² = Σ_t X_tj² = (XᵀX)_jj,

so callers only need the per-input-feature squared norms, i.e. ``diag(H)`` of the running
sum ``H = XᵀX`` (a mean instead of a sum rescales every score by the same factor, which
does not change any mask). Wanda removes weights without updating the others.
"""

from __future__ import annotations

import torch

from llm_surgeon.methods.base import LayerwiseMethod
from llm_surgeon.methods.sparsegpt import num_to_prune

__all__ = ["WandaMethod", "wanda_mask", "wanda_scores"]


def wanda_scores(W: torch.Tensor, x_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``S_ij = |W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂ = sqrt(x_sq_norms_j)``.

    Args:
        W: ``(out, in)`` weight.
        x_sq_norms: ``(in,)`` per-input-feature squared norms ``Σ_t X_tj²`` (= ``diag(XᵀX)``).
            Tiny negative values from round-off are clamped to zero.

    Returns:
        ``(out, in)`` scores in ``W``'s dtype (fp16/bf16 inputs are scored in fp32).
    """
    if W.ndim != 2 or x_sq_norms.shape != (W.shape[1],):
        raise ValueError(
            f"expected W (out, in) and x_sq_norms (in,), got {tuple(W.shape)} and "
            f"{tuple(x_sq_norms.shape)}"
        )
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    norms = x_sq_norms.detach().to(device=W.device, dtype=dtype).clamp_min(0).sqrt()
    return W.detach().to(dtype).abs() * norms.unsqueeze(0)


def wanda_mask(
    scores: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Pruning mask from scores, ``True`` = remove.

    * Unstructured (``sparsity``): per output row (the paper's per-output comparison group),
      exactly ``⌊sparsity · in⌋`` lowest-scoring weights of every row are removed.
    * N:M (``n``, ``m``): in every group of ``m`` consecutive input columns of each row the
      ``m − n`` lowest-scoring weights are removed (at most ``n`` nonzeros stay; 2:4 keeps 2).
      ``in`` must be a multiple of ``m``.

    Ties are broken arbitrarily but the counts are always exact.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (out, in), got {tuple(scores.shape)}")
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if sparsity is not None:
        if n is not None or m is not None:
            raise ValueError("give either sparsity (unstructured) or n and m (N:M), not both")
        k = num_to_prune(cols, sparsity)
        if k > 0:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, True)
        return mask
    if n is None or m is None:
        raise ValueError("give sparsity (unstructured) or both n and m (N:M)")
    if not (m >= 1 and 0 <= n <= m):
        raise ValueError(f"invalid N:M pattern {n}:{m}")
    if cols % m != 0:
        raise ValueError(f"in_features={cols} is not a multiple of m={m}")
    if m - n == 0:
        return mask
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask.view(rows, cols // m, m).scatter_(2, idx, True)
    return mask


# ---- the layer-wise interface (layerwise.py) ------------------------------------------------


class WandaMethod(LayerwiseMethod):
    """Wanda behind the layer-wise driver: |W_ij|·‖X_j‖ per output row; unstructured or N:M;
    the remaining weights are not updated."""

    name = "wanda"
    structures = ("unstructured", "nm")
    diagonal_statistic = True  # the layer-wise pass may give diag(XᵀX) alone, a vector

    def prune_linear(self, W: torch.Tensor, H: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
        scores = wanda_scores(W, H if H.ndim == 1 else torch.diagonal(H))
        if nm is not None:
            mask = wanda_mask(scores, n=nm[0], m=nm[1])
        else:
            mask = wanda_mask(scores, sparsity=sparsity)
        return W.masked_fill(mask, 0)
