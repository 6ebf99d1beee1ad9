"""The math of *The LLM Surgeon* (van der Ouderaa et al., ICLR 2024, arXiv:2312.17244).

Pure tensor functions: no hooks, no models, no I/O. Every function works in fp32 and fp64 (half
precision inputs are computed in fp32) on whatever device its inputs live on.

Conventions
-----------
A linear layer's weight ``W`` has shape ``(out, in)`` like :class:`torch.nn.Linear`; when the layer
has a bias the caller appends it as the last column (``W`` is ``(out, in+1)``) and ``A`` includes
the constant-1 input. The curvature of the loss around ``W`` is Kronecker-factored,

    F ≈ G ⊗ A,     A = E[a aᵀ]  (in × in),     G = E[g gᵀ]  (out × out),

so that, with the row-major ``vec``, the loss change of a weight change ``ΔW`` is

    ΔL(ΔW) = ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(ΔWᵀ G ΔW A)                  (:func:`kron_quadratic`)

and ``(G ⊗ A)⁻¹ = Ginv ⊗ Ainv`` with ``Ginv = G⁻¹``, ``Ainv = A⁻¹`` (of the *damped* factors: damp
once with :func:`damp`, invert once with :func:`spd_inverse`, and use the same damped ``G``, ``A``
and their inverses everywhere; :func:`kron_factors` does all of it).

Removing a set Q of weights (forcing ``(W + ΔW)_q = 0`` for q ∈ Q) with the least loss is the
equality-constrained quadratic

    min_ΔW ½ vec(ΔW)ᵀ (G⊗A) vec(ΔW)   s.t.  ΔW_q = −W_q  (q ∈ Q)

whose KKT solution is, with ``K_qp = Ginv[i_q, i_p] · Ainv[j_q, j_p]`` (the Q×Q block of
``Ginv ⊗ Ainv``) and ``λ = K⁻¹ w_Q``,

    ΔW = −Σ_q λ_q Ginv[:, i_q] Ainv[j_q, :] = −Ginv Λ Ainv,     cost = ½ w_Qᵀ K⁻¹ w_Q,

``Λ`` being the (out × in) matrix holding λ_q at position q and zeros elsewhere.

Contents
--------
* damping and inversion: :func:`damp`, :func:`spd_inverse`, :func:`kron_factors`,
  :class:`KronFactors`, :func:`kron_quadratic`;
* unstructured: :func:`element_costs`, :func:`element_update`, :func:`correlated_update`
  (exact, dense in |Q|) and :func:`prune_unstructured` (large Q: preconditioned conjugate
  gradients on the same KKT system, see its docstring), also used for N:M;
* structured: :func:`row_costs`, :func:`column_costs`, :func:`row_group_costs`,
  :func:`column_group_costs`, :func:`structured_cost`, :func:`structured_update`,
  :func:`prune_structured`, and coupled units (:class:`UnitPart`, :func:`coupled_unit_cost`,
  :func:`prune_coupled_unit`);
* semi-structured N:M: :func:`nm_mask`, :func:`nm_group_costs`, :func:`check_nm`,
  :func:`assert_nm`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from llm_surgeon.methods.base import GlobalMethod
from llm_surgeon.settings import SurgeonSettings

__all__ = [
    "KronFactors",
    "PruneResult",
    "UnitPart",
    "assert_nm",
    "check_nm",
    "column_costs",
    "column_group_costs",
    "correlated_update",
    "coupled_unit_cost",
    "damp",
    "element_costs",
    "element_update",
    "kron_factors",
    "kron_quadratic",
    "nm_group_costs",
    "nm_mask",
    "prune_coupled_unit",
    "prune_structured",
    "prune_unstructured",
    "row_costs",
    "row_group_costs",
    "spd_inverse",
    "structured_cost",
    "structured_update",
]

Tensor = torch.Tensor
IndexLike = Tensor | Sequence[int] | None


# ---- small helpers ---------------------------------------------------------------------------


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


# ---- damping, inversion, the quadratic -------------------------------------------------------


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
            return (0.5 * (inv + inv.T)).to(M.dtype)
        jitter = max(jitter * 10.0, 1e-10 * scale) if jitter else 1e-10 * scale
    raise ValueError(f"{name}: curvature matrix is not positive definite even with jitter "
                     f"{jitter / scale:.1e}·mean(diag)")


@dataclass(frozen=True)
class KronFactors:
    """Damped Kronecker factors of one layer and their inverses (all on the same device)."""

    G: Tensor
    A: Tensor
    Ginv: Tensor
    Ainv: Tensor


def kron_factors(G: Tensor, A: Tensor, *, rel_damp_g: float = 0.01, rel_damp_a: float = 0.01,
                 name: str = "layer") -> KronFactors:
    """Damp ``G`` and ``A`` (:func:`damp`) and invert them (:func:`spd_inverse`) once."""
    for M, what in ((G, "G"), (A, "A")):
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"{name}: curvature factor {what} has non-finite values")
    Gd, Ad = damp(G, rel_damp_g), damp(A, rel_damp_a)
    return KronFactors(Gd, Ad, spd_inverse(Gd, name=f"{name} (G)"),
                       spd_inverse(Ad, name=f"{name} (A)"))


def kron_quadratic(dW: Tensor, G: Tensor, A: Tensor) -> Tensor:
    """ΔL = ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(ΔWᵀ G ΔW A)  (0-dim tensor)."""
    _check_shapes(dW, G, A)
    return 0.5 * torch.sum((G @ dW @ A) * dW)


# ---- unstructured ----------------------------------------------------------------------------


def element_costs(W: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    """OBS cost of removing each single weight (others free to move), shape of ``W``:

        cost_ij = ½ W_ij² / ([Ginv]_ii [Ainv]_jj).
    """
    _check_shapes(W, Ginv, Ainv)
    den = torch.outer(torch.diagonal(Ginv), torch.diagonal(Ainv)).to(W.dtype)
    return 0.5 * W.square() / den


def element_update(W: Tensor, Ginv: Tensor, Ainv: Tensor, i: int, j: int) -> Tensor:
    """Optimal change of all weights when removing the single weight (i, j):

        ΔW = −W_ij / ([Ginv]_ii [Ainv]_jj) · Ginv[:, i] Ainv[j, :]   (outer product),

    so that ``(W + ΔW)_ij = 0`` (up to rounding; set it to exactly 0 yourself).
    """
    _check_shapes(W, Ginv, Ainv)
    scale = W[i, j] / (Ginv[i, i] * Ainv[j, j])
    return -scale * torch.outer(Ginv[:, i], Ainv[j, :]).to(W.dtype)


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


@dataclass
class PruneResult:
    """Outcome of :func:`prune_unstructured` for one layer."""

    weight: Tensor  # new W: the removed weights are exactly 0, the others updated
    loss: float  # ½ tr(ΔWᵀ G ΔW A) of the returned change ΔW = weight − W
    baseline_loss: float  # the same for plain zeroing of the removed weights (no update)
    method: str  # "exact", "cg", "chunked" or "none" (nothing removed)
    iterations: int  # CG iterations or chunks (0 for exact)
    residual: float  # ‖(W + ΔW_unforced)_Q‖ / ‖W_Q‖ before the final exact zeroing
    step: float  # safeguard factor t on the update (1.0 = unchanged), see prune_unstructured
    lower_bound: float = float("nan")  # certified lower bound on the optimal loss (exact, cg)


class _LineSearch:
    """Best point on the line through plain zeroing E (−W on Q, 0 elsewhere) and a solver's
    feasible point D (−W on Q, −U elsewhere): ``E + t (D − E)``, all feasible.

    ``f(E + tΔ) = f(E) + t ⟨Δ, HE⟩ + ½ t² ⟨Δ, HΔ⟩`` with ``H v = G v A``; minimised at
    ``t = −⟨Δ, HE⟩ / ⟨Δ, HΔ⟩`` (``safeguard``) or evaluated at t = 1.
    """

    def __init__(self, W: Tensor, G: Tensor, A: Tensor, mask: Tensor, safeguard: bool) -> None:
        self.G, self.A, self.mask, self.safeguard = G, A, mask, safeguard
        self.zero = torch.zeros((), dtype=W.dtype, device=W.device)
        self.E = torch.where(mask, -W, self.zero)
        self.HE = G @ self.E @ A
        self.base = 0.5 * _dot(self.E, self.HE)

    def __call__(self, U: Tensor) -> tuple[float, float, Tensor]:
        """→ (t, loss at t, Δ = D − E)."""
        step_dir = torch.where(self.mask, self.zero, -U)
        a = _dot(step_dir, self.HE)
        b = _dot(step_dir, self.G @ step_dir @ self.A)
        t = 1.0
        if self.safeguard:
            t = -a / b if b > 0 else 0.0
        return t, max(self.base + t * a + 0.5 * t * t * b, 0.0), step_dir


def _dual_pcg(W: Tensor, Ginv: Tensor, Ainv: Tensor, maskf: Tensor, tol: float, max_iter: int,
              upper: _LineSearch | None, rtol_loss: float, check_every: int
              ) -> tuple[Tensor, int, float, float, tuple[int, tuple[float, float, Tensor]] | None]:
    """Jacobi-preconditioned CG on K λ = w_Q, K = (Ginv ⊗ Ainv)_QQ.

    Returns ``(U = Ginv Λ Ainv, iterations, relative residual, dual lower bound, last upper-bound
    evaluation (iteration, line-search result) or None)``. Stops when the relative residual
    ``‖w_Q − Kλ‖/‖w_Q‖ <= tol``, or (every ``check_every`` iterations, if ``upper`` is given)
    when the duality gap certifies ``(upper − lower) <= rtol_loss · upper``: the dual objective
    ``λᵀw_Q − ½ λᵀKλ = ½ λᵀ(w_Q + r)`` is a lower bound on the optimal cost and increases
    monotonically under CG; the loss of any feasible point is an upper bound.
    """
    b = W * maskf
    bnorm = float(torch.linalg.vector_norm(b))
    U = torch.zeros_like(W)
    if bnorm == 0.0:
        return U, 0, 0.0, 0.0, None
    dinv = maskf / torch.outer(torch.diagonal(Ginv), torch.diagonal(Ainv))
    lam = torch.zeros_like(W)
    r = b.clone()
    z = r * dinv
    p = z.clone()
    rz = _dot(r, z)
    rel, it, lower = 1.0, 0, 0.0
    last: tuple[int, tuple[float, float, Tensor]] | None = None
    while it < max_iter:
        it += 1
        Kp_full = Ginv @ p @ Ainv
        Kp = Kp_full * maskf
        pKp = _dot(p, Kp)
        if not pKp > 0.0:  # breakdown (exact convergence or loss of positivity)
            break
        alpha = rz / pKp
        lam.add_(p, alpha=alpha)
        U.add_(Kp_full, alpha=alpha)
        r.sub_(Kp, alpha=alpha)
        rel = float(torch.linalg.vector_norm(r)) / bnorm
        if rel <= tol:
            break
        if upper is not None and rtol_loss > 0 and it % check_every == 0:
            lower = 0.5 * _dot(lam, b + r)
            last = (it, upper(U))
            if last[1][1] - lower <= rtol_loss * last[1][1]:
                break
        z = r * dinv
        rz_new = _dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    lower = 0.5 * _dot(lam, b + r)
    return U, it, rel, lower, last


def _chunked_gauss_seidel(W: Tensor, Ginv: Tensor, Ainv: Tensor, mask: Tensor,
                          max_correlate: int) -> tuple[Tensor, int, float]:
    """The released code's scheme: exact joint solves on consecutive (row-major) chunks of at
    most ``max_correlate`` removed weights, each reading the weights as updated by the previous
    chunks. Returns U with W − U the updated weights (before zeroing)."""
    qi_all, qj_all = mask.nonzero().unbind(1)
    Wcur = W.clone()
    n = qi_all.numel()
    chunks = 0
    for s in range(0, n, max_correlate):
        qi, qj = qi_all[s:s + max_correlate], qj_all[s:s + max_correlate]
        K = Ginv[qi[:, None], qi[None, :]] * Ainv[qj[:, None], qj[None, :]]
        lam = _spd_solve(K, Wcur[qi, qj][:, None])[:, 0]
        Wcur.sub_(_scatter_update(lam, qi, qj, Ginv, Ainv))
        chunks += 1
    wq = W[mask]
    rel = float(torch.linalg.vector_norm(Wcur[mask]) / torch.linalg.vector_norm(wq).clamp_min(
        torch.finfo(W.dtype).tiny))
    return W - Wcur, chunks, rel


def prune_unstructured(
    W: Tensor,
    G: Tensor,
    A: Tensor,
    mask: Tensor,
    *,
    Ginv: Tensor | None = None,
    Ainv: Tensor | None = None,
    max_correlate: int = 2000,
    method: Literal["cg", "chunked"] = "cg",
    tol: float = 1e-6,
    rtol_loss: float = 1e-3,
    max_iter: int = 200,
    check_every: int = 5,
    safeguard: bool = True,
    compute_dtype: torch.dtype | None = None,
    name: str = "layer",
) -> PruneResult:
    """Remove the weights in ``mask`` (bool, shape of W) with the correlated OBS update.

    ``G`` and ``A`` must be the *damped* factors (``Ginv``/``Ainv`` their inverses; computed with
    :func:`spd_inverse` when not given). ``mask`` must contain every weight that has to be zero
    afterwards, including weights already removed in earlier shots: weights outside the mask are
    free and an earlier zero outside the mask would generally become nonzero again. Also used for
    N:M (pass the N:M removal mask). The removed weights end exactly 0.

    Solves the KKT system of ``min ½ tr(ΔWᵀ G ΔW A) s.t. (W + ΔW)_Q = 0`` (module docstring):
    ``K λ = w_Q`` with ``K = (Ginv ⊗ Ainv)_QQ``, then ``ΔW = −Ginv Λ Ainv``.

    * ``|Q| <= max_correlate``: exactly, with a dense |Q|×|Q| Cholesky (:func:`correlated_update`).
    * otherwise, ``method="cg"`` (default): preconditioned conjugate gradients on the same
      system, never forming K: ``K p = (Ginv P Ainv)_Q`` is two dense matmuls (P the (out, in)
      matrix holding p on Q), the preconditioner is K's diagonal ``[Ginv]_ii [Ainv]_jj`` (the
      single-weight OBS denominators). It converges to the *exact* joint solution of all |Q|
      constraints (no chunking approximation). It stops at relative residual
      ``‖w_Q − K λ‖ <= tol ‖w_Q‖``, at ``max_iter`` iterations, or (checked every
      ``check_every`` iterations, one extra matmul pair per check) when a duality gap certifies
      that the returned loss is within ``rtol_loss`` (relative) of the optimum: the CG dual
      objective ``λᵀw_Q − ½ λᵀKλ`` is a lower bound on the optimal cost (``lower_bound`` in the
      result), the loss of the returned feasible point an upper bound. Measured on real K-FAC
      factors of SmolLM2-135M (G damped 10%, A 1%), fp32, 2 CPU cores: a 1536×576 MLP layer at
      50% unstructured needs 45-60 iterations (~20 ms each), ~1.1-1.4 s, for ``rtol_loss=1e-3``
      (~0.8-1 s, 25-40 iterations, for 1e-2); 2:4 similar; 576×576 layers 0.2-0.5 s; 5%
      removal 5-20 iterations. Alternatives tried and rejected: row-block preconditioners
      (2-4x fewer iterations but a batched factorisation costing more than all iterations),
      primal CG on the kept weights (3-10x more iterations).
    * ``method="chunked"``: what the paper's released code does (``--max_correlate 2000
      --addupdate``): exact solves on consecutive chunks of at most ``max_correlate`` removed
      weights, each on the weights as updated by the previous chunks; this is exactly one sweep
      of block Gauss-Seidel on ``K λ = w_Q`` (not converged). Much slower (one dense
      ``max_correlate``-sized Cholesky per chunk: ~8 s for the layer above) and far from the
      optimum (there ~2.1x the optimal loss, versus 1.001x for CG). Kept for
      reproduction/ablations. (The released code aligns chunk borders with rows; here chunks
      are plain row-major slices.)

    Safeguard (``safeguard=True``): the plain zeroing ``E`` (``−W`` on Q, 0 elsewhere) and the
    update ``D`` from the solver are both feasible, so is every ``E + t (D − E)``; the returned
    change uses the ``t`` minimising the quadratic on that line (``t → 1`` as the solver
    converges; ``step`` in the result). The result is therefore never worse than either plain
    zeroing or the solver's point, whatever ``max_iter``. Costs two extra matmul pairs.

    ``compute_dtype`` (default: fp64 if W or the factors are fp64, else fp32): e.g. pass
    ``torch.float32`` for fp64 inputs to run ~2x faster on CPU (same loss to 1e-6 in our
    tests); the result has W's dtype.
    """
    _check_shapes(W, G, A)
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a bool tensor of W's shape {tuple(W.shape)}")
    if method not in ("cg", "chunked"):
        raise ValueError(f"{name}: unknown method {method!r} (choose 'cg' or 'chunked')")
    if max_correlate < 0:
        raise ValueError("max_correlate must be >= 0")
    wd = compute_dtype or _work_dtype(W, G, A)
    if Ginv is None:
        Ginv = spd_inverse(G, name=f"{name} (G)")
    if Ainv is None:
        Ainv = spd_inverse(A, name=f"{name} (A)")
    _check_shapes(W, Ginv, Ainv)
    Wc, Gc, Ac, Gi, Ai = (t.to(wd) for t in (W, G, A, Ginv, Ainv))
    if not bool(torch.isfinite(Wc).all()):
        raise ValueError(f"{name}: weight has non-finite values")
    n_q = int(mask.sum())
    if n_q == 0:
        return PruneResult(W.clone(), 0.0, 0.0, "none", 0, 0.0, 1.0, 0.0)

    line = _LineSearch(Wc, Gc, Ac, mask, safeguard)
    last = None
    lower = float("nan")
    if n_q <= max_correlate:
        dW, cost = correlated_update(Wc, Gi, Ai, mask)
        U, used, iters, lower = -dW, "exact", 0, float(cost)
        rel = float(torch.linalg.vector_norm((Wc + dW)[mask])
                    / torch.linalg.vector_norm(Wc[mask]).clamp_min(torch.finfo(wd).tiny))
    elif method == "cg":
        U, iters, rel, lower, last = _dual_pcg(Wc, Gi, Ai, mask.to(wd), tol, max_iter, line,
                                               rtol_loss, check_every)
        used = "cg"
    else:
        U, iters, rel = _chunked_gauss_seidel(Wc, Gi, Ai, mask, max_correlate)
        used = "chunked"
    t, loss, step_dir = last[1] if last is not None and last[0] == iters else line(U)
    W_new = torch.where(mask, line.zero, Wc + t * step_dir)
    return PruneResult(W_new.to(W.dtype), loss, line.base, used, iters, rel, t, lower)


# ---- structured: rows, columns, groups, coupled units ----------------------------------------


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

    rows first, then columns of the row-pruned matrix (equal to :func:`structured_cost`).
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


@dataclass(frozen=True)
class UnitPart:
    """One layer's share of a coupled unit: rows and/or columns of ``weight``.

    E.g. an MLP channel c is ``UnitPart(W_gate, f_gate, rows=[c])``,
    ``UnitPart(W_up, f_up, rows=[c])``, ``UnitPart(W_down, f_down, cols=[c])``; an attention head
    is its rows in q/k/v and its columns in o.
    """

    weight: Tensor
    factors: KronFactors
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


# ---- semi-structured N:M ---------------------------------------------------------------------


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


# ---- the shared interface (methods/base.py): what the multi-shot driver calls ----------------


class SurgeonMethod(GlobalMethod):
    """LLM Surgeon behind the global-method interface.

    ``prepare`` damps both Kronecker factors (relative to their mean diagonals) and inverts them
    once per layer per shot; ``element_costs``/``line_costs`` are the closed-form removal costs
    (elements, or rows and columns); ``apply`` performs the correlated update of the remaining
    weights for everything the global threshold selected (which always includes what earlier
    shots removed, so it stays 0).
    """

    name = "surgeon"
    curvature = "kfac"
    updates = True
    prepares = True
    structures = ("unstructured", "nm", "rows-columns", "heads-channels")
    Settings = SurgeonSettings

    def __init__(self, settings: SurgeonSettings | None = None, *, rtol_loss: float = 1e-3,
                 compute_dtype: torch.dtype = torch.float32, **overrides) -> None:
        super().__init__(settings, **overrides)
        self.rtol_loss = rtol_loss
        self.compute_dtype = compute_dtype
        self.max_correlate = self.settings.max_correlate

    def prepare(self, curv, damp_g: float | None = None, damp_a: float | None = None,
                name: str = "layer") -> None:
        damp_g = self.settings.damp_g if damp_g is None else damp_g
        damp_a = self.settings.damp_a if damp_a is None else damp_a
        if curv.G is None or curv.A is None:
            raise ValueError(f"{name}: the surgeon needs Kronecker factors G and A")
        if all(bool(torch.isfinite(M).all()) for M in (curv.G, curv.A)) and any(
                float(torch.diagonal(M).abs().sum()) == 0.0 for M in (curv.G, curv.A)):
            # a dead layer (every output row or input column removed, or gradients that
            # underflow to exactly zero): F = G ⊗ A = 0, every removal costs 0, no update
            curv.flat = True
            return
        f = kron_factors(curv.G.double(), curv.A.double(), rel_damp_g=damp_g,
                         rel_damp_a=damp_a, name=name)
        dt = self.compute_dtype
        curv.G, curv.A, curv.Ginv, curv.Ainv = (f.G.to(dt), f.A.to(dt), f.Ginv.to(dt),
                                                f.Ainv.to(dt))

    def element_costs(self, W: Tensor, curv) -> Tensor:
        W = W.to(self.compute_dtype)
        if curv.flat:
            return torch.zeros_like(W)
        return element_costs(W, curv.Ginv, curv.Ainv)

    def line_costs(self, W: Tensor, curv) -> tuple[Tensor, Tensor]:
        W = W.to(self.compute_dtype)
        if curv.flat:
            return W.new_zeros(W.shape[0]), W.new_zeros(W.shape[1])
        return row_costs(W, curv.A, curv.Ginv), column_costs(W, curv.G, curv.Ainv)

    def unit_costs(self, W: Tensor, curv, axis: str, width: int, count: int) -> Tensor:
        """Cost of this layer's share of each of ``count`` coupled units (blocks of ``width``
        rows, or columns among the first ``count · width``; a bias column is never a unit's)."""
        W = W.to(self.compute_dtype)
        if curv.flat:
            return W.new_zeros(count)
        idx = torch.arange(count * width, device=W.device).view(count, width)
        if axis == "rows":
            return row_group_costs(W, curv.A, curv.Ginv, idx)
        return column_group_costs(W, curv.G, curv.Ainv, idx)

    def apply(self, W: Tensor, curv, removal) -> Tensor:
        W = W.to(self.compute_dtype)
        if curv.flat:
            from llm_surgeon.methods.obd import zero_removed

            return zero_removed(W, removal)
        if removal.mask is not None:
            return prune_unstructured(W, curv.G, curv.A, removal.mask, Ginv=curv.Ginv,
                                      Ainv=curv.Ainv, rtol_loss=self.rtol_loss,
                                      max_correlate=self.max_correlate).weight
        new, _ = prune_structured(W, curv.G, curv.A, curv.Ginv, curv.Ainv, removal.rows,
                                  removal.cols)
        return new


