"""Every supported decoder family end to end, on a tiny random model built from the family's own
``transformers`` config class: the surgeon unstructured, rows-columns and heads-channels (the
physically shrunk model computes what the zero-masked one did; saved and reloaded equal), the
layer-wise methods, and how a uniformly shrunk model reloads."""

from __future__ import annotations

import json

import pytest
import torch

import llm_surgeon.structures as structures_module
from llm_surgeon import load
from llm_surgeon.config import PruneConfig
from llm_surgeon.driver import augmented_weight, prune
from llm_surgeon.errors import UserError
from llm_surgeon.io import save_atomically
from llm_surgeon.models.layouts import count_parameters, decoder_linears, layout_for
from llm_surgeon.models.shrink import SIZES_KEY, config_can_say, layer_sizes, shrink_model
from llm_surgeon.models.units import unit_groups
from tests.model_zoo import ZOO, zoo_model

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory, tiny_tok):
    made = {}

    def get(family):
        if family not in made:
            d = tmp_path_factory.mktemp(f"zoo-{family}")
            zoo_model(family).save_pretrained(d)
            tiny_tok.save_pretrained(d)
            made[family] = d
        return made[family]

    return get


def _cfg(model_dir, text, **kw) -> PruneConfig:
    base = dict(model=str(model_dir), calib_data=str(text), eval_data=str(text),
                calib_samples=4, seqlen=32, eval_windows=2, shots=2, eval=False)
    base.update(kw)
    return PruneConfig(**base)


def _weight_sparsity(t) -> float:
    W = t.module.weight.detach()
    return float((W == 0).sum()) / W.numel()


@pytest.mark.parametrize("family", list(ZOO))
def test_family_end_to_end(family, zoo_dirs, sample_text_file, tmp_path, monkeypatch):
    d = zoo_dirs(family)
    dense = zoo_model(family)
    layout = layout_for(dense)
    # the layout finds every linear inside the decoder layers, and a fused one's rows add up
    found = decoder_linears(dense, layout)
    assert {t.name for t in found} == {
        n for n, m in dense.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(layout.layers + ".")}
    for g in unit_groups(dense):
        for p in g.parts:
            size = p.target.module.out_features if p.axis == "rows" else \
                p.target.module.in_features
            assert size == g.count * p.width  # every row (column) belongs to one unit

    # surgeon, unstructured: the global target within 0.5 pp
    rep = prune(_cfg(d, sample_text_file, sparsity=0.5), progress=False)
    assert abs(rep["sparsity_achieved"] - 0.5) <= 0.005, rep["sparsity_achieved"]

    # surgeon, rows-columns: on target, and only whole rows and columns are zero
    rep = prune(_cfg(d, sample_text_file, structure="rows-columns", sparsity=0.3),
                progress=False)
    assert abs(rep["sparsity_achieved"] - 0.3) <= 0.005, rep["sparsity_achieved"]
    for t in decoder_linears(rep["_model"]):
        W = augmented_weight(t)
        covered = (W == 0).all(1)[:, None] | (W == 0).all(0)[None, :]
        assert torch.equal(W == 0, covered)

    # surgeon, heads-channels: the shrink inside the run changes no logit
    seen = {}
    removed = {}
    real_shrink = structures_module.shrink

    def checked_shrink(model, store):
        seen["masked"] = _logits(model)
        seen["params_before"] = count_parameters(model)["params_decoder_linear"]
        summary = real_shrink(model, store)
        seen["shrunk"] = _logits(model)
        return summary

    monkeypatch.setattr(structures_module, "shrink", checked_shrink)
    # the surgeon, and Numerical (which removes whole KV groups in these tiny models, so that
    # the fused slices and head norms are shrunk inside a real run too)
    for method in ("surgeon", "numerical"):
        out = tmp_path / f"hc-{method}"
        rep = prune(_cfg(d, sample_text_file, method=method, structure="heads-channels",
                         sparsity=0.3, output=str(out)), progress=False)
        model = rep["_model"]
        assert 0.1 <= rep["sparsity_achieved"] <= 0.3
        after = count_parameters(model)["params_decoder_linear"]
        assert after < seen["params_before"]  # really smaller
        assert after == count_parameters(model)["params_decoder_linear_nonzero"]
        assert (seen["shrunk"] - seen["masked"]).abs().max().item() <= 1e-5
        saved = json.loads((out / "config.json").read_text())
        assert saved[SIZES_KEY] == rep["shrink"]["layer_sizes"] == layer_sizes(model)
        reloaded = load(out)
        assert layer_sizes(reloaded) == layer_sizes(model)
        assert (_logits(reloaded) - _logits(model)).abs().max().item() <= 1e-5
        removed[method] = rep["shrink"]["kv_groups_removed"]
    groups = [g.count for g in unit_groups(zoo_model(family)) if g.kind == "heads"]
    if min(groups) > 1:
        assert removed["numerical"] > 0  # heads really left the shapes in a run

    # the layer-wise methods: every linear's weights on target
    for method in ("sparsegpt", "wanda", "maiht"):
        rep = prune(_cfg(d, sample_text_file, method=method, sparsity=0.5, shots=1),
                    progress=False)
        for t in decoder_linears(rep["_model"]):
            assert abs(_weight_sparsity(t) - 0.5) <= 0.01, (method, t.name)

    # shrinks by hand: uniform (one KV group where there are two or more, and a few channels in
    # every layer), channels only, and per-layer (a KV group of layer 0 only): heads, fused
    # slices and head norms leave the shapes, the logits stay; llm_surgeon.load reloads
    # exactly, and a uniform result plain transformers too exactly where the layout says the
    # family's config can express the sizes (else the config is left as it was)
    from transformers import AutoModelForCausalLM

    fresh = zoo_model(family).config
    for case in ("uniform", "channels", "per-layer"):
        model = zoo_model(family)
        for g in unit_groups(model):
            if g.kind == "heads" and g.count > 1 and case != "channels":
                if case == "uniform" or g.layer == 0:
                    g.zero(torch.tensor([0]))
            elif g.kind == "channels" and case != "per-layer":
                g.zero(torch.tensor([1, 4, g.count - 1]))
        masked = _logits(model)
        summary = shrink_model(model)
        if case != "per-layer" or summary["kv_groups_removed"]:
            assert summary["params_after"] < summary["params_before"]
        torch.testing.assert_close(_logits(model), masked, rtol=0, atol=1e-5)
        sizes = layer_sizes(model)
        folder = tmp_path / f"by-hand-{case}"
        save_atomically(model, None, folder)
        reloaded = load(folder)
        assert layer_sizes(reloaded) == sizes
        torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
        if case == "per-layer":
            continue
        assert all(s == sizes[0] for s in sizes)
        if config_can_say(layout, fresh, sizes[0]):
            plain = AutoModelForCausalLM.from_pretrained(folder).eval()
            torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-6)
        else:
            cfg = json.loads((folder / "config.json").read_text())
            assert cfg[layout.n_heads_attr] == layout.n_heads(fresh)
            assert cfg[layout.intermediate_attr] == getattr(fresh, layout.intermediate_attr)
    # the channel sizes are expressible in every supported family's config
    assert layout.channels_expressible


