import pytest
from torch import nn

from llm_surgeon.errors import UserError
from llm_surgeon.models.layouts import (
    ATTN_K,
    ATTN_O,
    ATTN_Q,
    ATTN_V,
    MLP_DOWN,
    MLP_GATE,
    MLP_UP,
    count_parameters,
    decoder_linears,
    layout_for,
)
from tests.conftest import FAMILIES, tiny_model

EXPECTED_ROLES = {
    "llama": {
        "q_proj": ATTN_Q,
        "k_proj": ATTN_K,
        "v_proj": ATTN_V,
        "o_proj": ATTN_O,
        "gate_proj": MLP_GATE,
        "up_proj": MLP_UP,
        "down_proj": MLP_DOWN,
    },
    "opt": {
        "q_proj": ATTN_Q,
        "k_proj": ATTN_K,
        "v_proj": ATTN_V,
        "out_proj": ATTN_O,
        "fc1": MLP_UP,
        "fc2": MLP_DOWN,
    },
    "phi": {
        "q_proj": ATTN_Q,
        "k_proj": ATTN_K,
        "v_proj": ATTN_V,
        "dense": ATTN_O,
        "fc1": MLP_UP,
        "fc2": MLP_DOWN,
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_finds_every_decoder_linear_with_its_role(family):
    model = tiny_model(family)
    layout = layout_for(model)
    found = decoder_linears(model, layout)
    by_name = {t.name: t for t in found}
    # Every nn.Linear inside the decoder layers, and nothing else, is found.
    all_linears = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(layout.layers + ".")
    }
    assert set(by_name) == all_linears
    assert len(found) == model.config.num_hidden_layers * len(EXPECTED_ROLES[family])
    for t in found:
        assert t.role == EXPECTED_ROLES[family][t.name.rsplit(".", 1)[1]]
        assert f"{layout.layers}.{t.layer_index}." in t.name


@pytest.mark.parametrize("family", FAMILIES)
def test_head_layout_matches_module_shapes(family):
    model = tiny_model(family)
    layout = layout_for(model)
    cfg = model.config
    n_h, n_kv, d = layout.n_heads(cfg), layout.n_kv_heads(cfg), layout.head_dim(cfg)
    by_role = {}
    for t in decoder_linears(model, layout):
        by_role.setdefault(t.role, t.module)
    assert by_role[ATTN_Q].out_features == n_h * d
    assert by_role[ATTN_K].out_features == n_kv * d
    assert by_role[ATTN_V].out_features == n_kv * d
    assert by_role[ATTN_O].in_features == n_h * d
    mlp_width = getattr(cfg, layout.intermediate_attr)
    assert by_role[MLP_DOWN].in_features == mlp_width
    for role in layout.mlp_in_roles:
        assert by_role[role].out_features == mlp_width
    # biases: OPT and Phi have them, Llama has none
    assert (by_role[ATTN_Q].bias is not None) == (family != "llama")


def test_grouped_query_attention_read_from_config():
    model = tiny_model("llama")
    layout = layout_for(model)
    assert layout.n_heads(model.config) == 4 and layout.n_kv_heads(model.config) == 2


def test_unsupported_family_has_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        layout_for(model)


def test_parameter_counts():
    model = tiny_model("llama")
    counts = count_parameters(model)
    lin = sum(t.module.weight.numel() for t in decoder_linears(model))
    assert counts["params_decoder_linear"] == lin
    # tied embeddings counted once
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    t = decoder_linears(model)[0]
    t.module.weight.data[:2] = 0
    assert (
        count_parameters(model)["params_decoder_linear_nonzero"] == lin - 2 * t.module.in_features
    )
