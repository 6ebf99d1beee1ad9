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

The vocabulary covers the ways families differ for real:

* **fused projections** (:class:`Fused`): one linear holding the rows of several roles, either
  role after role (Phi-3 ``qkv_proj`` = [all q | all k | all v], ``gate_up_proj`` =
  [all gate | all up]) or KV group after KV group (GPT-NeoX ``query_key_value`` = per head
  [q | k | v]; Falcon = per KV group [its q heads | k | v]). Every row belongs to exactly one
  role; units, costs and the physical shrink follow from the arrangement;
* **norms that shrink with heads** (:class:`HeadNorm`): an RMS norm over the whole q or k
  projection (OLMo 2) is sliced with its heads, a list of per-head norms (StableLM
  ``qk_layernorm``) loses the removed heads' entries; a norm over one head's ``head_dim``
  (Qwen3, Gemma 3) needs nothing and is not listed;
* **variants of one model type** chosen by config attributes (``when``: Falcon multi-query,
  grouped ``new_decoder_architecture`` and multi-head), and config settings under which heads
  cannot be removed (``refuse_heads_when``: Falcon ALiBi);
* **config rewriting** on save: which config fields carry uniform sizes (``*_attr``), and
  whether the family's config can express fewer heads (``heads_in_config``) or channels
  (``channels_in_config``) so that plain ``from_pretrained`` loads a uniformly shrunk model.

Extra pre/post norms (Gemma 2/3, OLMo 2), sliding-window/global alternation, embedding and
residual scaling (Gemma, Granite), parallel attention+MLP blocks (GPT-NeoX, Falcon, Phi,
StableLM) and MLPs without a gate (OPT, Phi, GPT-NeoX, Falcon) live outside the decoder linears'
rows and columns and need nothing here.

Adding a family means adding one :class:`Layout` entry to ``LAYOUTS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
ATTN_IN_ROLES = (ATTN_Q, ATTN_K, ATTN_V)


@dataclass(frozen=True)
class Fused:
    """One linear whose output rows hold several roles.

    ``roles`` are in row order. ``arrangement`` says how units interleave:

    * ``"blocks"``: role after role, each role's rows in unit order
      (Phi-3 ``qkv_proj``: [q of every group | k of every group | v of every group]);
    * ``"groups"``: unit after unit, each unit's rows role after role
      (GPT-NeoX: per head [q | k | v]; Falcon: per KV group [its query heads | k | v]).
    """

    roles: tuple[str, ...]
    arrangement: Literal["blocks", "groups"] = "blocks"

    @property
    def role(self) -> str:
        """The combined role name used in reports: ``attn.qkv``, ``mlp.gate_up``."""
        prefix = self.roles[0].split(".")[0]
        short = [r.split(".")[1] for r in self.roles]
        return f"{prefix}.{('' if all(len(x) == 1 for x in short) else '_').join(short)}"