def test_falcon_alibi_refuses_heads_in_one_line(zoo_dirs, sample_text_file):
    model = zoo_model("falcon_mha", alibi=True)
    with pytest.raises(UserError, match="ALiBi"):
        unit_groups(model)


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "falcon", "falcon_mha"])
def test_fused_unit_rows_are_the_roles_rows(family):
    """In a fused QKV linear a KV group's rows are exactly where the modeling code reads its
    query heads, key and value: zeroing the group's value rows by the unit indices gives the
    same output as zeroing the group's v_proj-equivalent slice found by perturbation."""
    model = zoo_model(family)
    g = next(g for g in unit_groups(model) if g.kind == "heads")
    qkv = g.parts[0]
    assert qkv.target.module.out_features == g.count * qkv.width  # every row in one unit
    rows = qkv.index_matrix(torch.arange(g.count))
    assert sorted(rows.reshape(-1).tolist()) == list(range(qkv.target.module.out_features))
    # a group's value rows: zeroing them silences exactly the group's o columns' inputs, i.e.
    # the output equals zeroing those o columns
    v = next(p for p in qkv.pieces if p.role == "attn.v")
    o = g.parts[-1]
    unit = torch.tensor([g.count - 1])
    base = zoo_model(family)
    with torch.no_grad():
        qkv_mod = next(t for t in decoder_linears(base) if t.name == qkv.target.name).module
        vrows = v.offset + unit[:, None] * v.stride + torch.arange(v.width)
        qkv_mod.weight[vrows.reshape(-1)] = 0
        if qkv_mod.bias is not None:
            qkv_mod.bias[vrows.reshape(-1)] = 0
        a = _logits(base)
        base2 = zoo_model(family)
        o2 = next(t for t in decoder_linears(base2) if t.name == o.target.name).module
        o2.weight[:, o.indices(unit)] = 0
        b = _logits(base2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("family", "kind"), [("phi3", "heads"), ("phi3", "channels"),
                                             ("falcon", "heads"), ("gpt_neox", "heads")])
