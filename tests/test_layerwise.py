"""The layer-wise driver (SparseGPT, Wanda, mAIHT): every layer is pruned from statistics of
the outputs of the already-pruned layers before it."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon.driver import prune, run_layerwise
from llm_surgeon.methods.base import LayerwiseMethod
from llm_surgeon.methods.nm import check_nm
from llm_surgeon.methods.sparsegpt import SparseGPTMethod
from llm_surgeon.methods.wanda import WandaMethod
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.structures import NM, Unstructured
from tests.conftest import tiny_model
from tests.test_prune import _cfg


def brute_force_grams(model, modules, windows, batch_size):
    """Brute force: Σ XᵀX (float64) of each module's input over ``windows`` run through the
    model in batches of ``batch_size``, keyed by module."""
    grams = {}

    def hook(mod, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        grams[mod] = grams.get(mod, 0) + x.T @ x

    handles = [m.register_forward_hook(hook) for m in modules]
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return grams


class Recorder(LayerwiseMethod):
    """Wanda that remembers the H it was given for every weight it pruned."""

    name = "recorder"
    structures = ("unstructured",)

    def __init__(self):
        super().__init__()
        self.inner = WandaMethod()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prune_linear(self, W, H, sparsity, nm=None):
        new = self.inner.prune_linear(W, H, sparsity, nm)
        self.seen.append((new.clone(), H.clone()))
        return new


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_statistics_come_from_the_pruned_prefix(family):
    """H handed to each layer equals XᵀX of that linear's inputs in the *final* pruned model
    (inputs of layer ℓ depend only on layers < ℓ, all pruned by then): the driver really feeds
    each layer the outputs of the pruned layers before it."""
    model = tiny_model(family)
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    targets = decoder_linears(model)
    run_layerwise(model, targets, rec, Unstructured(), 0.5, windows, batch_size=2,
                  progress=False)
    grams = brute_force_grams(model, [t.module for t in targets], windows, 2)
    assert len(rec.seen) == len(targets)
    dense_grams_differ = False
    for t, (W_new, H) in zip(targets, rec.seen, strict=True):
        # o, gate/up and down read inputs computed inside this very layer, whose statistics are
        # taken before it is pruned (the papers' default); q/k/v read the layer's input
        if t.role not in ("attn.q", "attn.k", "attn.v"):
            continue
        torch.testing.assert_close(H.double(), grams[t.module], rtol=1e-4, atol=1e-4)
        assert torch.equal(t.module.weight, W_new)
        dense_grams_differ |= t.layer_index > 0
    assert dense_grams_differ


class DiagonalRecorder(Recorder):
    """The Recorder asking for diag(XᵀX) only, as Wanda does."""

    diagonal_statistic = True


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_shared_symmetric_and_diagonal_statistics_match_brute_force(family, monkeypatch):
    """With panels narrower than every width (the symmetric sums split in several) and inputs
    shared by several linears (q/k/v; gate/up; phi's fc1 too), the H of each linear of layer 0
    is its own XᵀX (brute force, every input kept); a method asking for the diagonal gets
    exactly diag(XᵀX), a vector, and the same pruned weights as Wanda given the full H."""
    from llm_surgeon.curvature import kfac

    monkeypatch.setattr(kfac, "GRAM_PANEL", 5)
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(2))
    dense = tiny_model(family)
    targets = [t for t in decoder_linears(dense) if t.layer_index == 0]
    grams = brute_force_grams(dense, [t.module for t in targets], windows, 2)
    ref = [grams[t.module] for t in targets]
    weights = []
    for rec in (Recorder(), DiagonalRecorder()):
        model = tiny_model(family)
        run_layerwise(model, decoder_linears(model), rec, Unstructured(), 0.5,
                      windows, batch_size=2, progress=False)
        first = rec.seen[: len(targets)]
        for G, (_, H) in zip(ref, first, strict=True):
            if isinstance(rec, DiagonalRecorder):
                assert H.shape == (G.shape[0],)
                torch.testing.assert_close(H.double(), torch.diagonal(G), rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(H, H.T)
                torch.testing.assert_close(H.double(), G, rtol=1e-5, atol=1e-5)
        weights.append([W for W, _ in rec.seen])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_square_sums_equal_diagonal_of_xtx():
    from llm_surgeon.layerwise import add_square_sums_

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (5, 9)]
    acc = torch.zeros(6, dtype=torch.float64)
    for x in xs:
        assert add_square_sums_(acc, x) is acc
    torch.testing.assert_close(acc, torch.diagonal(sum(x.T @ x for x in xs)), rtol=1e-12,
                               atol=0)


def test_statistics_forward_stops_before_the_last_linear():
    """The statistics pass needs only the linears' inputs: each layer's last linear (down) runs
    once per batch (the pass to the next layer), not twice; the first (q) runs twice."""
    model = tiny_model("llama")
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(4))
    targets = decoder_linears(model)
    calls = {t.name: 0 for t in targets}
    for t in targets:
        t.module.register_forward_hook(
            lambda *_a, n=t.name: calls.__setitem__(n, calls[n] + 1))
    run_layerwise(model, targets, WandaMethod(), Unstructured(), 0.5, windows,
                  batch_size=2, progress=False)
    for t in targets:
        assert calls[t.name] == (2 if t.role == "mlp.down" else 4), (t.name, calls[t.name])


def test_layerwise_sparsegpt_matches_direct_call_on_first_layer():
    model = tiny_model("llama")
    ref = tiny_model("llama")
    windows = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = decoder_linears(model)
    H = {}

    def hook(mod, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        H[mod] = H.get(mod, 0) + x.T @ x

    q_ref = decoder_linears(ref)[0].module
    h = q_ref.register_forward_hook(hook)
    with torch.no_grad():
        ref(input_ids=windows, use_cache=False)
    h.remove()
    method = SparseGPTMethod()
    run_layerwise(model, targets, method, NM(2, 4), 0.5, windows, progress=False)
    want = method.prune_linear(q_ref.weight.detach().float(), H[q_ref].float(), 0.5, (2, 4))
    torch.testing.assert_close(targets[0].module.weight.detach(), want, rtol=1e-5, atol=1e-6)
    assert all(check_nm(t.module.weight.detach(), 2, 4) for t in targets)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "maiht"])
def test_layerwise_methods_behind_prune(tiny_model_dirs, sample_text_file, method):
    report = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, method=method,
                        sparsity=0.5, shots=5), progress=False)
    assert abs(report["sparsity_achieved"] - 0.5) <= 0.005
    assert len(report["shots"]) == 1  # one pass over the layers, whatever --shots says
    per_layer = [entry["sparsity"] for entry in report["layers"]]
    assert max(abs(x - 0.5) for x in per_layer) < 0.01  # the target in every layer


def test_layerwise_methods_refuse_structured(tiny_model_dirs, sample_text_file):
    from llm_surgeon.errors import UserError

    for method in ("maiht", "sparsegpt", "wanda"):
        with pytest.raises(UserError, match="does not support"):
            prune(_cfg(tiny_model_dirs["llama"], sample_text_file, method=method,
                       structure="rows-columns", sparsity=0.2), progress=False)


def test_numerical_units_compensate_and_shrink():
    """Numerical pruning removes whole units chosen by one ranking over all layers, and its
    compensation makes each output projection reproduce its dense output better than zeroing
    the same channels does (on the calibration inputs it was fitted to)."""
    from llm_surgeon.driver import run_unit_scoring
    from llm_surgeon.methods.numerical import NumericalMethod
    from llm_surgeon.models.shrink import shrink_model
    from llm_surgeon.models.units import unit_groups

    model = tiny_model("llama")
    dense = tiny_model("llama")
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    targets = decoder_linears(model)
    down0 = next(t for t in targets if t.role == "mlp.down" and t.layer_index == 0).module
    xs = []
    h = next(t for t in decoder_linears(dense) if t.role == "mlp.down"
             and t.layer_index == 0).module.register_forward_hook(
        lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        dense(input_ids=windows, use_cache=False)
    h.remove()
    X = torch.cat(xs)
    W_dense = down0.weight.detach().clone()
    run_unit_scoring(model, targets, NumericalMethod(percdamp=1e-6), 0.3, windows,
                     batch_size=4, progress=False)
    gone = (down0.weight == 0).all(0)
    assert 0 < int(gone.sum()) < gone.numel()
    zeroed = W_dense.masked_fill(gone[None, :], 0)
    err_comp = (X @ down0.weight.T - X @ W_dense.T).norm()
    err_zero = (X @ zeroed.T - X @ W_dense.T).norm()
    assert err_comp < 0.9 * err_zero
    groups = unit_groups(model)
    removed = sum(int(g.removed().sum()) * g.params_per_unit() for g in groups)
    total = sum(t.module.weight.numel() for t in targets)
    assert 0.3 - 0.15 < removed / total <= 0.3  # coarse units in a tiny model
    before = sum(p.numel() for p in model.parameters())
    shrink_model(model)
    assert sum(p.numel() for p in model.parameters()) == before - removed