@dataclass(frozen=True)
class HeadNorm:
    """A norm on a q or k projection that must shrink when its heads go.

    ``spans="projection"``: one RMS norm over the whole projection (OLMo 2 ``q_norm``/``k_norm``,
    weight of ``heads · head_dim``): its weight is sliced with the heads. Its mean square is taken
    over the projection's width N, so keeping N' of N entries rescales it exactly:
    w' = w·√(N/N'), ε' = ε·N/N' (then x/√(S/N'+ε')·w' = x/√(S/N+ε)·w for every sum of squares S
    of the kept entries, i.e. the removed entries were zero).
    ``spans="heads"``: a ``ModuleList`` of one norm per head (StableLM ``qk_layernorm``): the
    removed heads' entries go. ``path`` is the norm module (for ``"heads"``: the module holding
    the list in ``norms``) inside the decoder layer.
    """

    role: str
    path: str
    spans: Literal["projection", "heads"] = "projection"


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
    # Fused linears: module path inside the layer -> which roles its rows hold, and how.
    fused: dict[str, Fused] = field(default_factory=dict)
    # Norms that shrink with heads (norms over one head's ``head_dim`` are not listed).
    head_norms: tuple[HeadNorm, ...] = ()
    # The layout applies when every listed config attribute has the given value (variants of
    # one model type); the first matching entry of ``LAYOUTS`` wins.
    when: dict[str, Any] = field(default_factory=dict)
    # (config attribute, value, reason): with this setting heads cannot be removed.
    refuse_heads_when: tuple[tuple[str, Any, str], ...] = ()
    # Modules (paths inside the layer) whose forward reads head counts from their ``config``:
    # a layer shrunk to its own sizes gives them a private copy of the config with those sizes.
    private_config: tuple[str, ...] = ()
    n_heads_attr: str = "num_attention_heads"
    # Config attribute of the KV-head count; None: as many as query heads; an int: fixed.
    n_kv_heads_attr: str | int | None = "num_key_value_heads"
    hidden_attr: str = "hidden_size"
    intermediate_attr: str = "intermediate_size"
    head_dim_attr: str | None = "head_dim"
    max_positions_attrs: tuple[str, ...] = ("max_position_embeddings",)
    # Whether the standard config can express fewer heads (uniform over layers) without
    # changing the head size: ``head_dim`` is a config field the modeling code reads, and no
    # other per-head quantity is fixed by the config. Then plain ``from_pretrained`` loads a
    # uniformly shrunk model.
    sizes_in_config: bool = True
    # Whether it can express fewer MLP channels (None: same as ``sizes_in_config``).
    channels_in_config: bool | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived facts -------------------------------------------------------------------
    @property
    def mlp_in_roles(self) -> tuple[str, ...]:
        """Roles whose *rows* are MLP channels (gate and up, or fc1)."""
        return tuple(r for r in (MLP_GATE, MLP_UP) if self.has_role(r))

    @property
    def attn_in_roles(self) -> tuple[str, ...]:
        return ATTN_IN_ROLES

    @property
    def heads_in_config(self) -> bool:
        return self.sizes_in_config

    @property
    def channels_expressible(self) -> bool:
        return self.sizes_in_config if self.channels_in_config is None else self.channels_in_config

    def role_of(self, name_in_layer: str) -> str | None:
        for role, path in self.linears.items():
            if path == name_in_layer:
                return role
        fused = self.fused.get(name_in_layer)
        return fused.role if fused is not None else None

    def modules(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(path, role, member roles, arrangement) of every decoder linear, in forward order:
        a plain linear is its own single member; a fused one comes at its first role."""
        out = []
        for role in ROLES:
            path = self.linears.get(role)
            if path is not None:
                out.append((path, role, (role,), "blocks"))
                continue
            for fpath, f in self.fused.items():
                if f.roles[0] == role:
                    out.append((fpath, f.role, f.roles, f.arrangement))
        return out

    def has_role(self, role: str) -> bool:
        return role in self.linears or any(role in f.roles for f in self.fused.values())

    def matches(self, config: Any) -> bool:
        return all(getattr(config, k, None) == v for k, v in self.when.items())

    def heads_refusal(self, config: Any) -> str | None:
        """Why heads cannot be removed from this model, or None."""
        for attr, value, reason in self.refuse_heads_when:
            if getattr(config, attr, None) == value:
                return reason
        return None

    def n_heads(self, config: Any) -> int:
        return int(getattr(config, self.n_heads_attr))

    def n_kv_heads(self, config: Any) -> int:
        if self.n_kv_heads_attr is None:
            return self.n_heads(config)
        if isinstance(self.n_kv_heads_attr, int):
            return self.n_kv_heads_attr
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


# The Llama block's linears, shared by the families that name them the same way.
_LLAMA_LINEARS = {
    ATTN_Q: "self_attn.q_proj",
    ATTN_K: "self_attn.k_proj",
    ATTN_V: "self_attn.v_proj",
    ATTN_O: "self_attn.o_proj",
    MLP_GATE: "mlp.gate_proj",
    MLP_UP: "mlp.up_proj",
    MLP_DOWN: "mlp.down_proj",
}

_FALCON = dict(
    model_types=("falcon",),
    layers="transformer.h",
    linears={
        ATTN_O: "self_attention.dense",
        MLP_UP: "mlp.dense_h_to_4h",
        MLP_DOWN: "mlp.dense_4h_to_h",
    },
    # Falcon splits its fused QKV per KV group: [query heads of the group | k | v]; multi-query
    # is one group, multi-head one group per head.
    fused={"self_attention.query_key_value": Fused((ATTN_Q, ATTN_K, ATTN_V), "groups")},
    intermediate_attr="ffn_hidden_size",
    head_dim_attr=None,
    sizes_in_config=False,  # head size = hidden_size / num_attention_heads
    channels_in_config=True,
    refuse_heads_when=(("alibi", True, "Falcon with ALiBi: the slopes are laid out for the "
                                      "config's head count, so heads cannot be removed"),),
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "granite"),
        layers="model.layers",
        linears=_LLAMA_LINEARS,
        notes="Llama, Mistral, Qwen2/3, Gemma 1/2/3 (text), Granite, SmolLM: grouped-query "
        "attention, gated MLP; Qwen3/Gemma 3 q/k norms span one head (nothing to shrink).",
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
        channels_in_config=True,
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
    Layout(
        family="olmo2",
        model_types=("olmo2",),
        layers="model.layers",
        linears=_LLAMA_LINEARS,
        head_norms=(HeadNorm(ATTN_Q, "self_attn.q_norm"), HeadNorm(ATTN_K, "self_attn.k_norm")),
        # The q/k norms' epsilon scales with the kept width (see HeadNorm): one config-wide
        # rms_norm_eps cannot say that, so fewer heads reload through llm_surgeon.load.
        sizes_in_config=False,
        channels_in_config=True,
        notes="OLMo 2: RMS q/k norms over the whole projection, post-norms only.",
    ),
    Layout(
        family="phi3",
        model_types=("phi3",),
        layers="model.layers",
        linears={ATTN_O: "self_attn.o_proj", MLP_DOWN: "mlp.down_proj"},
        fused={
            "self_attn.qkv_proj": Fused((ATTN_Q, ATTN_K, ATTN_V), "blocks"),
            "mlp.gate_up_proj": Fused((MLP_GATE, MLP_UP), "blocks"),
        },
        # Phi3Attention reads num_attention_heads from its config in forward.
        private_config=("self_attn",),
        notes="Phi-3/3.5/4: fused qkv_proj [q | k | v] and gate_up_proj [gate | up].",
    ),
    Layout(
        family="stablelm",
        model_types=("stablelm",),
        when={"qk_layernorm": True},
        layers="model.layers",
        linears=_LLAMA_LINEARS,
        head_norms=(HeadNorm(ATTN_Q, "self_attn.q_layernorm", "heads"),
                    HeadNorm(ATTN_K, "self_attn.k_layernorm", "heads")),
        head_dim_attr=None,
        sizes_in_config=False,  # head size = hidden_size / num_attention_heads
        channels_in_config=True,
        notes="StableLM 2 with qk_layernorm: one LayerNorm per head.",
    ),
    Layout(
        family="stablelm",
        model_types=("stablelm",),
        layers="model.layers",
        linears=_LLAMA_LINEARS,
        head_dim_attr=None,
        sizes_in_config=False,  # head size = hidden_size / num_attention_heads
        channels_in_config=True,
        notes="StableLM (3B, 2): partial rotary, LayerNorm, optional parallel residual.",
    ),
    Layout(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        linears={
            ATTN_O: "attention.dense",
            MLP_UP: "mlp.dense_h_to_4h",
            MLP_DOWN: "mlp.dense_4h_to_h",
        },
        fused={"attention.query_key_value": Fused((ATTN_Q, ATTN_K, ATTN_V), "groups")},
        n_kv_heads_attr=None,
        head_dim_attr=None,
        sizes_in_config=False,  # head size = hidden_size / num_attention_heads
        channels_in_config=True,
        notes="GPT-NeoX / Pythia: query_key_value interleaved per head [q | k | v].",
    ),
    Layout(family="falcon", when={"new_decoder_architecture": True},
           n_kv_heads_attr="num_kv_heads",
           notes="Falcon (new decoder architecture): fused QKV per KV group.", **_FALCON),
    Layout(family="falcon", when={"new_decoder_architecture": False, "multi_query": True},
           n_kv_heads_attr=1, notes="Falcon multi-query: one KV head.", **_FALCON),
    Layout(family="falcon", when={"new_decoder_architecture": False, "multi_query": False},
           n_kv_heads_attr=None, notes="Falcon multi-head: fused QKV per head.", **_FALCON),
)


def layout_for(model_or_config: Any) -> Layout:
    """Return the layout of a model (or its config); a clear error if the family is unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for layout in LAYOUTS:
        if model_type in layout.model_types and layout.matches(config):
            return layout
    known = ", ".join(sorted({t for lay in LAYOUTS for t in lay.model_types}))
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
    role: str  # one role, or a fused linear's combined role (attn.qkv, mlp.gate_up)
    module: nn.Linear
    roles: tuple[str, ...] = ()  # the roles whose rows it holds, in row order (fused)
    arrangement: str = "blocks"  # how a fused linear's roles interleave (see Fused)

    @property
    def members(self) -> tuple[str, ...]:
        """The roles this linear holds: its own, or a fused linear's member roles."""
        return self.roles or (self.role,)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def type(self) -> str:
        """Short module type used in reports (q, k, v, o, gate, up, down, qkv, gate_up)."""
        return self.role.split(".")[1]


def decoder_linears(model: nn.Module, layout: Layout | None = None) -> list[TargetLinear]:
    """Every decoder linear of the model with its role, in forward order.

    Raises a :class:`UserError` naming the module that is missing, so a model whose family
    layout is wrong never gets half-pruned.
    """
    layout = layout or layout_for(model)
    found: list[TargetLinear] = []
    for index, layer in enumerate(decoder_layers(model, layout)):
        for path, role, members, arrangement in layout.modules():
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
            roles = members if len(members) > 1 else ()
            found.append(TargetLinear(full, index, role, module, roles, arrangement))
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
