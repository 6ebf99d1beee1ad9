"""mAIHT layer-wise pruning math (Wen, Zuo & Pan, ICML 2025).

"An Efficient Pruner for Large Language Model with Theoretical Guarantee" casts layer-wise
pruning as a sparsity-penalised least-squares problem solved by *monotone accelerated
iterative hard thresholding* (mAIHT). Pure tensor functions: no hooks, no models, no I/O.

Objective (nn.Linear orientation)
---------------------------------
``W`` is ``(out, in)``; the layer computes ``Y = X Wᵀ`` for token rows ``X`` ``(n, in)``.
With ``H = XᵀX``::

    f(Ŵ) = ‖X Wᵀ − X Ŵᵀ‖_F² + μ ‖Ŵ‖_F²
         = tr((Ŵ − W) H (Ŵ − W)ᵀ) + μ ‖Ŵ‖_F²            (exact, no constant dropped)
    ∇f(Ŵ) = 2 (Ŵ − W) H + 2 μ Ŵ                          (H multiplies from the right)

minimised subject to ``‖Ŵ‖₀ ≤ k`` with ``k = numel − ⌊sparsity · numel⌋`` per layer (or per
row with ``per_row=True``). ``∇f`` is ``L``-Lipschitz with ``L = 2 (λ_max(H) + μ)``; the step
is ``η = step_scale / L``. (The paper's "0.95/‖H‖₂" is the same step for the ½-scaled
objective ``½‖·‖² + ½μ‖·‖²``; we include μ in ``L`` so that ``η < 1/L`` holds for any μ.)

μ scaling (our choice)
----------------------
No implementation of the paper is public. We read its μ = 0.1 as an absolute weight on a
Hessian built the way the codebases it builds on (Wanda, SparseGPT, ADMM) build it,
``(2/num_sequences) · Σ_tokens x xᵀ``, whose diagonal is thousands of times the per-token
activation energy; read that way the ridge is tiny in practice (an assumption). Our
callers pass ``H`` as the raw running sum over all calibration tokens, which is the same
kind of scale (it differs by the factor ``2/num_sequences``), so the default
``mu_mode="absolute"`` uses ``μ_abs = mu`` unchanged: a negligible ridge for real
calibration sets.

``mu_mode="relative"`` uses ``μ_abs = mu · mean(diag H)``, which is invariant to rescaling
``H`` (sum vs mean, number of tokens) but is then a *strong* prior for ``mu = 0.1``: the
ridge shrinks weights towards zero, and with heavy-tailed activation energies most features
lie far below the mean (in a synthetic lognormal-energy test, ``mu=0.1`` relative gave 17x
the reconstruction error of Wanda while ``mu=0`` gave 0.87x). Use relative values of
``1e-3`` or less. Small problems (tests) with absolute μ should pick μ on the scale of
``diag H`` deliberately.

Algorithm (own implementation)
------------------------------
* **Adaptive hard thresholding.** The ℓ0-penalised proximal step
  ``prox_{ηλ‖·‖₀}(V) = V · 1[|V| > sqrt(2ηλ)]`` is used with a threshold re-chosen at every
  iteration so that exactly ``k`` entries survive (``sqrt(2ηλ_t)`` = the ``k``-th largest
  ``|V|``), i.e. ``HT_k`` keeps the ``k`` largest magnitudes. This is how the penalty weight
  adapts to hit the requested sparsity. (This and the acceleration below are our reading of
  the paper's abstract, "ℓ0-penalised" + "monotone accelerated IHT", and of the title of its
  Algorithm 1, "Adaptive IHT/mAIHT"; the algorithm text itself was not available to us.)
* **Monotone acceleration** (Li & Lin 2015 mAPG / Beck & Teboulle MFISTA style)::

      t_{s+1} = (1 + sqrt(1 + 4 t_s²)) / 2
      Y = Ŵ_s + (t_{s-1}/t_s)(Z_s − Ŵ_s) + ((t_{s-1} − 1)/t_s)(Ŵ_s − Ŵ_{s-1})
      Z_{s+1} = HT_k(Y − η ∇f(Y))                        (accelerated candidate)
      if f(Z_{s+1}) ≤ f(Ŵ_s):  Ŵ_{s+1} = Z_{s+1}
      else:  V = HT_k(Ŵ_s − η ∇f(Ŵ_s));  Ŵ_{s+1} = argmin(f(Z_{s+1}), f(V), f(Ŵ_s))

  ``V`` never increases ``f`` when ``η ≤ 1/L`` (descent lemma, and ``Ŵ_s`` itself is a
  feasible ``k``-sparse point), and keeping ``Ŵ_s`` as the last resort guards against
  round-off, so the recorded objective is non-increasing by construction.
* **Warm start**: ``init="wanda"`` keeps the ``k`` largest ``|W_ij| · sqrt(H_jj)`` (values
  from ``W``), ``init="magnitude"`` is ``HT_k(W)``.
* **Refinement on the final support** ``S``: ``refine_iters`` iterations of (row-batched)
  conjugate gradients on ``f`` restricted to ``S`` (``refine="cg"``, converges to the exact
  restricted least-squares/ridge solution; each accepted step decreases ``f``) or projected
  gradient steps ``Ŵ ← 1_S ∘ (Ŵ − η ∇f(Ŵ))`` (``refine="pgd"``). Any step that would increase
  the computed ``f`` (round-off only) is rejected.

``(Ŵ − W) H`` is cached and updated affinely, so an IHT iteration costs one or two
``(out × in) · (in × in)`` products and a CG iteration one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from llm_surgeon.methods.base import LayerwiseMethod
from llm_surgeon.methods.sparsegpt import num_to_prune
from llm_surgeon.settings import MAIHTSettings

__all__ = [
    "MAIHTMethod",
    "hard_threshold",
    "hard_threshold_nm",
    "maiht_objective",
    "maiht_prune",
    "resolve_mu",
]


def maiht_objective(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor, mu: float) -> float:
    """``f(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ) + μ ‖Ŵ‖_F²`` (= ``‖XWᵀ − XŴᵀ‖² + μ‖Ŵ‖²``), μ absolute."""
    D = W_hat - W
    return float(((D @ H) * D).sum() + mu * W_hat.square().sum())


def resolve_mu(H: torch.Tensor, mu: float, mu_mode: Literal["relative", "absolute"]) -> float:
    """Absolute ridge weight: ``mu · mean(diag H)`` (relative) or ``mu`` (absolute)."""
    if mu < 0:
        raise ValueError("mu must be >= 0")
    if mu_mode == "relative":
        return float(mu * torch.diagonal(H).mean())
    if mu_mode == "absolute":
        return float(mu)
    raise ValueError(f"mu_mode must be 'relative' or 'absolute', got {mu_mode!r}")


def hard_threshold(
    V: torch.Tensor, k: int, per_row: bool = False, scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``HT_k``: keep the ``k`` entries with the largest ``scores`` (default ``|V|``).

    With ``per_row=True`` ``k`` entries are kept in every row instead of in the whole matrix.
    Returns ``(V ∘ keep, keep)``; exactly ``k`` (per row) entries are in ``keep``.
    """
    s = V.abs() if scores is None else scores
    keep = torch.zeros_like(V, dtype=torch.bool)
    if per_row:
        k = min(k, V.shape[1])
        if k > 0:
            keep.scatter_(1, torch.topk(s, k, dim=1).indices, True)
    else:
        k = min(k, V.numel())
        if k > 0:
            keep.view(-1)[torch.topk(s.reshape(-1), k).indices] = True
    return torch.where(keep, V, torch.zeros_like(V)), keep


