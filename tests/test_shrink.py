"""Physical removal of heads (in whole KV groups) and MLP channels, and save / reload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llm_surgeon.io import save_atomically
from llm_surgeon.models.layouts import count_parameters, decoder_linears
from llm_surgeon.models.shrink import SIZES_KEY, layer_sizes, load_pruned, shrink_model
from llm_surgeon.models.units import remove_dead_units, unit_groups
from tests.conftest import FAMILIES, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(seed=0):
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_unit_groups_cover_heads_and_channels():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 8, 48 channels
    groups = unit_groups(model)
    heads = [g for g in groups if g.kind == "heads"]
    chans = [g for g in groups if g.kind == "channels"]
    assert [g.count for g in heads] == [2, 2]
    assert [g.count for g in chans] == [48, 48]
    q = next(p for p in heads[0].parts if p.target.role == "attn.q")
    # KV group 1 owns query heads 2 and 3: rows 16..31 of q
    assert q.indices(torch.tensor([1])).tolist() == list(range(16, 32))
    # a head group: q (16 rows) + k, v (8 rows each) of width 32, o: 16 columns of height 32
    assert heads[0].params_per_unit() == (16 + 8 + 8) * 32 + 16 * 32
    assert chans[0].params_per_unit() == 3 * 32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["heads", "channels"])
def test_physical_removal_equals_zero_masking(family, kind):
    """Removing each kind of unit physically gives exactly the outputs of zero-masking it."""
    model = tiny_model(family)
    ids = _ids()
    dense = _logits(model, ids)
    for g in unit_groups(model):
        if g.kind == kind:
            g.zero(torch.tensor([g.count - 1] if kind == "heads" else [0, 5, g.count - 1]))
    masked = _logits(model, ids)
    assert (masked - dense).abs().max() > 1e-4  # the units mattered
    n_before = count_parameters(model)["params_decoder_linear"]
    summary = shrink_model(model)
    shrunk = _logits(model, ids)
    torch.testing.assert_close(shrunk, masked, rtol=0, atol=1e-5)
    n_after = count_parameters(model)["params_decoder_linear"]
    per_unit = unit_groups(model)[0 if kind == "heads" else 1].params_per_unit()
    removed_units = 2 * (1 if kind == "heads" else 3)
    assert n_before - n_after == removed_units * per_unit
    assert summary["params_after"] < summary["params_before"]


def test_gqa_group_removal_keeps_query_to_kv_mapping():
    """Dropping KV group 0 of a GQA model: the remaining query heads still read their own KV
    head (a wrong grouping would change the outputs)."""
    model = tiny_model("llama", num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                       hidden_size=48)
    ids = _ids(1)
    for g in unit_groups(model):
        if g.kind == "heads":
            g.zero(torch.tensor([0]))
    masked = _logits(model, ids)
    shrink_model(model)
    k = decoder_linears(model)[1].module
    assert k.out_features == 2 * 8
    torch.testing.assert_close(_logits(model, ids), masked, rtol=0, atol=1e-5)


def test_dead_units_are_completed():
    model = tiny_model("llama")
    groups = unit_groups(model)
    chans = next(g for g in groups if g.kind == "channels")
    down = next(p for p in chans.parts if p.target.role == "mlp.down").target.module
    with torch.no_grad():
        down.weight[:, 7] = 0  # channel 7's output is gone: its gate/up rows are dead
    ids = _ids()
    before = _logits(model, ids)
    assert bool(chans.dead()[7]) and not bool(chans.removed()[7])
    assert remove_dead_units(groups) == 1
    assert bool(chans.removed()[7])
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def _uneven(family):
    model = tiny_model(family)
    groups = unit_groups(model)
    # layer 0 loses a head group and 10 channels, layer 1 loses 3 channels only
    groups[0].zero(torch.tensor([0]))
    groups[1].zero(torch.arange(10))
    groups[3].zero(torch.tensor([1, 2, 40]))
    shrink_model(model)
    return model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_uneven_sizes_save_and_reload_exactly(family, tmp_path):
    model = _uneven(family)
    sizes = layer_sizes(model)
    assert sizes[0]["channels"] == 38 and sizes[1]["channels"] == 45
    assert sizes[0]["kv_heads"] < sizes[1]["kv_heads"]
    out = tmp_path / "pruned"
    save_atomically(model, None, out)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle
    assert json.loads((out / "config.json").read_text())[SIZES_KEY] == sizes
    reloaded = load_pruned(out)
    assert layer_sizes(reloaded) == sizes
    ids = _ids(2)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_uneven_sizes_refused_by_plain_from_pretrained(tmp_path):
    """Per-layer sizes are beyond the Llama config: plain transformers refuses the folder loudly
    (it never loads it with silently re-initialised weights)."""
    from transformers import AutoModelForCausalLM

    model = _uneven("llama")
    save_atomically(model, None, tmp_path / "m")
    with pytest.raises(Exception, match=r"(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_uniform_llama_shrink_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    for g in unit_groups(model):
        g.zero(torch.tensor([1]) if g.kind == "heads" else torch.arange(8))
    shrink_model(model)
    save_atomically(model, None, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = _ids(3)
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=0, atol=0)
    assert plain.config.num_attention_heads == 2 and plain.config.intermediate_size == 40


def test_reload_in_fresh_process(tmp_path):
    model = _uneven("llama")
    out = tmp_path / "pruned"
    save_atomically(model, None, out)
    ids = _ids(4)
    torch.save({"ids": ids, "logits": _logits(model, ids)}, tmp_path / "ref.pt")
    code = (
        "import sys, torch, llm_surgeon\n"
        "ref = torch.load(sys.argv[2])\n"
        "m = llm_surgeon.load(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    d = (m(input_ids=ref['ids']).logits - ref['logits']).abs().max().item()\n"
        "print(type(m).__name__, d)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ref.pt")],
                         capture_output=True, text=True, check=True)
    name, diff = res.stdout.split()
    assert name == "LlamaForCausalLM" and float(diff) == 0.0
