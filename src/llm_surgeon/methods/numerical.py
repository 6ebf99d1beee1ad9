"""Numerical pruning layer-wise math (Shen et al., "Numerical Pruning for Efficient
Autoregressive Models", AAAI 2025, arXiv:2412.12441).

Structured pruning of the *input channels* of an output projection (``o_proj``: channels are
``num_heads · head_dim`` attention channels; ``down_proj``: the MLP intermediate channels).
Pure tensor functions: no hooks, no models, no I/O.

Orientation
-----------
``W`` is ``(out, D)`` like ``nn.Linear.weight``; with token rows ``X`` ``(n, D)`` the layer
computes ``Y = X Wᵀ``. A relaxed channel mask ``z ∈ R^D`` gives ``X diag(z) Wᵀ``. With
``H = XᵀX``::

    ½ ‖X Wᵀ − X diag(z) Wᵀ‖_F² = ½ (z − 1)ᵀ A (z − 1),     A = (WᵀW) ∘ H   (D × D)

because ``‖X diag(u) Wᵀ‖² = tr(W diag(u) H diag(u) Wᵀ) = Σ_ij u_i H_ij u_j (WᵀW)_ij``. (The
paper writes the weight as ``(D, out)`` so its ``W Wᵀ`` is our ``WᵀW``.) ``A`` is PSD (Schur
product of PSD matrices). The scoring problem is::

    L(z) = ½ (z − 1)ᵀ A (z − 1) + ½ λ (⟨1, z⟩ − r)²
    ∇L(z)  = A (z − 1) + λ (⟨1, z⟩ − r) 1
    ∇²L(z) = A + λ 1 1ᵀ

``L`` is quadratic, so one Newton step from ``z₀ = 1`` (where ``∇L = λ (D − r) 1``) lands on
the exact minimiser ``(A + λ11ᵀ) z* = A 1 + λ r 1``; further steps are no-ops up to
round-off (they only matter with ``percdamp > 0``, which makes the step inexact). By
Sherman–Morrison, for invertible ``A``::

    z* = 1 − c · A⁻¹ 1,     c = λ (D − r) / (1 + λ 1ᵀA⁻¹1) > 0   (r < D)

so the *ranking* of channels inside one layer does not depend on ``λ`` or ``r``; they only
set the scale of ``1 − z``. As ``λ → ∞`` the budget holds exactly (``⟨1, z*⟩ = r``). Low
``z`` = prune first.

Heads against channels (our choice)
-----------------------------------
A head's score is the mean of its channels' scores (:func:`head_scores`). The paper scores
attention and MLP modules "respectively"; we could not verify in its text how (or whether)
head and channel scores are ranked together. For a global ranking we provide
:func:`standardize_scores`, a per-module z-score ``(s − mean(s)) / std(s)`` (the
standardisation FLAP uses to rank heads against channels across layers), applied to each
module's head or channel scores separately; callers then rank the standardised scores
globally (and must account for a head holding ``head_dim`` channels when counting
parameters). Without a global ranking, prune the lowest scores within each module with the
same ratio.

Compensation
------------
Removing the channel set ``P`` (kept ``K``), the paper's update in our orientation is, row
by row, the OBS update with ``Ĥ = H + δ I`` (their ``2XᵀX`` differs by a factor that
cancels), ``δ = percdamp · mean(diag H)``::

    δW = − W_P (Ĥ⁻¹_PP)⁻¹ Ĥ⁻¹_{P,:}      ⇔      Ŵ_K = W_K + W_P Ĥ_PK Ĥ_KK⁻¹,  Ŵ_P = 0

(the two are equal by the block-inverse/Schur-complement identity). ``Ŵ_K`` is the
(ridge-damped) least-squares solution of ``X_K Ŵ_Kᵀ ≈ X Wᵀ``; with ``percdamp = 0`` it is
exactly ``lstsq(X_K, X Wᵀ)ᵀ``. We solve with ``Ĥ_KK`` (Cholesky), which is the more stable
form.
"""

from __future__ import annotations

import torch

