"""Exactness tests for the SparseGPT layer-wise math (fp64, small problems)."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon.methods.sparsegpt import (
    damp_hessian,
    num_to_prune,
    sparsegpt_prune,
    sparsegpt_reconstruct,
)

F64 = torch.float64



def _problem(seed: int = 0, rows: int = 6, cols: int = 24, n: int = 80):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=F64) / cols**0.5 + torch.eye(cols, dtype=F64)
    X = torch.randn(n, cols, generator=g, dtype=F64) @ mix  # correlated features
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    return X, W, X.T @ X


def _sequential_obs_reference(W, Hd, mask):
    """Row by row, column by column: zero a pruned column, re-optimise the later columns."""
    out = W.clone()
    cols = W.shape[1]
    for i in range(W.shape[0]):
        w = out[i].clone()
        for c in range(cols):
            if mask[i, c]:
                a = w[c].clone()
                w[c] = 0.0
                if c + 1 < cols:
                    w[c + 1 :] += a * torch.linalg.solve(Hd[c + 1 :, c + 1 :], Hd[c + 1 :, c])
        out[i] = w
    return out


def _joint_obs(W, Hd, mask):
    """Exact optimum of (ŵ−w) Ĥ (ŵ−w)ᵀ with ŵ_R = 0: ŵ_K = w_K + Ĥ_KK⁻¹ Ĥ_KR w_R."""
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        K = torch.nonzero(~mask[i]).squeeze(1)
        R = torch.nonzero(mask[i]).squeeze(1)
        out[i, K] = W[i, K] + torch.linalg.solve(Hd[K][:, K], Hd[K][:, R] @ W[i, R])
    return out


def _err(Wn, W, Hd):
    D = Wn - W
    return float(((D @ Hd) * D).sum())


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
def test_fixed_mask_equals_sequential_obs_reference(percdamp):
    _, W, H = _problem()
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(W.shape, generator=g) < 0.5
    Hd, _ = damp_hessian(H, percdamp)
    ref = _sequential_obs_reference(W, Hd, mask)
    got = sparsegpt_reconstruct(W, H, mask, blocksize=5, percdamp=percdamp)
    assert _rel(got, ref) < 1e-10
    assert torch.all(got[mask] == 0)


def test_fixed_mask_independent_of_blocksize():
    _, W, H = _problem(2)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    outs = [sparsegpt_reconstruct(W, H, mask, blocksize=b) for b in (1, 4, 7, 24, 128)]
    for o in outs[1:]:
        assert _rel(o, outs[0]) < 1e-12


def test_equals_joint_obs_when_pruned_columns_precede_kept_ones():
    # Each row prunes a prefix of its columns (different lengths): then freezing visited
    # columns costs nothing and the sequential result is the joint OBS / least-squares optimum.
    _, W, H = _problem(4)
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i, p in enumerate([3, 12, 0, 23, 7, 15]):
        mask[i, :p] = True
    Hd, _ = damp_hessian(H, 0.01)
    got = sparsegpt_reconstruct(W, H, mask, blocksize=8)
    ref = _joint_obs(W, Hd, mask)
    for i in range(rows):
        assert _rel(got[i], ref[i]) < 1e-6
    # the kept weights are the stationary point of the damped quadratic on the kept set
    grad = (got - W) @ Hd
    assert float(grad[~mask].abs().max()) < 1e-8 * float(Hd.abs().max() * W.abs().max())


def test_not_joint_obs_in_general_but_never_better():
    # Counterexample to "sequential = joint": two correlated columns, prune the second one.
    H = torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=F64)
    W = torch.tensor([[1.0, 2.0]], dtype=F64)
    mask = torch.tensor([[False, True]])
    got = sparsegpt_reconstruct(W, H, mask, percdamp=0.0)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0]], dtype=F64))  # kept column is frozen first
    assert torch.allclose(_joint_obs(W, H, mask), torch.tensor([[1.0 + 0.6 * 2.0, 0.0]], dtype=F64))
    # In general the joint optimum is at least as good, and SparseGPT beats plain zeroing.
    _, W, H = _problem(5)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(6)) < 0.5
    Hd, _ = damp_hessian(H, 0.01)
    seq = sparsegpt_reconstruct(W, H, mask)
    joint = _joint_obs(W, Hd, mask)
    zeroed = W.masked_fill(mask, 0.0)
    assert _err(joint, W, Hd) <= _err(seq, W, Hd) * (1 + 1e-12)
    assert _err(seq, W, Hd) < _err(zeroed, W, Hd)


@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 128), (0.3, 7), (0.29, 5), (0.0, 8)])
def test_unstructured_exact_count_and_zeros(sparsity, blocksize):
    _, W, H = _problem(7, rows=7, cols=30)
    Wn, mask = sparsegpt_prune(W, H, sparsity=sparsity, blocksize=blocksize)
    assert int(mask.sum()) == num_to_prune(W.numel(), sparsity)
    assert torch.all(Wn[mask] == 0)
    assert Wn.dtype == W.dtype and Wn.shape == W.shape
    # replaying the chosen mask reproduces the result
    assert _rel(sparsegpt_reconstruct(W, H, mask, blocksize=blocksize), Wn) < 1e-12


def test_selection_on_diagonal_hessian():
    # Diagonal H: no cross-column updates; the saliency w² / [Ĥ⁻¹]_cc = w² Ĥ_cc decides.
    g = torch.Generator().manual_seed(11)
    W = torch.randn(4, 20, generator=g, dtype=F64)
    H = torch.diag(torch.rand(20, generator=g, dtype=F64) * 5 + 0.1)
    Wn, mask = sparsegpt_prune(W, H, sparsity=0.4, blocksize=20)
    Hd, _ = damp_hessian(H, 0.01)
    sal = W.square() * torch.diagonal(Hd)
    expect = torch.zeros_like(mask)
    expect.view(-1)[torch.topk(sal.view(-1), 32, largest=False).indices] = True
    assert torch.equal(mask, expect)
    assert torch.equal(Wn, W.masked_fill(mask, 0.0))
    # N:M on the same problem: the 2 lowest saliencies of each group of 4 are removed
    Wn, mask = sparsegpt_prune(W, H, n=2, m=4)
    low = torch.topk(sal.view(4, 5, 4), 2, dim=-1, largest=False).indices
    expect = torch.zeros(4, 5, 4, dtype=torch.bool).scatter_(-1, low, True).view(4, 20)
    assert torch.equal(mask, expect)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (2, 4, 6), (4, 8, 16), (1, 3, 9)])
def test_nm_pattern_exact(n, m, blocksize):
    _, W, H = _problem(8, rows=5, cols=24)
    Wn, mask = sparsegpt_prune(W, H, n=n, m=m, blocksize=blocksize)
    groups = mask.reshape(W.shape[0], -1, m)
    assert torch.all(groups.sum(-1) == m - n)
    assert torch.all((Wn != 0).reshape(W.shape[0], -1, m).sum(-1) <= n)
    assert torch.all(Wn[mask] == 0)
    assert _rel(sparsegpt_reconstruct(W, H, mask), Wn) < 1e-12


def test_beats_magnitude_and_handles_dead_inputs_fp32():
    X, W, H = _problem(9, rows=8, cols=32, n=100)
    X[:, [3, 17]] = 0.0  # dead inputs
    H = X.T @ X
    Wn, mask = sparsegpt_prune(W.float(), H.float(), sparsity=0.5, blocksize=16)
    assert Wn.dtype == torch.float32 and torch.isfinite(Wn).all()
    assert torch.all(Wn[:, [3, 17]] == 0)
    assert int(mask.sum()) == W.numel() // 2
    Hd, _ = damp_hessian(H, 0.01)
    mag = W.clone()
    mag.view(-1)[torch.topk(W.abs().view(-1), W.numel() // 2, largest=False).indices] = 0
    assert _err(Wn.double(), W, Hd) < _err(mag, W, Hd)


def test_argument_validation():
    _, W, H = _problem()
    with pytest.raises(ValueError):
        sparsegpt_prune(W, H)
    with pytest.raises(ValueError):
        sparsegpt_prune(W, H, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError):
        sparsegpt_prune(W, H, n=2, m=5)  # 24 columns not a multiple of 5
