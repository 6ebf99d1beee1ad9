"""SparseGPT layer-wise math (Frantar & Alistarh, 2023).

Pure tensor functions: no hooks, no models, no I/O.

Conventions
-----------
* ``W`` is ``(out, in)`` like ``nn.Linear.weight``; the layer computes ``Y = X Wᵀ`` for token
  rows ``X`` of shape ``(n, in)``.
* ``H = XᵀX`` (``in × in``) is the running sum over calibration tokens. Its overall scale does
  not matter (it cancels in every formula here) so a mean instead of a sum is fine too.
* The layer-wise objective of every row ``w`` (a row of ``W``) is the quadratic
  ``(ŵ − w) H (ŵ − w)ᵀ`` = ``‖X wᵀ − X ŵᵀ‖²``; rows are independent and share ``H``.

Algorithm (own implementation of the published method)
------------------------------------------------------
1. Dead inputs (``H_jj == 0``: the feature was always zero on the calibration data) get
   ``H_jj := 1`` and ``W[:, j] := 0`` (free: they never influence the output).
2. Damping: ``Ĥ = H + δ I`` with ``δ = percdamp · mean(diag H)``.
3. ``U = chol(Ĥ⁻¹)`` upper, i.e. ``Ĥ⁻¹ = UᵀU``. Row ``c`` of ``U`` divided by ``U_cc`` is the
   row ``c`` of ``[Ĥ_{c:,c:}]⁻¹`` divided by its diagonal entry, so ``U`` encodes the inverse
   Hessians of all trailing column sets at once.
4. Columns are visited left to right. For column ``c`` with current value ``w_c`` and target
   ``q_c`` (0 if pruned, ``w_c`` if kept) the OBS update of all later columns is::

       err = (w_c − q_c) / U_cc,      w_{c:} ← w_{c:} − err · U_{c, c:}

   which is the exact minimiser of the quadratic over the columns ``> c`` with the columns
   ``≤ c`` frozen. Updates are applied eagerly inside a block of ``blocksize`` columns and
   lazily (one matmul ``Err · U_{block, rest}``) to the columns after the block; for a given
   mask the result does not depend on ``blocksize`` (the adaptive unstructured selection
   does, since it compares weights within a block).
5. Mask selection (adaptive, from the *current* partially updated weights): unstructured
   prunes the lowest ``w² / U_cc²`` within each block of ``blocksize`` columns (all rows
   together, as in the paper); N:M prunes the ``m − n`` lowest of every group of ``m``
   columns of each row, selected when the sweep reaches the group.

Important: this sequential scheme is *not* the joint optimum for its final mask. Columns are
frozen once visited, so a kept column left of a pruned one is never corrected for it. It is
exactly the joint OBS solution ``ŵ_K = w_K + w_R Ĥ_RK Ĥ_KK⁻¹`` only when, in every row, all
pruned columns come before all kept ones (two columns, ``H = [[1, ρ], [ρ, 1]]``, pruning the
second gives ``(w_0, 0)`` while the joint optimum is ``(w_0 + ρ w_1, 0)``). What it computes
exactly is the *sequential* OBS solution described in 4; :func:`sparsegpt_reconstruct`
exposes it for a given mask.
"""

from __future__ import annotations

import math

import torch

from llm_surgeon.methods.base import LayerwiseMethod
from llm_surgeon.settings import SparseGPTSettings

__all__ = [
    "SparseGPTMethod",
    "damp_hessian",
    "num_to_prune",
    "sparsegpt_prune",
    "sparsegpt_reconstruct",
]


