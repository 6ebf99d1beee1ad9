"""Tests for the Wanda layer-wise math (fp64, small problems)."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon.methods.wanda import wanda_mask, wanda_scores

F64 = torch.float64



def _problem(seed: int = 0, rows: int = 7, cols: int = 24, n: int = 50):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=F64) * torch.rand(cols, generator=g, dtype=F64)
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    return X, W


def test_scores_equal_weight_times_activation_norm_from_raw_x():
    X, W = _problem()
    H = X.T @ X
    got = wanda_scores(W, torch.diagonal(H))
    ref = torch.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            ref[i, j] = W[i, j].abs() * torch.linalg.vector_norm(X[:, j])
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    # chunked running sums of squared norms give the same scores
    sq = sum(x.square().sum(0) for x in X.split(7))
    assert torch.allclose(wanda_scores(W, sq), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.29, 0.0, 1.0])
def test_per_row_sparsity_exact_and_lowest_scores_removed(sparsity):
    X, W = _problem(1, cols=100)
    s = wanda_scores(W, X.square().sum(0))
    mask = wanda_mask(s, sparsity=sparsity)
    k = round(sparsity * 100)
    assert torch.all(mask.sum(1) == k)
    for i in range(W.shape[0]):
        if 0 < k < 100:
            assert s[i][mask[i]].max() <= s[i][~mask[i]].min()


def test_per_output_comparison_not_per_layer():
    # Row 0 has much larger weights than row 1; a per-layer threshold would strip row 1,
    # the per-output comparison removes half of each row.
    W = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.1, 0.2, 0.3, 0.4]], dtype=F64)
    mask = wanda_mask(wanda_scores(W, torch.ones(4, dtype=F64)), sparsity=0.5)
    assert torch.equal(mask, torch.tensor([[True, True, False, False]] * 2))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 3)])
def test_nm_exact(n, m):
    X, W = _problem(2, cols=48)
    s = wanda_scores(W, X.square().sum(0))
    mask = wanda_mask(s, n=n, m=m)
    groups = mask.reshape(W.shape[0], -1, m)
    assert torch.all(groups.sum(-1) == m - n)
    sg = s.reshape(W.shape[0], -1, m)
    if 0 < m - n < m:
        removed_max = sg.masked_fill(~groups, -1.0).amax(-1)
        kept_min = sg.masked_fill(groups, float("inf")).amin(-1)
        assert torch.all(removed_max <= kept_min)
    pruned = W.masked_fill(mask, 0.0)
    assert torch.all((pruned != 0).reshape(W.shape[0], -1, m).sum(-1) <= n)


def test_validation_and_dtype():
    s = torch.rand(3, 10)
    with pytest.raises(ValueError):
        wanda_mask(s, n=2, m=4)  # 10 not a multiple of 4
    with pytest.raises(ValueError):
        wanda_mask(s, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError):
        wanda_mask(s)
    W16 = torch.randn(3, 8).to(torch.bfloat16)
    assert wanda_scores(W16, torch.ones(8)).dtype == torch.float32
