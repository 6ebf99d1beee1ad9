"""Hardware-friendly heads-channels shapes: channel multiples and uniform layer sizes."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon import load
from llm_surgeon.config import PruneConfig
from llm_surgeon.driver import prune
from llm_surgeon.errors import UserError
from llm_surgeon.methods.threshold import (
    channel_blocks,
    default_channel_multiple,
    select_shaped_units,
    select_units,
)
from tests.conftest import tiny_model, tiny_tokenizer


def _random_groups(gen: torch.Generator, n_layers: int, heads: int, channels: int):
    costs, sizes, kinds, layers = [], [], [], []
    for layer in range(n_layers):
        costs += [torch.rand(heads, generator=gen), torch.rand(channels, generator=gen)]
        sizes += [40, 3]
        kinds += ["heads", "channels"]
        layers += [layer, layer]
    return costs, sizes, kinds, layers


def test_shaped_selection_with_multiple_one_is_select_units():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        costs = [torch.rand(int(torch.randint(1, 9, (1,), generator=gen)), generator=gen)
                 for _ in range(n)]
        if trial % 3 == 0:  # ties
            costs = [(c * 4).round() for c in costs]
        sizes = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(n)]
        budget = int(torch.randint(0, 40, (1,), generator=gen))
        for per_param in (True, False):
            a = select_units(costs, sizes, budget, per_param=per_param)
            b = select_shaped_units(costs, sizes, ["channels"] * n, list(range(n)), budget,
                                    per_param=per_param)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_channel_blocks_keep_multiples_of_k():
    c = torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0, 9.0])  # n = 7, K = 2: r = 1
    blocks = channel_blocks(c, 2)
    # sorted: 3(0) 1(1) 5(2) 4(3) 2(4) 0(5) 6(9); first block holds r + K = 3, then K each,
    # the last (most expensive) K never removable
    assert blocks == [[3, 1, 5], [4, 2]]
    assert channel_blocks(torch.rand(5), 4) == []  # n < 2K: nothing removable
    assert [len(b) for b in channel_blocks(torch.rand(6), 1)] == [1] * 5


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_global_selection_widths_are_multiples_and_cheapest(multiple):
    gen = torch.Generator().manual_seed(multiple)
    costs, sizes, kinds, layers = _random_groups(gen, 4, 3, 48)
    total = sum(c.numel() * s for c, s in zip(costs, sizes, strict=True))
    masks = select_shaped_units(costs, sizes, kinds, layers, int(0.4 * total),
                                channel_multiple=multiple)
    removed = sum(int(m.sum()) * s for m, s in zip(masks, sizes, strict=True))
    assert removed <= int(0.4 * total)
    assert removed >= int(0.4 * total) - multiple * 3 * 4 - 40  # budget nearly used
    for c, m, kind in zip(costs, masks, kinds, strict=True):
        kept = int((~m).sum())
        assert kept >= 1
        if kind == "channels":
            assert kept % multiple == 0 and kept >= multiple
            if m.any() and (~m).any():  # a layer loses its cheapest channels
                assert float(c[m].max()) <= float(c[~m].min())


@pytest.mark.parametrize("multiple", [1, 8])
def test_uniform_selection_removes_the_same_counts_everywhere(multiple):
    gen = torch.Generator().manual_seed(3)
    costs, sizes, kinds, layers = _random_groups(gen, 5, 4, 64)
    total = sum(c.numel() * s for c, s in zip(costs, sizes, strict=True))
    masks = select_shaped_units(costs, sizes, kinds, layers, int(0.35 * total),
                                channel_multiple=multiple, uniform=True)
    heads = {int(m.sum()) for m, k in zip(masks, kinds, strict=True) if k == "heads"}
    chans = {int(m.sum()) for m, k in zip(masks, kinds, strict=True) if k == "channels"}
    assert len(heads) == 1 and len(chans) == 1
    assert (64 - chans.pop()) % multiple == 0
    removed = sum(int(m.sum()) * s for m, s in zip(masks, sizes, strict=True))
    assert 0 < removed <= int(0.35 * total)
    # every layer loses its own cheapest channels
    for c, m, k in zip(costs, masks, kinds, strict=True):
        if k == "channels" and m.any():
            assert float(c[m].max()) <= float(c[~m].min())


def test_uniform_selection_follows_summed_costs():
    """Heads are expensive in layer 0 and cheap in layer 1: uniform removal weighs the sum."""
    costs = [torch.tensor([10.0, 0.0]), torch.tensor([0.0, 0.0]),
             torch.tensor([0.0, 50.0]), torch.tensor([1.0, 1.0])]
    kinds = ["heads", "channels", "heads", "channels"]
    masks = select_shaped_units(costs, [1, 1, 1, 1], kinds, [0, 0, 1, 1], 2, uniform=True)
    # position 0 of heads: 0 + 0 = 0 (cost/param 0); of channels: 0 + 1 = 1 (0.5)
    assert masks[0].tolist() == [False, True] and masks[2].tolist() == [True, False]
    assert not masks[1].any() and not masks[3].any()


def test_uniform_refuses_layers_of_different_sizes():
    with pytest.raises(ValueError, match="same"):
        select_shaped_units([torch.rand(3), torch.rand(4)], [1, 1], ["channels"] * 2, [0, 1], 2,
                            uniform=True)


def test_default_channel_multiple():
    assert default_channel_multiple([1536, 1536]) == 32
    assert default_channel_multiple([48, 1536]) == 1  # tiny layers: any width
    assert default_channel_multiple([48], 8) == 8


def test_shape_options_validated():
    with pytest.raises(UserError, match="heads-channels only"):
        PruneConfig(structure="unstructured", layer_sizes="uniform").validate()
    with pytest.raises(UserError, match="layer-sizes"):
        PruneConfig(structure="heads-channels", layer_sizes="even").validate()
    with pytest.raises(UserError, match="channel-multiple"):
        PruneConfig(structure="heads-channels", channel_multiple=0).validate()


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gqa-llama")
    tiny_model("llama", num_hidden_layers=3, intermediate_size=96, num_attention_heads=8,
               num_key_value_heads=4, head_dim=4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["surgeon", "numerical"])
def test_uniform_prune_loads_with_plain_from_pretrained(gqa_dir, sample_text_file, tmp_path,
                                                        method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "uniform"
    report = prune(PruneConfig(model=str(gqa_dir), calib_data=str(sample_text_file),
                               eval_data=str(sample_text_file), calib_samples=4, seqlen=32,
                               eval=False, shots=2, method=method, structure="heads-channels",
                               sparsity=0.3, layer_sizes="uniform", channel_multiple=8,
                               output=str(out)), progress=False)
    sizes = report["shrink"]["layer_sizes"]
    assert all(s == sizes[0] for s in sizes)
    assert sizes[0]["channels"] % 8 == 0 and sizes[0]["channels"] < 96
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.model.layers[0].mlp.down_proj.in_features == sizes[0]["channels"]
    assert plain.config.num_key_value_heads == sizes[0]["kv_heads"]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = load(out)(input_ids=ids).logits
        c = report["_model"](input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5 and (a - c).abs().max().item() <= 1e-5


def test_global_prune_widths_are_multiples(gqa_dir, sample_text_file, tmp_path):
    report = prune(PruneConfig(model=str(gqa_dir), calib_data=str(sample_text_file),
                               eval_data=str(sample_text_file), calib_samples=4, seqlen=32,
                               eval=False, shots=2, structure="heads-channels", sparsity=0.3,
                               channel_multiple=16, output=str(tmp_path / "g")), progress=False)
    widths = [s["channels"] for s in report["shrink"]["layer_sizes"]]
    assert all(w % 16 == 0 and w >= 16 for w in widths) and min(widths) < 96