from llm_surgeon.methods.base import UnitScoringMethod
from llm_surgeon.methods.sparsegpt import damp_hessian
from llm_surgeon.settings import NumericalSettings

__all__ = [
    "NumericalMethod",
    "channel_hessian",
    "compensate",
    "head_scores",
    "newton_scores",
    "relaxed_mask_loss",
    "standardize_scores",
]


def _work(t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(dtype)


def channel_hessian(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``A = (WᵀW) ∘ H``, the ``D × D`` Hessian of ``½‖XWᵀ − X diag(z) Wᵀ‖²`` in ``z``."""
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"expected W (out, D) and H (D, D), got {tuple(W.shape)}, {tuple(H.shape)}"
        )
    Ww = _work(W)
    Hw = H.detach().to(device=Ww.device, dtype=Ww.dtype)
    return (Ww.T @ Ww) * Hw


def relaxed_mask_loss(
    z: torch.Tensor, W: torch.Tensor, H: torch.Tensor, r: float, lam: float
) -> float:
    """``L(z) = ½ (z − 1)ᵀ A (z − 1) + ½ λ (⟨1, z⟩ − r)²`` with ``A = (WᵀW) ∘ H``."""
    A = channel_hessian(W, H)
    u = z.to(A) - 1.0
    return float(0.5 * u @ (A @ u) + 0.5 * lam * (z.to(A).sum() - r) ** 2)


def _psd_solve(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``M x = b`` for symmetric PSD ``M``: Cholesky, else pseudo-inverse (min-norm)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.pinv(M, hermitian=True) @ b


def newton_scores(
    W: torch.Tensor,
    H: torch.Tensor,
    r: float,
    lam: float,
    iters: int = 1,
    percdamp: float = 0.0,
) -> torch.Tensor:
    """Numerical-pruning channel scores: Newton's method on the relaxed mask problem.

    Minimises ``L(z) = ½ (z − 1)ᵀ A (z − 1) + ½ λ (⟨1, z⟩ − r)²``, ``A = (WᵀW) ∘ H``, from
    ``z₀ = 1`` with ``z ← z − (A + λ11ᵀ + δI)⁻¹ ∇L(z)``, ``δ = percdamp · mean(diag A)``. With
    ``percdamp = 0`` the first step is exact (``L`` is quadratic); a singular Hessian falls
    back to the minimum-norm (pseudo-inverse) step.

    Args:
        W: ``(out, D)`` weight of the output projection (``o_proj`` / ``down_proj``).
        H: ``(D, D)`` ``XᵀX`` of its inputs. ``A`` scales with ``H`` and ``W``, so ``lam`` is
            absolute: it must be on the scale of ``A`` to matter (e.g. a multiple of
            ``mean(diag A)``); the ranking within the layer does not depend on it.
        r: target number of kept channels (``⟨1, z⟩ ≈ r``).
        lam: budget-penalty weight ``λ > 0``.
        iters: Newton iterations.
        percdamp: optional relative Tikhonov damping of the Newton system.

    Returns:
        ``z`` ``(D,)``: one score per channel, lower = less important.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    A = channel_hessian(W, H)
    D = A.shape[0]
    ones = torch.ones(D, dtype=A.dtype, device=A.device)
    hess = A + lam * torch.outer(ones, ones)
    if percdamp > 0:
        eye = torch.eye(D, dtype=A.dtype, device=A.device)
        hess = hess + percdamp * torch.diagonal(A).mean() * eye
    z = ones.clone()
    for _ in range(iters):
        g = A @ (z - 1.0) + lam * (z.sum() - r) * ones
        z = z - _psd_solve(hess, g)
    return z


def head_scores(z: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Score of each head = mean of its ``head_dim`` consecutive channel scores."""
    if z.ndim != 1 or z.shape[0] % head_dim != 0:
        raise ValueError(f"z of length {z.shape[-1]} is not a whole number of heads of {head_dim}")
    return z.reshape(-1, head_dim).mean(dim=1)


def standardize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-module z-score ``(s − mean(s)) / std(s)`` (population std) for global ranking.

    Apply to each module's score vector (one layer's head scores, or one layer's MLP channel
    scores) separately, then compare the results across modules. A constant vector maps to 0.
    """
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    c = s - s.mean()
    std = c.square().mean().sqrt()
    return c / std if float(std) > 0 else torch.zeros_like(c)


def compensate(
    W: torch.Tensor, H: torch.Tensor, keep_mask: torch.Tensor, percdamp: float = 0.01
) -> torch.Tensor:
    """Closed-form compensation after removing input channels (columns) of ``W``.

    ``Ŵ_K = W_K + W_P Ĥ_PK Ĥ_KK⁻¹``, ``Ŵ_P = 0`` with ``Ĥ = H + percdamp · mean(diag H) · I``
    (dead inputs, ``H_jj = 0``, get ``H_jj = 1`` first). This is the paper's
    ``δW = −W_P (Ĥ⁻¹_PP)⁻¹ Ĥ⁻¹_{P,:}`` and the damped least-squares fit of ``X_K Ŵ_Kᵀ`` to
    ``X Wᵀ``.

    Args:
        W: ``(out, D)`` weight.
        H: ``(D, D)`` ``XᵀX`` (sum or mean over tokens).
        keep_mask: ``(D,)`` bool, ``True`` = keep the channel.
        percdamp: relative damping.

    Returns:
        New ``(out, D)`` weight in ``W``'s dtype with the removed columns exactly zero.
    """
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]) or keep_mask.shape != (W.shape[1],):
        raise ValueError("expected W (out, D), H (D, D) and keep_mask (D,)")
    Ww = _work(W)
    Hd, _ = damp_hessian(H.detach().to(device=Ww.device, dtype=Ww.dtype), percdamp)
    keep = keep_mask.to(device=Ww.device, dtype=torch.bool)
    K = torch.nonzero(keep).squeeze(1)
    P = torch.nonzero(~keep).squeeze(1)
    out = torch.zeros_like(Ww)
    if K.numel() == 0:
        return out.to(W.dtype)
    WK = Ww[:, K]
    if P.numel() > 0:
        L = torch.linalg.cholesky(Hd[K][:, K])
        B = Ww[:, P] @ Hd[P][:, K]  # (out, |K|)
        WK = WK + torch.cholesky_solve(B.T, L).T
    out[:, K] = WK
    return out.to(W.dtype)


# ---- the coupled-unit interface (layerwise.run_unit_scoring) -------------------------------


class NumericalMethod(UnitScoringMethod):
    """Numerical pruning behind the coupled-unit driver (heads in whole KV groups, MLP channels).

    For every output projection (o / down) with input statistics H: Newton scores of its input
    channels (:func:`newton_scores`, ``r`` = the kept fraction of the channels, ``λ`` =
    ``lam_scale · mean(diag A)``); a unit's score is the mean over its channels (a KV group: the
    channels of all its query heads); scores are standardised per module
    (:func:`standardize_scores`) and ranked globally, lowest first. Removal zeroes the unit's
    input-side rows and compensates the output projection (:func:`compensate`).
    """

    name = "numerical"
    structures = ("heads-channels",)
    Settings = NumericalSettings

    def __init__(self, settings: NumericalSettings | None = None, *, lam_scale: float = 1.0,
                 **overrides) -> None:
        super().__init__(settings, **overrides)
        self.lam_scale = lam_scale

    def unit_scores(self, W: torch.Tensor, H: torch.Tensor, width: int, count: int,
                    keep_fraction: float) -> torch.Tensor:
        Wc = W[:, : count * width].double()
        Hc = H[: count * width, : count * width].double()
        A_diag_mean = float(channel_hessian(Wc, Hc).diagonal().mean())
        lam = self.lam_scale * max(A_diag_mean, 1e-12)
        z = newton_scores(Wc, Hc, r=keep_fraction * count * width, lam=lam)
        return standardize_scores(head_scores(z, width))

    def compensate(self, W: torch.Tensor, H: torch.Tensor, keep_cols: torch.Tensor
                   ) -> torch.Tensor:
        return compensate(W, H, keep_cols, percdamp=self.settings.percdamp)
