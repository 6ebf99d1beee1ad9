"""Tests for the Numerical-pruning layer-wise math (fp64, small problems)."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon.methods.numerical import (
    channel_hessian,
    compensate,
    head_scores,
    newton_scores,
    relaxed_mask_loss,
    standardize_scores,
)

F64 = torch.float64



def _problem(seed: int = 0, out: int = 6, D: int = 16, n: int = 90):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g, dtype=F64) / D**0.5 + torch.eye(D, dtype=F64)
    X = torch.randn(n, D, generator=g, dtype=F64) @ mix
    W = torch.randn(out, D, generator=g, dtype=F64)
    return X, W


def _raw_loss(z, X, W, r, lam):
    """½ ‖X Wᵀ − X diag(z) Wᵀ‖² + ½ λ (⟨1, z⟩ − r)², straight from the token rows."""
    return 0.5 * (X @ W.T - (X * z) @ W.T).square().sum() + 0.5 * lam * (z.sum() - r) ** 2


@pytest.mark.parametrize("r,lam", [(8.0, 50.0), (12.0, 1e4), (3.0, 0.1)])
def test_newton_score_is_the_closed_form_minimiser(r, lam):
    X, W = _problem()
    H = X.T @ X
    z = newton_scores(W, H, r, lam)
    # closed form from the raw data: (A + λ11ᵀ) z = A1 + λ r 1, A = (WᵀW) ∘ (XᵀX)
    A = (W.T @ W) * (X.T @ X)
    ones = torch.ones(W.shape[1], dtype=F64)
    ref = torch.linalg.solve(A + lam * torch.outer(ones, ones), A @ ones + lam * r * ones)
    assert float((z - ref).norm() / ref.norm()) < 1e-10
    # stationary point of the loss written with raw X (autograd)
    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_raw_loss(zz, X, W, r, lam), zz)
    scale = float(A.diagonal().max() + lam * W.shape[1])
    assert float(grad.abs().max()) < 1e-9 * scale
    # A is the Hessian of the data term: loss via A equals the raw loss
    assert abs(relaxed_mask_loss(z, W, H, r, lam) - float(_raw_loss(z, X, W, r, lam))) < 1e-8


def test_one_newton_step_is_exact_and_damped_newton_converges():
    X, W = _problem(1)
    H = X.T @ X
    z1 = newton_scores(W, H, 10.0, 30.0, iters=1)
    z4 = newton_scores(W, H, 10.0, 30.0, iters=4)
    assert float((z1 - z4).norm() / z1.norm()) < 1e-12
    zd = newton_scores(W, H, 10.0, 30.0, iters=1, percdamp=1e-2)
    assert float((zd - z1).norm()) > 1e-6  # a damped step is not exact ...
    zd = newton_scores(W, H, 10.0, 30.0, iters=60, percdamp=1e-2)
    assert float((zd - z1).norm() / z1.norm()) < 1e-8  # ... but iterating converges


def test_ranking_independent_of_lambda_and_budget():
    # Sherman–Morrison: z* = 1 − c · A⁻¹1 with c > 0, so only the scale depends on λ and r.
    X, W = _problem(2)
    H = X.T @ X
    A = channel_hessian(W, H)
    a = torch.linalg.solve(A, torch.ones(W.shape[1], dtype=F64))
    order = torch.argsort(-a)
    for r, lam in [(4.0, 1.0), (12.0, 1e3), (8.0, 1e8)]:
        z = newton_scores(W, H, r, lam)
        assert torch.equal(torch.argsort(z), order)
    z = newton_scores(W, H, 8.0, 1e12)  # hard budget in the limit λ → ∞
    assert abs(float(z.sum()) - 8.0) < 1e-5


def test_head_scores_and_standardization():
    z = torch.arange(12, dtype=F64)
    assert torch.equal(head_scores(z, 4), torch.tensor([1.5, 5.5, 9.5], dtype=F64))
    with pytest.raises(ValueError):
        head_scores(z, 5)
    s = standardize_scores(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=F64))
    assert abs(float(s.mean())) < 1e-12 and abs(float(s.square().mean()) - 1.0) < 1e-12
    # invariant to the scale and offset of a module's scores
    s2 = standardize_scores(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=F64) * 7 + 3)
    assert torch.allclose(s, s2)
    assert torch.equal(standardize_scores(torch.full((5,), 2.0)), torch.zeros(5))


def _keep(D: int, seed: int) -> torch.Tensor:
    keep = torch.ones(D, dtype=torch.bool)
    keep[torch.randperm(D, generator=torch.Generator().manual_seed(seed))[: D // 3]] = False
    return keep


def test_compensation_equals_least_squares_on_kept_channels():
    X, W = _problem(3)
    keep = _keep(W.shape[1], 0)
    W_new = compensate(W, X.T @ X, keep, percdamp=0.0)
    sol = torch.linalg.lstsq(X[:, keep], X @ W.T).solution  # (|K|, out)
    assert float((W_new[:, keep] - sol.T).norm() / sol.norm()) < 1e-10
    assert torch.all(W_new[:, ~keep] == 0)
    # and it beats simply dropping the channels
    dropped = W.masked_fill(~keep[None, :], 0.0)
    assert (X @ (W - W_new).T).norm() < (X @ (W - dropped).T).norm()


def test_damped_compensation_equals_ridge_lstsq_and_paper_form():
    X, W = _problem(4)
    H = X.T @ X
    D = W.shape[1]
    keep = _keep(D, 1)
    percdamp = 0.05
    W_new = compensate(W, H, keep, percdamp=percdamp)
    delta = percdamp * float(H.diagonal().mean())
    # damping = least squares on data augmented with sqrt(δ)·I rows
    X_aug = torch.cat([X, delta**0.5 * torch.eye(D, dtype=F64)])
    sol = torch.linalg.lstsq(X_aug[:, keep], X_aug @ W.T).solution
    assert float((W_new[:, keep] - sol.T).norm() / sol.norm()) < 1e-10
    # the paper's form δW = −W_P (Ĥ⁻¹_PP)⁻¹ Ĥ⁻¹_{P,:} (nn.Linear orientation)
    Hinv = torch.linalg.inv(H + delta * torch.eye(D, dtype=F64))
    P = ~keep
    dW = -W[:, P] @ torch.linalg.solve(Hinv[P][:, P], Hinv[P, :])
    paper = W + dW
    assert float(paper[:, P].abs().max()) < 1e-10
    assert float((W_new[:, keep] - paper[:, keep]).norm() / paper.norm()) < 1e-10


def test_compensation_edge_cases():
    X, W = _problem(5)
    X[:, 2] = 0.0  # dead channel
    H = X.T @ X
    keep = _keep(W.shape[1], 2)
    W_new = compensate(W.float(), H.float(), keep)
    assert W_new.dtype == torch.float32 and torch.isfinite(W_new).all()
    assert torch.equal(compensate(W, H, torch.ones(W.shape[1], dtype=torch.bool)), W)
    assert torch.all(compensate(W, H, torch.zeros(W.shape[1], dtype=torch.bool)) == 0)
    # a singular Newton system (dead channel, tiny λ) still gives finite scores
    assert torch.isfinite(newton_scores(W, H, 8.0, 0.0)).all()
