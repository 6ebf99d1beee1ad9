"""Tests for the mAIHT layer-wise math (fp64, small problems)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from llm_surgeon.methods.maiht import hard_threshold, maiht_objective, maiht_prune
from llm_surgeon.methods.sparsegpt import num_to_prune

F64 = torch.float64



def _problem(seed: int = 0, rows: int = 10, cols: int = 20, n: int = 60):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=F64) / cols**0.5 + torch.eye(cols, dtype=F64)
    X = torch.randn(n, cols, generator=g, dtype=F64) @ mix
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    return X, W


def _raw_objective(X, W, W_hat, mu):
    """‖X Wᵀ − X Ŵᵀ‖_F² + μ ‖Ŵ‖_F² straight from the token rows."""
    return float((X @ W.T - X @ W_hat.T).square().sum() + mu * W_hat.square().sum())


def _restricted_optimum(W, H, support, mu):
    """Exact minimiser of the objective over matrices supported on ``support`` (row by row)."""
    out = torch.zeros_like(W)
    eye = torch.eye(W.shape[1], dtype=W.dtype)
    for i in range(W.shape[0]):
        S = torch.nonzero(support[i]).squeeze(1)
        if S.numel():
            A = (H + mu * eye)[S][:, S]
            out[i, S] = torch.linalg.solve(A, (W[i] @ H)[S])
    return out


@pytest.mark.parametrize(
    "init,refine,per_row",
    [("wanda", "cg", False), ("magnitude", "cg", False), ("wanda", "pgd", True)],
)
def test_history_monotone_and_equal_to_raw_objective(init, refine, per_row):
    X, W = _problem()
    H = X.T @ X
    mu = 3.0
    sparsity = 0.6
    W_hat, hist = maiht_prune(
        W, H, sparsity, mu=mu, return_history=True, init=init, refine=refine, per_row=per_row
    )
    assert len(hist) == 1 + 50 + 30
    assert all(b <= a for a, b in pairwise(hist))
    assert hist[-1] < hist[0]
    # the recorded objective is the true objective computed from the raw X
    raw = _raw_objective(X, W, W_hat, mu)
    assert abs(raw - hist[-1]) <= 1e-9 * raw
    if per_row:
        k_row = W.shape[1] - num_to_prune(W.shape[1], sparsity)
        assert torch.all((W_hat != 0).sum(1) <= k_row)
    else:
        assert int((W_hat != 0).sum()) <= W.numel() - num_to_prune(W.numel(), sparsity)
    # the initial value is the objective of the warm start, from raw X too
    s = W.abs() * torch.diagonal(H).sqrt() if init == "wanda" else None
    k = W.shape[1] - num_to_prune(W.shape[1], sparsity) if per_row else W.numel() * 2 // 5
    W0, _ = hard_threshold(W, k, per_row, scores=s)
    assert abs(_raw_objective(X, W, W0, mu) - hist[0]) <= 1e-9 * hist[0]


def test_safeguard_keeps_history_monotone_with_too_large_step():
    X, W = _problem(1)
    H = X.T @ X
    _, hist = maiht_prune(W, H, 0.5, mu=0.0, step_scale=4.0, return_history=True)
    assert all(b <= a for a, b in pairwise(hist))


def test_refinement_reaches_exact_restricted_optimum():
    # 20 inputs <= 30 CG iterations: CG is exact on every row's support.
    X, W = _problem(2)
    H = X.T @ X
    mu = 0.5
    W_hat = maiht_prune(W, H, 0.5, mu=mu)
    ref = _restricted_optimum(W, H, W_hat != 0, mu)
    assert float((W_hat - ref).norm() / ref.norm()) < 1e-8


def test_planted_sparse_support_and_values_recovered():
    # Y = X W*ᵀ with W* sparse. The method sees only H = XᵀX and a *dense* W = W* + c·1vᵀ,
    # where v is a direction that X nearly annihilates (‖Xv‖ = ε‖Gv‖): W and W* produce almost
    # the same outputs, but the dense perturbation hides W*'s support from magnitude and
    # Wanda scores. The objective (not the weights) pins W* down.
    g = torch.Generator().manual_seed(0)
    n, d, out, sparsity, eps, c = 400, 40, 8, 0.75, 1e-3, 4.0
    G = torch.randn(n, d, generator=g, dtype=F64)
    v = torch.randn(d, generator=g, dtype=F64)
    v /= v.norm()
    X = G @ (torch.eye(d, dtype=F64) - (1 - eps) * torch.outer(v, v))
    H = X.T @ X
    k = out * d - num_to_prune(out * d, sparsity)
    W_star = torch.zeros(out, d, dtype=F64)
    idx = torch.randperm(out * d, generator=g)[:k]
    signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).to(F64)
    W_star.view(-1)[idx] = (torch.rand(k, generator=g, dtype=F64) + 0.5) * signs
    row_signs = torch.where(torch.rand(out, generator=g) < 0.5, -1.0, 1.0).to(F64)
    W = W_star + c * row_signs[:, None] * v[None, :]
    support = W_star != 0
    assert float((X @ (W - W_star).T).norm()) < 1e-2 * float((X @ W_star.T).norm())

    # the problem is not trivial: neither warm start has the right support
    _, keep_mag = hard_threshold(W, k)
    _, keep_wanda = hard_threshold(W, k, scores=W.abs() * torch.diagonal(H).sqrt())
    assert int((keep_mag & support).sum()) < 0.75 * k
    assert int((keep_wanda & support).sum()) < 0.75 * k

    mu = 1e-6
    for init in ("magnitude", "wanda"):
        W_hat = maiht_prune(W, H, sparsity, mu=mu, init=init)
        assert torch.equal(W_hat != 0, support)
        assert float((W_hat - W_star).abs().max()) < 5e-3
        ref = _restricted_optimum(W, H, support, mu)
        assert float((W_hat - ref).norm() / ref.norm()) < 1e-8


def test_relative_mu_is_scale_invariant_and_beats_wanda():
    X, W = _problem(3, rows=12, cols=24, n=80)
    H = X.T @ X
    a = maiht_prune(W, H, 0.5, mu=1e-3, mu_mode="relative")
    b = maiht_prune(W, 1000.0 * H, 0.5, mu=1e-3, mu_mode="relative")
    assert torch.equal(a != 0, b != 0)
    assert float((a - b).norm() / a.norm()) < 1e-8
    # reconstruction error below Wanda's (no weight update) at the same sparsity
    s = W.abs() * torch.diagonal(H).sqrt()
    wanda, _ = hard_threshold(W, W.numel() // 2, per_row=False, scores=s)
    assert maiht_objective(a, W, H, 0.0) < maiht_objective(wanda, W, H, 0.0)


def test_dtype_and_validation():
    X, W = _problem(4)
    H = X.T @ X
    out = maiht_prune(W.float(), H.float(), 0.5, iht_iters=5, refine_iters=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        maiht_prune(W, H[:5, :5], 0.5)
    with pytest.raises(ValueError):
        maiht_prune(W, H, 0.5, mu_mode="bogus")  # type: ignore[arg-type]


def test_nm_projection_is_the_exact_euclidean_projection():
    """Brute force over every 2-of-4 support of each group: the kept entries are the closest
    2:4 matrix."""
    from itertools import combinations

    from llm_surgeon.methods.maiht import hard_threshold_nm

    V = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    P, keep = hard_threshold_nm(V, 2, 4)
    for r in range(3):
        for g in range(2):
            block = V[r, 4 * g : 4 * g + 4]
            best = min(
                (float((block - block * torch.tensor([i in c for i in range(4)])).square().sum()),
                 c) for c in combinations(range(4), 2))
            got = float((block - P[r, 4 * g : 4 * g + 4]).square().sum())
            assert got == pytest.approx(best[0], abs=1e-12)
            assert int(keep[r, 4 * g : 4 * g + 4].sum()) == 2


def test_nm_maiht_is_monotone_valid_and_beats_wanda_nm():
    from llm_surgeon.methods.nm import check_nm
    from llm_surgeon.methods.wanda import wanda_mask, wanda_scores

    X, W = _problem(seed=3, rows=8, cols=16, n=80)
    H = X.T @ X
    out, hist = maiht_prune(W, H, 0.5, mu=0.0, nm=(2, 4), return_history=True)
    assert all(b <= a + 1e-9 for a, b in pairwise(hist))
    assert check_nm(out, 2, 4)
    wanda = W.masked_fill(wanda_mask(wanda_scores(W, torch.diagonal(H)), n=2, m=4), 0)
    assert _raw_objective(X, W, out, 0.0) < _raw_objective(X, W, wanda, 0.0)