def num_to_prune(count: int, sparsity: float) -> int:
    """Number of entries to remove out of ``count``: ``⌊sparsity · count⌋``.

    Values within floating-point noise of an integer are rounded to it (``0.29 · 100`` → 29).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    x = sparsity * count
    r = round(x)
    k = r if math.isclose(x, r, rel_tol=1e-9, abs_tol=1e-9) else math.floor(x)
    return int(min(max(k, 0), count))


def damp_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(Ĥ, dead)``: ``Ĥ = H' + percdamp · mean(diag H') · I`` and the dead-input mask.

    ``H'`` is ``H`` with ``H'_jj = 1`` where ``H_jj == 0`` (dead inputs, flagged in ``dead``).
    ``H`` is not modified. If every input is dead the damping uses ``mean(diag H') = 1``.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got {tuple(H.shape)}")
    Hd = H.clone()
    diag = torch.diagonal(Hd)
    dead = diag == 0
    diag[dead] = 1.0
    damp = percdamp * torch.mean(diag)
    diag += damp
    return Hd, dead


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upper_chol_of_inverse(Hd: torch.Tensor) -> torch.Tensor:
    """``U`` upper triangular with ``Ĥ⁻¹ = UᵀU``."""
    L = torch.linalg.cholesky(Hd)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def _select_block_unstructured(W1: torch.Tensor, d1: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` lowest ``w² / d²`` in the block (all rows together)."""
    mask = torch.zeros_like(W1, dtype=torch.bool)
    if count <= 0:
        return mask
    scores = (W1 / d1.unsqueeze(0)).square().reshape(-1)
    idx = torch.topk(scores, count, largest=False).indices
    mask.view(-1)[idx] = True
    return mask


def _select_group_nm(Wg: torch.Tensor, dg: torch.Tensor, n: int) -> torch.Tensor:
    """For an ``(out, m)`` group: mask of the ``m − n`` lowest ``w² / d²`` of each row."""
    m = Wg.shape[1]
    mask = torch.zeros_like(Wg, dtype=torch.bool)
    if m - n <= 0:
        return mask
    scores = (Wg / dg.unsqueeze(0)).square()
    idx = torch.topk(scores, m - n, dim=1, largest=False).indices
    mask.scatter_(1, idx, True)
    return mask


def _check_pattern(in_features: int, sparsity: float | None, n: int | None, m: int | None) -> bool:
    """Validate the sparsity pattern; return ``True`` for N:M."""
    if sparsity is not None and (n is not None or m is not None):
        raise ValueError("give either sparsity (unstructured) or n and m (N:M), not both")
    if sparsity is not None:
        num_to_prune(1, sparsity)  # range check
        return False
    if n is None or m is None:
        raise ValueError("give sparsity (unstructured) or both n and m (N:M)")
    if not (m >= 1 and 0 <= n <= m):
        raise ValueError(f"invalid N:M pattern {n}:{m}")
    if in_features % m != 0:
        raise ValueError(f"in_features={in_features} is not a multiple of m={m}")
    return True