def test_fused_unit_costs_equal_exact_joint_cost(family, kind):
    """A fused linear's share of a unit is scattered over its rows; its surgeon cost, computed
    on the relabelled problem, equals the exact joint structured cost of exactly those rows."""
    from llm_surgeon.methods.base import Curvature
    from llm_surgeon.methods.surgeon import SurgeonMethod, kron_factors
    from tests.oracles import structured_cost

    g = next(g for g in unit_groups(zoo_model(family)) if g.kind == kind)
    part = next(p for p in g.parts if p.pieces)
    gen = torch.Generator().manual_seed(0)
    m = part.target.module
    out, inp = m.out_features, m.in_features + (m.bias is not None)
    W = torch.randn(out, inp, generator=gen, dtype=torch.float64)

    def spd(n):
        X = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
        return X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)

    f = kron_factors(spd(out), spd(inp), rel_damp_g=0.0, rel_damp_a=0.0)
    curv = Curvature(A=f.A, G=f.G, Ainv=f.Ainv, Ginv=f.Ginv)
    costs = part.unit_costs(SurgeonMethod(compute_dtype=torch.float64), W, curv, g.count)
    for u in range(g.count):
        rows = part.indices(torch.tensor([u])).tolist()
        exact = structured_cost(W, f.G, f.A, f.Ginv, f.Ainv, rows=rows)
        torch.testing.assert_close(costs[u], exact, rtol=1e-9, atol=0)


def test_projection_norm_binds_query_rows():
    """OLMo 2: a head group whose value rows are zero is silent, but its query rows still feed
    the projection-wide q norm of the other heads, so it is not dead until they are zero too
    (Llama: dead at once)."""
    for family, dead_at_once in (("olmo2", False), ("llama", True)):
        g = next(g for g in unit_groups(zoo_model(family)) if g.kind == "heads")
        v = next(p for p in g.parts if p.target.role == "attn.v")
        with torch.no_grad():
            v.target.module.weight[v.indices(torch.tensor([1]))] = 0
        assert bool(g.dead()[1]) == dead_at_once
        g.zero(torch.tensor([1]))
        assert bool(g.dead()[1])


def test_layerwise_feeds_each_layer_its_own_attention_type():
    """Gemma 2 alternates sliding-window and global layers, which the model hands different
    masks: the layer-wise driver gives every layer its own (layer 2's inputs come out of the
    global layer 1), so each H equals XᵀX of that linear's inputs in the final pruned model."""
    from llm_surgeon.driver import run_layerwise
    from llm_surgeon.layerwise import at_layer, capture_layer_inputs
    from llm_surgeon.structures import Unstructured
    from tests.test_layerwise import Recorder, brute_force_grams

    model = zoo_model("gemma2", num_hidden_layers=3, sliding_window=4)
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    ((_, kw),) = capture_layer_inputs(model, windows[:1], 1)
    assert at_layer(kw, 1)["attention_mask"] is not at_layer(kw, 0)["attention_mask"]
    assert at_layer(kw, 2)["attention_mask"] is at_layer(kw, 0)["attention_mask"]
    rec = Recorder()
    targets = decoder_linears(model)
    run_layerwise(model, targets, rec, Unstructured(), 0.5, windows, batch_size=1,
                  progress=False)
    grams = brute_force_grams(model, [t.module for t in targets], windows, 1)
    for t, (_, H) in zip(targets, rec.seen, strict=True):
        if t.role in ("attn.q", "attn.k", "attn.v"):
            torch.testing.assert_close(H.double(), grams[t.module], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "method", "structure"), [
    ("gemma3_text", "surgeon", "heads-channels"),
    ("gpt_neox", "surgeon", "unstructured"),
    ("phi3", "surgeon", "heads-channels"),
    ("phi3", "numerical", "heads-channels"),
    ("olmo2", "numerical", "heads-channels"),
])
def test_streamed_equals_in_memory(family, method, structure, zoo_dirs, sample_text_file,
                                   tmp_path):
    """--max-memory on families with layer-type alternation (Gemma 3), renamed checkpoint
    tensors (GPT-NeoX embed_out), fused projections (Phi-3) and head norms (OLMo 2): the same
    pruned model."""
    kw = dict(method=method, structure=structure, sparsity=0.3, eval=True)
    ref = prune(_cfg(zoo_dirs(family), sample_text_file, **kw), progress=False)
    rep = prune(_cfg(zoo_dirs(family), sample_text_file, max_memory="64MB",
                     offload_dir=str(tmp_path / "off"), **kw), progress=False)
    assert rep["store"]["decoder_layers"] == 2
    assert rep["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert rep["sparsity_achieved"] == pytest.approx(ref["sparsity_achieved"], abs=1e-9)
    if structure == "heads-channels":
        assert rep["shrink"]["layer_sizes"] == ref["shrink"]["layer_sizes"]
