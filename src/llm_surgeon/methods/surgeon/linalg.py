"""Damping and inverting the Kronecker factors, and the small linear-algebra helpers that the
surgeon's costs, updates and solver share.

Damp once with :func:`damp`, invert once with :func:`spd_inverse`, and use the same damped ``G``,
``A`` and their inverses everywhere; :func:`kron_factors` does all of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from llm_surgeon.curvature.factors import Curvature

__all__ = ["damp", "kron_factors", "spd_inverse"]

Tensor = torch.Tensor
IndexLike = Tensor | Sequence[int] | None


def _work_dtype(*ts: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (half precision is computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _square(M: Tensor, what: str) -> int:
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(M.shape)}")
    return M.shape[0]


def _check_shapes(W: Tensor, left: Tensor | None, right: Tensor | None) -> None:
    """``left`` is out×out (G or Ginv), ``right`` is in×in (A or Ainv)."""
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if left is not None and _square(left, "G / Ginv") != W.shape[0]:
        raise ValueError(f"G / Ginv is {tuple(left.shape)} but W has {W.shape[0]} rows")
    if right is not None and _square(right, "A / Ainv") != W.shape[1]:
        raise ValueError(f"A / Ainv is {tuple(right.shape)} but W has {W.shape[1]} columns")


def _as_index(idx: IndexLike, n: int, device: torch.device, what: str) -> Tensor:
    """Unique, sorted int64 indices in [0, n) from None, a list, an index tensor or a bool mask."""
    if idx is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    t = torch.as_tensor(idx, device=device)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"{what}: bool mask must have shape ({n},), got {tuple(t.shape)}")
        return t.nonzero().flatten()
    t = t.reshape(-1).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{what}: indices must lie in [0, {n})")
    u = torch.unique(t)  # sorted
    if u.numel() != t.numel():
        raise ValueError(f"{what}: duplicate indices")
    return u


def _spd_solve(K: Tensor, B: Tensor) -> Tensor:
    """K⁻¹ B for SPD K (or a batch) via Cholesky; falls back to an fp64 LU solve if any
    Cholesky factorisation fails."""
    L, info = torch.linalg.cholesky_ex(K)
    if not bool(info.any()):
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(K.double(), B.double()).to(B.dtype)


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.sum(a * b))


def damp(M: Tensor, rel: float = 0.01) -> Tensor:
    """Relative diagonal damping: ``M + rel · mean(diag M) · I`` (a new tensor).

    The paper's scripts use ``rel = 0.1`` for G and ``0.01`` for A.
    """
    _square(M, "M")
    out = M.clone()
    if rel:
        out.diagonal().add_(rel * torch.diagonal(M).mean())
    return out


def spd_inverse(M: Tensor, rel_damp: float = 0.0, *, name: str = "layer",
                max_tries: int = 8) -> Tensor:
    """Inverse of a symmetric positive (semi-)definite matrix via Cholesky in fp64.

    Computes ``(M + rel_damp · mean(diag M) · I)⁻¹`` (``M`` symmetrised first) and returns it in
    ``M``'s dtype on ``M``'s device. If the Cholesky factorisation fails (M not numerically
    positive definite), a jitter starting at ``max(rel_damp, 1e-10) · mean(diag M)`` and growing
    tenfold is added, with a warning, up to ``max_tries`` times.

    Raises ValueError, naming ``name``, if ``M`` has non-finite values, a non-positive mean
    diagonal (e.g. an all-zero curvature) or cannot be factorised.
    """
    _square(M, f"{name}: curvature")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{name}: curvature matrix has non-finite values (NaN or inf)")
    M64 = M.to(torch.float64)
    if not torch.equal(M64, M64.T):  # (an exactly symmetric M is its own symmetrisation)
        M64 = 0.5 * (M64 + M64.T)
    scale = float(torch.diagonal(M64).mean())
    if not scale > 0:
        raise ValueError(f"{name}: curvature matrix has non-positive mean diagonal ({scale:g}); "
                         "is the layer dead or the curvature empty?")
    jitter = rel_damp * scale
    eye = torch.eye(M64.shape[0], dtype=torch.float64, device=M64.device)
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(M64 + jitter * eye if jitter else M64)
        if int(info) == 0:
            if attempt:
                warnings.warn(f"{name}: curvature not positive definite; added jitter "
                              f"{jitter / scale:.1e}·mean(diag)", RuntimeWarning, stacklevel=2)
            inv = torch.cholesky_inverse(L)
            if not torch.equal(inv, inv.T):  # LAPACK's potri mirrors one triangle: exact
                inv = 0.5 * (inv + inv.T)
            return inv.to(M.dtype)
        jitter = max(jitter * 10.0, 1e-10 * scale) if jitter else 1e-10 * scale
    raise ValueError(f"{name}: curvature matrix is not positive definite even with jitter "
                     f"{jitter / scale:.1e}·mean(diag)")


def kron_factors(G: Tensor, A: Tensor, *, rel_damp_g: float = 0.01, rel_damp_a: float = 0.01,
                 name: str = "layer") -> Curvature:
    """Damp ``G`` and ``A`` (:func:`damp`) and invert them (:func:`spd_inverse`) once: a
    :class:`~llm_surgeon.curvature.factors.Curvature` holding the damped ``G``, ``A`` and their
    inverses ``Ginv``, ``Ainv`` (all on the same device)."""
    for M, what in ((G, "G"), (A, "A")):
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"{name}: curvature factor {what} has non-finite values")
    Gd, Ad = damp(G, rel_damp_g), damp(A, rel_damp_a)
    return Curvature(A=Ad, G=Gd, Ainv=spd_inverse(Ad, name=f"{name} (A)"),
                     Ginv=spd_inverse(Gd, name=f"{name} (G)"))
