"""Where things are inside each supported decoder family, written as data.

This is the one place in llm-surgeon that knows architectures. Every method, the curvature
hooks and the shrinking code ask a :class:`Layout` (never ``"llama" in name``):

* where the decoder layers are (a dotted path to a ``ModuleList``),
* which linear modules each decoder layer holds and which *role* each plays,
* how attention heads are laid out (query heads, key/value heads, head size),
* which config attributes carry those sizes, and whether embeddings are tied.

From the roles the coupled *units* of structured pruning follow without any family-specific
code: an attention head is some rows of q/k/v and some columns of o; an MLP channel is one row
of every MLP input linear (gate and up, or fc1) and one column of the MLP output linear (down or
fc2).

Adding a family means adding one :class:`Layout` entry to ``LAYOUTS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llm_surgeon.errors import UserError

# The roles a decoder linear can play. Names follow the paper's vocabulary.
ATTN_Q = "attn.q"
ATTN_K = "attn.k"
ATTN_V = "attn.v"
ATTN_O = "attn.o"
MLP_GATE = "mlp.gate"
MLP_UP = "mlp.up"
MLP_DOWN = "mlp.down"
ROLES = (ATTN_Q, ATTN_K, ATTN_V, ATTN_O, MLP_GATE, MLP_UP, MLP_DOWN)


@dataclass(frozen=True)
class Layout:
    """The layout of one decoder family.

    ``linears`` maps a role to the module path *inside one decoder layer*. A family without a
    gate (OPT, Phi) simply has no ``mlp.gate`` entry.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    linears: dict[str, str]
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    hidden_attr: str = "hidden_size"
    intermediate_attr: str = "intermediate_size"
    head_dim_attr: str | None = "head_dim"
    max_positions_attrs: tuple[str, ...] = ("max_position_embeddings",)
    # Whether the standard config can express fewer heads / channels (uniform over layers)
    # without changing the head size: then plain ``from_pretrained`` loads a shrunk model.
    sizes_in_config: bool = True
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived facts -------------------------------------------------------------------
    @property
    def mlp_in_roles(self) -> tuple[str, ...]:
        """Roles whose *rows* are MLP channels (gate and up, or fc1)."""
        return tuple(r for r in (MLP_GATE, MLP_UP) if r in self.linears)

    @property
    def attn_in_roles(self) -> tuple[str, ...]:
        return (ATTN_Q, ATTN_K, ATTN_V)

    def role_of(self, name_in_layer: str) -> str | None:
        for role, path in self.linears.items():
            if path == name_in_layer:
                return role
        return None

    def n_heads(self, config: Any) -> int:
        return int(getattr(config, self.n_heads_attr))

    def n_kv_heads(self, config: Any) -> int:
        if self.n_kv_heads_attr is None:
            return self.n_heads(config)
        value = getattr(config, self.n_kv_heads_attr, None)
        return int(value) if value is not None else self.n_heads(config)

    def head_dim(self, config: Any) -> int:
        if self.head_dim_attr is not None:
            value = getattr(config, self.head_dim_attr, None)
            if value:
                return int(value)
        return int(getattr(config, self.hidden_attr)) // self.n_heads(config)

    def max_positions(self, config: Any) -> int | None:
        for attr in self.max_positions_attrs:
            value = getattr(config, attr, None)
            if value:
                return int(value)
        return None


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
        layers="model.layers",
        linears={
            ATTN_Q: "self_attn.q_proj",
            ATTN_K: "self_attn.k_proj",
            ATTN_V: "self_attn.v_proj",
            ATTN_O: "self_attn.o_proj",
            MLP_GATE: "mlp.gate_proj",
            MLP_UP: "mlp.up_proj",
            MLP_DOWN: "mlp.down_proj",
        },
        notes="Llama, Mistral, Qwen2/3, Gemma, SmolLM: grouped-query attention, gated MLP.",
    ),
    Layout(
        family="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        linears={
            ATTN_Q: "self_attn.q_proj",
            ATTN_K: "self_attn.k_proj",
            ATTN_V: "self_attn.v_proj",
            ATTN_O: "self_attn.out_proj",
            MLP_UP: "fc1",
            MLP_DOWN: "fc2",
        },
        n_kv_heads_attr=None,
        intermediate_attr="ffn_dim",
        head_dim_attr=None,
        sizes_in_config=False,
        notes="OPT: biases everywhere, ReLU MLP fc1/fc2, learned positions.",
    ),
    Layout(
        family="phi",
        model_types=("phi",),
        layers="model.layers",
        linears={
            ATTN_Q: "self_attn.q_proj",
            ATTN_K: "self_attn.k_proj",
            ATTN_V: "self_attn.v_proj",
            ATTN_O: "self_attn.dense",
            MLP_UP: "mlp.fc1",
            MLP_DOWN: "mlp.fc2",
        },
        notes="Phi-1/1.5/2: parallel attention and MLP, biases everywhere, partial rotary.",
    ),
)


def layout_for(model_or_config: Any) -> Layout:
    """Return the layout of a model (or its config); a clear error if the family is unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    known = ", ".join(sorted(t for lay in LAYOUTS for t in lay.model_types))
    raise UserError(
        f"unsupported architecture {model_type!r}: llm-surgeon has no layout for it "
        f"(known: {known}); add one Layout entry in llm_surgeon/models/layouts.py"
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise UserError(f"module path {path!r} not found (missing {part!r})")
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, layout: Layout | None = None) -> nn.ModuleList:
    layout = layout or layout_for(model)
    layers = get_submodule(model, layout.layers)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{layout.layers!r} is not a list of decoder layers in this model")
    return layers


@dataclass(frozen=True)
class TargetLinear:
    """One decoder linear that pruning may touch."""

    name: str  # full module name inside the model, e.g. "model.layers.3.mlp.up_proj"
    layer_index: int
    role: str
    module: nn.Linear

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def type(self) -> str:
        """Short module type used in reports (q, k, v, o, gate, up, down)."""
        return self.role.split(".")[1]


def decoder_linears(model: nn.Module, layout: Layout | None = None) -> list[TargetLinear]:
    """Every decoder linear of the model with its role, in forward order.

    Raises a :class:`UserError` naming the module that is missing, so a model whose family
    layout is wrong never gets half-pruned.
    """
    layout = layout or layout_for(model)
    found: list[TargetLinear] = []
    for index, layer in enumerate(decoder_layers(model, layout)):
        for role in ROLES:
            path = layout.linears.get(role)
            if path is None:
                continue
            try:
                module = get_submodule(layer, path)
            except UserError:
                raise UserError(
                    f"layout {layout.family!r}: decoder layer {index} has no {path!r} (role {role})"
                ) from None
            if not isinstance(module, nn.Linear):
                raise UserError(
                    f"layout {layout.family!r}: {path!r} in layer {index} is "
                    f"{type(module).__name__}, not nn.Linear"
                )
            full = f"{layout.layers}.{index}.{path}"
            found.append(TargetLinear(full, index, role, module))
    return found


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters (tied weights counted once) and decoder-linear parameters.

    ``decoder_linear_nonzero`` counts the weights (and biases) of decoder linears that are not
    exactly zero: the number pruning reduces.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    linear = 0
    nonzero = 0
    for t in decoder_linears(model):
        for p in (t.module.weight, t.module.bias):
            if p is None:
                continue
            linear += p.numel()
            nonzero += int(torch.count_nonzero(p.detach()).item())
    return {
        "params_total": total,
        "params_decoder_linear": linear,
        "params_decoder_linear_nonzero": nonzero,
    }