def hard_threshold_nm(
    V: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection onto the N:M set: in every group of ``m`` consecutive columns of each row keep
    the ``n`` entries with the largest ``scores`` (default ``|V|``). The set is a product of
    per-group sets, so this is the exact Euclidean projection (the IHT step stays valid)."""
    rows, cols = V.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not a multiple of m={m}")
    s = (V.abs() if scores is None else scores).reshape(rows, cols // m, m)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(2, torch.topk(s, n, dim=2).indices, True)
    keep = keep.reshape(rows, cols)
    return torch.where(keep, V, torch.zeros_like(V)), keep


def maiht_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    mu: float = 0.1,
    iht_iters: int = 50,
    refine_iters: int = 30,
    step_scale: float = 0.95,
    return_history: bool = False,
    *,
    mu_mode: Literal["relative", "absolute"] = "absolute",
    init: Literal["wanda", "magnitude"] = "wanda",
    refine: Literal["cg", "pgd"] = "cg",
    per_row: bool = False,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[float]]:
    """Prune ``W`` with monotone accelerated adaptive IHT, then refine on the support.

    Minimises ``f(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ) + μ ‖Ŵ‖_F²`` s.t. at most
    ``k = numel − ⌊sparsity · numel⌋`` nonzeros (see the module docstring).

    Args:
        W: ``(out, in)`` dense weight (fp16/bf16 work in fp32, fp64 stays fp64).
        H: ``(in, in)`` ``XᵀX`` of the layer inputs (sum or mean over tokens).
        sparsity: fraction of weights to remove, in ``[0, 1]``.
        mu: ridge weight, absolute by default (``μ_abs = mu``), or ``mu · mean(diag H)``
            with ``mu_mode="relative"``.
        iht_iters: accelerated IHT iterations.
        refine_iters: refinement iterations on the fixed support.
        step_scale: ``η = step_scale / (2 (λ_max(H) + μ))``; must be in ``(0, 1]`` for the
            descent guarantee (the monotone safeguard holds for any value).
        return_history: also return ``f`` after initialisation and after every iteration
            (``1 + iht_iters + refine_iters`` values, non-increasing; μ is the absolute one).
        mu_mode: ``"relative"`` or ``"absolute"``.
        init: warm start, ``"wanda"`` or ``"magnitude"``.
        refine: ``"cg"`` (conjugate gradients) or ``"pgd"`` (projected gradient).
        per_row: keep ``in − ⌊sparsity · in⌋`` weights in every row instead of ``k`` per layer.
        nm: ``(n, m)``: the constraint set is N:M instead (at most ``n`` nonzeros in every group
            of ``m`` consecutive inputs of a row; ``sparsity`` is then ignored); every hard
            threshold is the exact projection :func:`hard_threshold_nm`.

    Returns:
        ``Ŵ`` in ``W``'s dtype with at most ``k`` nonzeros (``(Ŵ, history)`` if requested).
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got {tuple(W.shape)}")
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for W of shape {tuple(W.shape)}")
    if not step_scale > 0.0:
        raise ValueError("step_scale must be > 0")
    if iht_iters < 0 or refine_iters < 0:
        raise ValueError("iteration counts must be >= 0")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W0 = W.detach().to(dtype)
    Hw = H.detach().to(device=W0.device, dtype=dtype)
    Hw = 0.5 * (Hw + Hw.T)
    mu_abs = resolve_mu(Hw, mu, mu_mode)
    k = (
        cols - num_to_prune(cols, sparsity)
        if per_row
        else W0.numel() - num_to_prune(W0.numel(), sparsity)
    )
    lam_max = float(torch.linalg.eigvalsh(Hw)[-1].clamp_min(0))
    L = 2.0 * (lam_max + mu_abs)
    eta = step_scale / L if L > 0 else 0.0

    def project(V: torch.Tensor, scores: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if nm is not None:
            return hard_threshold_nm(V, nm[0], nm[1], scores)
        return hard_threshold(V, k, per_row, scores=scores)

    def prod(V: torch.Tensor) -> torch.Tensor:  # (V − W) H
        return (V - W0) @ Hw

    def obj(V: torch.Tensor, PV: torch.Tensor) -> float:
        return float((PV * (V - W0)).sum() + mu_abs * V.square().sum())

    def grad(V: torch.Tensor, PV: torch.Tensor) -> torch.Tensor:
        return 2.0 * (PV + mu_abs * V)

    # warm start
    if init == "wanda":
        s = W0.abs() * torch.diagonal(Hw).clamp_min(0).sqrt().unsqueeze(0)
        x, supp = project(W0, scores=s)
    elif init == "magnitude":
        x, supp = project(W0)
    else:
        raise ValueError(f"init must be 'wanda' or 'magnitude', got {init!r}")
    Px = prod(x)
    fx = obj(x, Px)
    history = [fx]

    # monotone accelerated adaptive IHT
    x_prev, Px_prev = x, Px
    z, Pz = x, Px
    t_prev, t = 1.0, 1.0
    for _ in range(iht_iters):
        a, b = t_prev / t, (t_prev - 1.0) / t
        y = x + a * (z - x) + b * (x - x_prev)
        Py = Px + a * (Pz - Px) + b * (Px - Px_prev)  # (·−W)H is affine
        z, z_supp = project(y - eta * grad(y, Py))
        Pz = prod(z)
        fz = obj(z, Pz)
        best = (fz, z, Pz, z_supp) if fz <= fx else None
        if best is None:
            v, v_supp = project(x - eta * grad(x, Px))
            Pv = prod(v)
            fv = obj(v, Pv)
            cands = [(fz, z, Pz, z_supp), (fv, v, Pv, v_supp)]
            fb, xb, Pb, sb = min(cands, key=lambda c: c[0])
            best = (fb, xb, Pb, sb) if fb <= fx else (fx, x, Px, supp)
        x_prev, Px_prev = x, Px
        fx, x, Px, supp = best
        history.append(fx)
        t_prev, t = t, (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0

    # refinement on the fixed support
    Ms = supp.to(dtype)
    if refine == "cg":
        r = -(grad(x, Px) * Ms)
        p = r.clone()
        rs = r.square().sum(dim=1)
        stopped = False
        for _ in range(refine_iters):
            if not stopped:
                pH = p @ Hw
                Ap = 2.0 * (pH + mu_abs * p) * Ms
                pAp = (p * Ap).sum(dim=1)
                ok = pAp > 0
                alpha = torch.where(ok, rs / torch.where(ok, pAp, torch.ones_like(pAp)), 0.0)
                x_new = x + alpha.unsqueeze(1) * p
                Px_new = Px + alpha.unsqueeze(1) * pH
                f_new = obj(x_new, Px_new)
                if f_new <= fx:
                    x, Px, fx = x_new, Px_new, f_new
                    r = r - alpha.unsqueeze(1) * Ap
                    rs_new = r.square().sum(dim=1)
                    pos = rs > 0
                    beta = torch.where(pos, rs_new / torch.where(pos, rs, torch.ones_like(rs)), 0.0)
                    p = r + beta.unsqueeze(1) * p
                    rs = rs_new
                else:
                    stopped = True
            history.append(fx)
    elif refine == "pgd":
        for _ in range(refine_iters):
            x_new = (x - eta * grad(x, Px)) * Ms
            Px_new = prod(x_new)
            f_new = obj(x_new, Px_new)
            if f_new <= fx:
                x, Px, fx = x_new, Px_new, f_new
            history.append(fx)
    else:
        raise ValueError(f"refine must be 'cg' or 'pgd', got {refine!r}")

    x = x * Ms  # exact zeros off the support
    out = x.to(W.dtype)
    return (out, history) if return_history else out


# ---- the layer-wise interface (layerwise.py) ------------------------------------------------


class MAIHTMethod(LayerwiseMethod):
    """mAIHT behind the layer-wise driver: unstructured (the target sparsity in every layer) or
    N:M (hard thresholding projects onto the N:M set)."""

    name = "maiht"
    structures = ("unstructured", "nm")
    Settings = MAIHTSettings

    def prune_linear(self, W: torch.Tensor, H: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
        s = self.settings
        out = maiht_prune(W, H, sparsity, mu=s.mu, iht_iters=s.iht_iters,
                          refine_iters=s.refine_iters, step_scale=s.step, nm=nm)
        assert isinstance(out, torch.Tensor)
        return out
