"""collect_kfac / collect_activations against a brute-force computation on tiny random models.

The reference stores every target linear's input and output tensors with forward hooks, runs
the summed next-token cross-entropy backward once per window, and forms

    A = mean over tokens of ā āᵀ   (ā = [a; 1] when the linear has a bias)
    G = mean over tokens of g gᵀ   (g = ∂ℓ/∂y from the stored outputs' ``.grad``)

directly from the stored tensors: no running sums, no input sharing, no shared code with
:mod:`llm_surgeon.curvature.kfac`. Everything runs in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llm_surgeon.curvature import kfac
from llm_surgeon.curvature.kfac import (
    PackedGram,
    add_gram_,
    collect_activations,
    collect_kfac,
    kfac_sums,
    symmetric_from_upper,
)
from llm_surgeon.models.layouts import (
    ATTN_K,
    ATTN_O,
    ATTN_Q,
    ATTN_V,
    MLP_DOWN,
    MLP_GATE,
    MLP_UP,
    decoder_linears,
    layout_for,
)
from tests.conftest import FAMILIES, tiny_model

F64 = torch.float64
N_WINDOWS = 3
SEQLEN = 12
# Everything is float64 end to end (the loss too), so agreement is at round-off level; a loss
# computed in float32 would show up here as ~1e-7 errors in G.
RTOL = 1e-9



def _model(family: str):
    return tiny_model(family).double()


def _windows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (N_WINDOWS, SEQLEN), generator=g, dtype=torch.int64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _brute_force(model, windows):
    """Reference A and G of every target, from stored inputs/outputs (one window at a time)."""
    model = copy.deepcopy(model)  # the original stays untouched (flags, .grad)
    targets = decoder_linears(model)
    inputs: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    outputs: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}

    def make_hook(name):
        def hook(module, args, output):
            inputs[name].append(args[0].detach().clone())
            output.retain_grad()
            outputs[name].append(output)

        return hook

    handles = [t.module.register_forward_hook(make_hook(t.name)) for t in targets]
    try:
        for ids in windows.split(1):
            logits = model(input_ids=ids, use_cache=False).logits
            assert logits.dtype == F64
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   ids[:, 1:].reshape(-1), reduction="sum")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    ref = {}
    for t in targets:
        a = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[t.name]])
        if t.has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        g = torch.cat([y.grad.reshape(-1, y.shape[-1]) for y in outputs[t.name]])
        assert a.shape[0] == g.shape[0] == N_WINDOWS * SEQLEN
        A = sum(torch.outer(row, row) for row in a) / a.shape[0]
        G = sum(torch.outer(row, row) for row in g) / g.shape[0]
        ref[t.name] = (A, G)
    return ref


_REF_CACHE: dict[str, dict] = {}


def _reference(family: str):
    if family not in _REF_CACHE:
        _REF_CACHE[family] = _brute_force(_model(family), _windows())
    return _REF_CACHE[family]


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_factors_match_brute_force(family, batch_size):
    model = _model(family)
    targets = decoder_linears(model)
    got = collect_kfac(model, targets, _windows(), batch_size=batch_size, dtype=F64,
                       progress=False)
    ref = _reference(family)
    assert set(got) == set(ref) == {t.name for t in targets}
    for t in targets:
        A, G = ref[t.name]
        f = got[t.name]
        d_in = t.module.in_features + (1 if t.has_bias else 0)
        assert f.A.shape == (d_in, d_in) and f.G.shape == (t.module.out_features,) * 2
        assert f.A.dtype == f.G.dtype == F64
        assert f.count == N_WINDOWS * SEQLEN
        assert float(G.abs().max()) > 0, t.name  # every target is on the loss path
        assert _rel(f.A, A) < RTOL, (t.name, _rel(f.A, A))
        assert _rel(f.G, G) < RTOL, (t.name, _rel(f.G, G))
        if t.has_bias:  # bias block: last row/column is the mean input, corner is 1
            assert f.A[-1, -1].item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("panel", [1, 3, 4, 10, 64])
def test_symmetric_gram_sums_equal_xtx(panel):
    """Upper block triangles summed over several batches, mirrored = Σ xᵀx (brute force), for
    panels that divide the width, do not, and exceed it."""
    g = torch.Generator().manual_seed(panel)
    xs = [torch.randn(n, 10, generator=g, dtype=F64) for n in (7, 1, 13)]
    acc = torch.zeros(10, 10, dtype=F64)
    for x in xs:
        assert add_gram_(acc, x, panel) is acc
    ref = sum(x.T @ x for x in xs)
    full = symmetric_from_upper(acc)
    assert torch.equal(full, full.T)
    assert _rel(full, ref) < 1e-12
    if panel < 10:  # the products below the diagonal panels were skipped, not computed
        assert float(acc[panel:, :panel].abs().max()) == 0.0


@pytest.mark.parametrize("d,panel", [(10, 1), (10, 3), (10, 4), (10, 64), (1, 5), (37, 8)])
def test_packed_gram_equals_xtx_in_half_the_memory(d, panel):
    """The packed upper block triangle, summed over several batches and mirrored, is Σ xᵀx
    (brute force) and exactly symmetric; it holds Σ_i |P_i|(d − i) numbers (about half of d²
    for narrow panels)."""
    g = torch.Generator().manual_seed(d * 100 + panel)
    xs = [torch.randn(n, d, generator=g, dtype=F64) for n in (7, 1, 13)]
    acc = PackedGram(d, F64, panel=panel)
    for x in xs:
        assert acc.add_(x) is acc
    ref = sum(x.T @ x for x in xs)
    full = acc.full()
    assert torch.equal(full, full.T)
    assert _rel(full, ref) < 1e-12
    n = sum(min(panel, d - i) * (d - i) for i in range(0, d, panel))
    assert acc.nbytes == 8 * n
    if panel == 1:  # one row per panel: exactly the upper triangle with its diagonal
        assert n == d * (d + 1) // 2


def test_releasing_factors_frees_each_layers_sums():
    """factors(layer, release=True) turns one layer's sums into means and drops them: a shared
    input's sums (q/k/v) only once every target reading it is turned; the means equal those of
    an unreleased collector."""
    model = _model("llama")
    targets = decoder_linears(model)
    col = kfac_sums(model, targets, _windows(), dtype=F64, progress=False)
    whole = col.factors()
    first = [t for t in targets if t.layer_index == 0]
    q = next(t for t in first if t.role == ATTN_Q)
    k = next(t for t in first if t.role == ATTN_K)
    shared = col.inputs[col.input_of[q.name]]
    assert col.input_of[k.name] == col.input_of[q.name]  # q and k read one input
    part = col.factors([q], release=True)
    assert q.name not in col.gsum and shared.xtx.nbytes > 0  # k still needs the input's sums
    rest = col.factors([t for t in first if t is not q], release=True)
    assert shared.xtx.nbytes == 0
    assert not [t for t in first if t.name in col.gsum]
    assert all(t.name in col.gsum for t in targets if t.layer_index == 1)
    for name, f in {**part, **rest}.items():
        assert torch.equal(f.A, whole[name].A) and torch.equal(f.G, whole[name].G), name


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_factors_with_narrow_panels_match_brute_force(family, monkeypatch):
    """The collector's symmetric running sums, with panels narrower than every width (so the
    tiny layers are split into several), still give the brute-force A and G."""
    monkeypatch.setattr(kfac, "GRAM_PANEL", 5)
    model = _model(family)
    targets = decoder_linears(model)
    got = collect_kfac(model, targets, _windows(), dtype=F64, progress=False)
    ref = _reference(family)
    for t in targets:
        A, G = ref[t.name]
        assert _rel(got[t.name].A, A) < RTOL, t.name
        assert _rel(got[t.name].G, G) < RTOL, t.name


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_does_not_change_factors(family):
    model = _model(family)
    targets = decoder_linears(model)
    one = collect_kfac(model, targets, _windows(), batch_size=1, dtype=F64, progress=False)
    two = collect_kfac(model, targets, _windows(), batch_size=2, dtype=F64, progress=False)
    for t in targets:
        assert torch.allclose(one[t.name].A, two[t.name].A, rtol=1e-10, atol=1e-14)
        assert torch.allclose(one[t.name].G, two[t.name].G, rtol=1e-10, atol=1e-14)
        assert one[t.name].count == two[t.name].count


def test_sampled_fisher_reproducible_and_differs_from_empirical():
    model = _model("llama")
    targets = decoder_linears(model)
    kw = dict(dtype=F64, progress=False)
    s1 = collect_kfac(model, targets, _windows(), fisher="sampled", seed=3, **kw)
    s2 = collect_kfac(model, targets, _windows(), fisher="sampled", seed=3, **kw)
    s3 = collect_kfac(model, targets, _windows(), fisher="sampled", seed=4, **kw)
    emp = collect_kfac(model, targets, _windows(), fisher="empirical", **kw)
    for t in targets:
        assert torch.equal(s1[t.name].G, s2[t.name].G)
        assert torch.equal(s1[t.name].A, s2[t.name].A)
        # A comes from forward passes only: the labels do not matter
        assert torch.allclose(s1[t.name].A, emp[t.name].A, rtol=1e-12, atol=0)
        assert _rel(s1[t.name].G, emp[t.name].G) > 1e-3, t.name
        assert _rel(s1[t.name].G, s3[t.name].G) > 1e-3, t.name
    with pytest.raises(ValueError, match="fisher"):
        collect_kfac(model, targets, _windows(), fisher="bogus", **kw)


def _shared_groups(family: str) -> list[tuple[str, ...]]:
    """Roles that read the identical input tensor in one decoder layer."""
    if family == "llama":
        return [(ATTN_Q, ATTN_K, ATTN_V), (MLP_GATE, MLP_UP)]
    if family == "opt":
        return [(ATTN_Q, ATTN_K, ATTN_V)]
    # Phi: attention and MLP run in parallel on one layer-normed input
    return [(ATTN_Q, ATTN_K, ATTN_V, MLP_UP)]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_reading_one_input_share_A_but_not_G(family):
    model = _model(family)
    targets = decoder_linears(model)
    f = collect_kfac(model, targets, _windows(), dtype=F64, progress=False)
    layout = layout_for(model)
    n_layers = 1 + max(t.layer_index for t in targets)
    for layer in range(n_layers):
        by_role = {t.role: t for t in targets if t.layer_index == layer}
        for group in _shared_groups(family):
            assert all(r in layout.linears for r in group)
            first = f[by_role[group[0]].name]
            for role in group[1:]:
                other = f[by_role[role].name]
                if other.G.shape == first.G.shape:
                    assert not torch.allclose(other.G, first.G), (layer, role)
                assert torch.equal(other.A, first.A), (layer, role)
        # and layers that read different inputs do not
        a_q = f[by_role[ATTN_Q].name].A
        for role in (ATTN_O, MLP_DOWN):
            a = f[by_role[role].name].A
            assert a.shape != a_q.shape or not torch.allclose(a, a_q)
        # q/k/v G's are not just reshaped copies: k and v differ even with equal shapes
        assert not torch.allclose(f[by_role[ATTN_K].name].G, f[by_role[ATTN_V].name].G)


@pytest.mark.parametrize("family", FAMILIES)
def test_flags_restored_no_parameter_grad(family):
    model = _model(family)
    # a mixed starting state: embeddings frozen, everything else trainable, training mode on
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values()) and not all(before.values())
    targets = decoder_linears(model)
    ref = _reference(family)
    got = collect_kfac(model, targets, _windows(), dtype=F64, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # restored
    # and it ran in eval mode (no dropout): same factors as the eval-mode reference
    for t in targets:
        assert _rel(got[t.name].A, ref[t.name][0]) < RTOL
        assert _rel(got[t.name].G, ref[t.name][1]) < RTOL
    # no hooks left behind
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_collect_activations_equals_kfac_A(family, batch_size):
    model = _model(family)
    targets = decoder_linears(model)
    kf = collect_kfac(model, targets, _windows(), dtype=F64, progress=False)
    acts = collect_activations(model, targets, _windows(), batch_size=batch_size, dtype=F64,
                               progress=False)
    assert set(acts) == set(kf)
    for t in targets:
        assert acts[t.name].dtype == F64
        assert torch.allclose(acts[t.name], kf[t.name].A, rtol=1e-10, atol=1e-14), t.name
    for m in model.modules():
        assert not m._forward_hooks


@pytest.mark.parametrize("family", ["opt", "phi"])
def test_collect_activations_ignores_dropout_of_a_training_model(family):
    """Calibration statistics are eval-mode statistics, whatever mode the caller left."""
    # OPT's tiny config has dropout 0.1; give Phi some too
    model = tiny_model(family, resid_pdrop=0.1, embd_pdrop=0.1).double() if family == "phi" \
        else _model(family)
    targets = decoder_linears(model)
    ref = collect_activations(model, targets, _windows(), dtype=F64, progress=False)
    model.train()
    got = collect_activations(model, targets, _windows(), dtype=F64, progress=False)
    assert model.training
    for t in targets:
        assert torch.allclose(got[t.name], ref[t.name], rtol=1e-10, atol=1e-14), t.name


@pytest.mark.parametrize("family", FAMILIES)
def test_collector_is_freed_after_collection(family):
    """The inputs a collector keeps to detect shared layer inputs carry autograd graphs whose
    nodes hold its gradient hooks: unless they are dropped, the collector (all running sums)
    lives on in a cycle Python cannot collect, and every shot leaks its factors."""
    import gc

    from llm_surgeon.curvature.kfac import FactorCollector

    model = tiny_model(family)
    windows = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    collect_kfac(model, decoder_linears(model), windows, progress=False)
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, FactorCollector)]