def _sweep(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    blocksize: int,
    percdamp: float,
    fixed_mask: torch.Tensor | None = None,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared SparseGPT column sweep; returns ``(W_new, mask_removed)`` in the work dtype."""
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got {tuple(W.shape)}")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for W of shape {tuple(W.shape)}")
    if blocksize < 1:
        raise ValueError("blocksize must be >= 1")
    dtype = _work_dtype(W.dtype)
    Wk = W.detach().to(dtype).clone()
    Hd, dead = damp_hessian(H.detach().to(device=Wk.device, dtype=dtype), percdamp)
    Wk[:, dead] = 0.0
    U = _upper_chol_of_inverse(Hd)

    nm = fixed_mask is None and sparsity is None
    if nm:
        assert n is not None and m is not None
        blocksize = max(m, (blocksize // m) * m)  # groups never straddle two blocks
    mask_removed = torch.zeros((rows, cols), dtype=torch.bool, device=Wk.device)
    if fixed_mask is not None:
        if fixed_mask.shape != Wk.shape:
            raise ValueError("mask must have the shape of W")
        fixed_mask = fixed_mask.to(device=Wk.device, dtype=torch.bool)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wk[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        if fixed_mask is not None:
            M1 = fixed_mask[:, i1:i2].clone()
        elif not nm:
            assert sparsity is not None
            count = num_to_prune(rows * i2, sparsity) - num_to_prune(rows * i1, sparsity)
            M1 = _select_block_unstructured(W1, d1, count)
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            if nm and j % m == 0:  # type: ignore[operator]
                M1[:, j : j + m] = _select_group_nm(W1[:, j : j + m], d1[j : j + m], n)  # type: ignore[arg-type]
            w = W1[:, j]
            q = torch.where(M1[:, j], torch.zeros_like(w), w)
            err = (w - q) / d1[j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            W1[:, j] = q  # exact zeros / exact kept values
            Err1[:, j] = err
        Wk[:, i1:i2] = W1
        if i2 < cols:
            Wk[:, i2:] -= Err1 @ U[i1:i2, i2:]
        mask_removed[:, i1:i2] = M1
    return Wk, mask_removed


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune ``W`` and update the remaining weights with sequential OBS.

    Minimises, approximately and row by row, ``‖X Wᵀ − X Ŵᵀ‖² = tr((Ŵ − W) H (Ŵ − W)ᵀ)``
    (with ``H`` damped as ``H + percdamp · mean(diag H) · I``) subject to the sparsity
    pattern; see the module docstring for the exact algorithm.

    Args:
        W: ``(out, in)`` weight. fp16/bf16 are processed in fp32, fp64 stays fp64.
        H: ``(in, in)`` ``XᵀX`` of the layer inputs (sum or mean over tokens).
        sparsity: unstructured fraction of weights to remove. Exactly
            ``⌊sparsity · out · in⌋`` weights are removed in total (per block the count is the
            difference of the cumulative targets, so blocks need not divide ``in``).
        n, m: N:M pattern, keep at most ``n`` of every ``m`` consecutive input columns of each
            row (2:4 keeps 2). ``in`` must be a multiple of ``m``; ``blocksize`` is rounded
            down to a multiple of ``m``.
        blocksize: columns per lazy-update block (and per unstructured selection block).
        percdamp: relative damping.

    Returns:
        ``(W_new, mask_removed)``: ``W_new`` in ``W``'s dtype/device with removed weights
        exactly zero (dead-input columns are zero too, whether or not selected);
        ``mask_removed`` is a bool ``(out, in)`` tensor, ``True`` where a weight was pruned.
    """
    nm = _check_pattern(W.shape[-1], sparsity, n, m)
    Wn, mask = _sweep(
        W,
        H,
        blocksize=blocksize,
        percdamp=percdamp,
        sparsity=None if nm else sparsity,
        n=n,
        m=m,
    )
    return Wn.to(W.dtype), mask


def sparsegpt_reconstruct(
    W: torch.Tensor,
    H: torch.Tensor,
    mask_removed: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Apply SparseGPT's sequential OBS updates for a *given* pruning mask.

    For every row, columns ``c = 0 … in−1`` are visited in order; a pruned column is set to
    zero and the columns ``> c`` are re-optimised exactly for the damped quadratic
    ``(ŵ − w) Ĥ (ŵ − w)ᵀ`` with the columns ``≤ c`` frozen. Equivalently, with the pruned
    column ``c`` holding current value ``a``: ``w_{>c} ← w_{>c} + a · Ĥ_{>c,c}ᵀ Ĥ_{>c,>c}⁻¹``.
    The result is independent of ``blocksize``. ``sparsegpt_prune`` followed by this function
    with the returned mask reproduces ``W_new``.

    Returns the new weight in ``W``'s dtype with ``mask_removed`` entries exactly zero.
    """
    Wn, _ = _sweep(W, H, blocksize=blocksize, percdamp=percdamp, fixed_mask=mask_removed)
    return Wn.to(W.dtype)


# ---- the layer-wise interface (layerwise.py) ------------------------------------------------


class SparseGPTMethod(LayerwiseMethod):
    """SparseGPT behind the layer-wise driver: unstructured or any N:M, block 128, damping 0.01."""

    name = "sparsegpt"
    structures = ("unstructured", "nm")
    Settings = SparseGPTSettings

    def prune_linear(self, W: torch.Tensor, H: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
        s = self.settings
        if nm is not None:
            new, _ = sparsegpt_prune(W, H, n=nm[0], m=nm[1], blocksize=s.blocksize,
                                     percdamp=s.percdamp)
        else:
            new, _ = sparsegpt_prune(W, H, sparsity=sparsity, blocksize=s.blocksize,
                                     percdamp=s.percdamp)
        return new
