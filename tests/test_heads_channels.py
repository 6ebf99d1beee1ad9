"""Structured pruning in coupled units (heads in whole KV groups, MLP channels): unit costs
against brute force, the global ranking, and the prune command end to end with physical
shrinking and reload."""

from __future__ import annotations

import json

import pytest
import torch

from llm_surgeon import load
from llm_surgeon.config import PruneConfig
from llm_surgeon.driver import prune
from llm_surgeon.methods import obd
from llm_surgeon.methods.base import Curvature
from llm_surgeon.methods.surgeon import SurgeonMethod, kron_factors, prune_structured
from llm_surgeon.methods.threshold import select_units
from llm_surgeon.models.layouts import count_parameters
from tests.conftest import tiny_model
from tests.oracles import kron_quadratic, structured_cost


def _spd(n, gen):
    X = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    return X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_surgeon_unit_costs_equal_exact_joint_cost(axis):
    """A unit's share of one layer (a block of rows or columns) costs exactly the minimum of the
    constrained quadratic: the joint structured cost, which also equals the loss of the joint
    update (checked directly under G ⊗ A)."""
    gen = torch.Generator().manual_seed(0)
    out, inp, width, count = 12, 9, 3, 4  # 4 units of 3 rows, or of 3 of the first 8+1 cols
    if axis == "cols":
        out, inp = 9, 13  # 12 unit columns and one bias column
    W = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    f = kron_factors(_spd(out, gen), _spd(inp, gen), rel_damp_g=0.0, rel_damp_a=0.0)
    curv = Curvature(A=f.A, G=f.G, Ainv=f.Ainv, Ginv=f.Ginv)
    method = SurgeonMethod(compute_dtype=torch.float64)
    costs = method.unit_costs(W, curv, axis, width, count)
    for u in range(count):
        idx = list(range(u * width, (u + 1) * width))
        kw = {"rows": idx} if axis == "rows" else {"cols": idx}
        exact = structured_cost(W, f.G, f.A, f.Ginv, f.Ainv, **kw)
        W_new, _ = prune_structured(W, f.G, f.A, f.Ginv, f.Ainv, **kw)
        direct = kron_quadratic(W_new - W, f.G, f.A)
        torch.testing.assert_close(costs[u], exact, rtol=1e-10, atol=0)
        torch.testing.assert_close(costs[u], direct, rtol=1e-8, atol=0)


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_zeroing_unit_costs_equal_definition(axis):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(8, 9, generator=gen, dtype=torch.float64)  # cols: 8 unit cols + bias
    G, A = _spd(8, gen), _spd(9, gen)
    if axis == "rows":
        got = obd.obd_row_group_costs(W, G, A, 2)
        want = [kron_quadratic(_zero_rows(W, r), G, A) for r in range(4)]
    else:
        got = obd.obd_column_group_costs(W, G, A, 2, 4)
        want = [kron_quadratic(_zero_cols(W, c), G, A) for c in range(4)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=0)


def _zero_rows(W, u):
    d = torch.zeros_like(W)
    d[2 * u : 2 * u + 2] = -W[2 * u : 2 * u + 2]
    return d


def _zero_cols(W, u):
    d = torch.zeros_like(W)
    d[:, 2 * u : 2 * u + 2] = -W[:, 2 * u : 2 * u + 2]
    return d


def test_select_units_ranks_by_cost_per_parameter_and_fits_budget():
    heads = torch.tensor([10.0, 1.0, 50.0])  # size 100 each: 0.1, 0.01, 0.5 per parameter
    chans = torch.tensor([0.5, 3.0, 0.05, 2.0])  # size 10 each: 0.05, 0.3, 0.005, 0.2
    masks = select_units([heads, chans], [100, 10], 125)
    # order: chan 2 (0.005), head 1 (0.01), chan 0 (0.05), head 0 (0.1, does not fit), ...
    assert masks[0].tolist() == [False, True, False]
    assert masks[1].tolist() == [True, False, True, False]
    # every group keeps at least one unit, whatever the budget
    masks = select_units([heads, chans], [100, 10], 10**6)
    assert [int((~m).sum()) for m in masks] == [1, 1]
    # brute force on a small random problem: removed params never exceed the budget and the
    # chosen set is the greedy prefix by cost per parameter
    gen = torch.Generator().manual_seed(0)
    c = [torch.rand(5, generator=gen), torch.rand(7, generator=gen)]
    m = select_units(c, [3, 2], 12)
    assert int(m[0].sum()) * 3 + int(m[1].sum()) * 2 <= 12


def _cfg(model_dir, text, **kw) -> PruneConfig:
    base = dict(model=str(model_dir), calib_data=str(text), eval_data=str(text),
                calib_samples=4, seqlen=32, eval_windows=3, shots=2,
                structure="heads-channels")
    base.update(kw)
    return PruneConfig(**base)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", ["surgeon", "k-obd", "l-obd", "magnitude"])
def test_heads_channels_prune_shrinks_and_reloads(tiny_model_dirs, sample_text_file, tmp_path,
                                                  family, method):
    out = tmp_path / "pruned"
    report = prune(_cfg(tiny_model_dirs[family], sample_text_file, method=method, sparsity=0.3,
                        output=str(out)), progress=False)
    model = report["_model"]
    shrink = report["shrink"]
    dense = shrink["params_decoder_linear_before"]
    after = shrink["params_decoder_linear_after"]
    assert after == count_parameters(model)["params_decoder_linear"]
    # the model really is smaller, by what the zeros said (every removed unit left the shapes)
    assert after == pytest.approx(dense * (1 - report["sparsity_achieved"]), abs=1)
    assert 0.3 - 0.2 <= report["sparsity_achieved"] <= 0.3  # units are coarse in tiny models
    assert count_parameters(model)["params_decoder_linear_nonzero"] == after
    # saved folder: safetensors with per-layer sizes, reloads to identical logits
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["llm_surgeon_layer_sizes"] == shrink["layer_sizes"]
    reloaded = load(out)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reloaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_heads_channels_gqa_removes_whole_kv_groups(sample_text_file, tmp_path):
    """On a GQA Llama with 2 query heads per KV head, the ratio survives every layer."""
    d = tmp_path / "gqa"
    m = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    m.save_pretrained(d)
    from tests.conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(d)
    report = prune(_cfg(d, sample_text_file, method="surgeon", sparsity=0.4, eval=False),
                   progress=False)
    sizes = report["shrink"]["layer_sizes"]
    assert all(s["heads"] == 2 * s["kv_heads"] and s["kv_heads"] >= 1 for s in sizes)
    assert all(s["channels"] >= 1 for s in sizes)
    assert report["shrink"]["kv_groups_removed"] + report["shrink"]["channels_removed"] > 0
