"""Physical removal of pruned units, and saving / loading models whose layers differ in size.

:func:`shrink_model` drops every dead unit (see :mod:`llm_surgeon.models.units`) from the module
shapes: the linears get smaller weight matrices and biases, attention modules that cache a head
count get the new count, and the config records every layer's sizes under
``llm_surgeon_layer_sizes`` (a list of ``{"heads", "kv_heads", "channels"}``, one per layer).

A saved folder is plain safetensors + ``config.json``. :func:`load_pruned` (behind
``llm_surgeon.load``) rebuilds the architecture from the config, resizes every layer to its
recorded sizes and loads the tensors. Where all layers end up with the same sizes and the family's
config can say so (the layout's ``sizes_in_config`` for heads: ``head_dim`` is a config field the
modeling code reads; ``channels_in_config`` for MLP channels), the standard config fields are
updated too, so that plain ``transformers`` ``from_pretrained`` loads the folder as well. OPT,
GPT-NeoX, Falcon and StableLM derive their head size from ``hidden_size / num_attention_heads``
and so can never express fewer heads in their config (fewer channels they can); OLMo 2's q/k norm
epsilon would have to change with the width (see :class:`~llm_surgeon.models.layouts.HeadNorm`).

Beyond the linears, shrinking heads slices the norms that span them (``layout.head_norms``),
updates head counts that attention modules cache (``num_heads``, ``num_key_value_heads``,
``num_kv_heads``) and, where a module reads head counts from its config in forward
(``layout.private_config``, Phi-3), gives it a private copy of the config with its layer's sizes.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_surgeon.errors import UserError
from llm_surgeon.models.layouts import ATTN_Q, Layout, layout_for
from llm_surgeon.models.units import UnitGroup, unit_groups

log = logging.getLogger(__name__)

SIZES_KEY = "llm_surgeon_layer_sizes"
# Attributes some attention / MLP modules cache at construction and use in forward.
_ATTN_ATTRS = {"num_heads": "heads", "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads"}
_MLP_ATTRS = {"intermediate_size": "channels"}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


@torch.no_grad()
def _slice_linear(linear: nn.Linear, axis: str, idx: torch.Tensor) -> nn.Linear:
    W = linear.weight
    bias = linear.bias
    if axis == "rows":
        W_new = W[idx]
        b_new = None if bias is None else bias[idx]
    else:
        W_new = W[:, idx]
        b_new = bias
    out = nn.Linear(W_new.shape[1], W_new.shape[0], bias=bias is not None,
                    device=W.device, dtype=W.dtype)
    out.weight.copy_(W_new)
    if b_new is not None:
        out.bias.copy_(b_new)
    out.weight.requires_grad_(W.requires_grad)
    return out


def layer_sizes(model: Any) -> list[dict[str, int]]:
    """Heads, KV heads and MLP channels of every decoder layer, read from the module shapes."""
    layout = layout_for(model)
    per_kv = layout.n_heads(model.config) // layout.n_kv_heads(model.config)
    sizes: dict[int, dict[str, int]] = {}
    for g in unit_groups(model):
        s = sizes.setdefault(g.layer, {})
        if g.kind == "heads":
            s["heads"], s["kv_heads"] = g.count * per_kv, g.count
        else:
            s["channels"] = g.count
    return [sizes[i] for i in sorted(sizes)]


def _keep_units(model: nn.Module, group: UnitGroup, keep: torch.Tensor, layout: Layout) -> None:
    """Keep only the units ``keep`` (sorted indices) of one group, physically."""
    for part in group.parts:
        # ascending: a fused linear keeps its arrangement (blocks stay blocks, groups groups)
        idx = part.indices(keep).sort().values.to(part.target.module.weight.device)
        parent, child = _parent(model, part.target.name)
        setattr(parent, child, _slice_linear(part.target.module, part.axis, idx))
    # Modules that cache a head or channel count: the parent of the group's last linear.
    owner, _ = _parent(model, group.parts[-1].target.name)
    per_kv = layout.n_heads(model.config) // layout.n_kv_heads(model.config)
    values = {"heads": len(keep) * per_kv, "kv_heads": len(keep), "channels": len(keep)}
    attrs = _ATTN_ATTRS if group.kind == "heads" else _MLP_ATTRS
    for attr, what in attrs.items():
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, values[what])
    if group.kind == "heads" and (layout.head_norms or layout.private_config):
        layer = model.get_submodule(f"{layout.layers}.{group.layer}")
        _shrink_head_norms(layer, layout, keep, per_kv, layout.head_dim(model.config))
        for path in layout.private_config:
            module = layer.get_submodule(path)
            private = copy.copy(module.config)
            setattr(private, layout.n_heads_attr, values["heads"])
            if isinstance(layout.n_kv_heads_attr, str):
                setattr(private, layout.n_kv_heads_attr, values["kv_heads"])
            module.config = private


@torch.no_grad()
def _shrink_head_norms(layer: nn.Module, layout: Layout, keep: torch.Tensor, per_kv: int,
                       head_dim: int) -> None:
    """Keep the norm entries of the kept KV groups ``keep`` (see ``HeadNorm``): a norm over the
    whole projection is sliced and rescaled (w' = w·√(N/N'), ε' = ε·N/N'), a per-head norm list
    keeps the kept heads' norms."""
    for norm in layout.head_norms:
        heads_per_unit = per_kv if norm.role == ATTN_Q else 1
        heads = (keep[:, None] * heads_per_unit + torch.arange(heads_per_unit)).reshape(-1)
        module = layer.get_submodule(norm.path)
        if norm.spans == "heads":
            module.norms = nn.ModuleList([module.norms[int(h)] for h in heads])
            if isinstance(getattr(module, "num_heads", None), int):
                module.num_heads = len(heads)
            continue
        idx = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        w = module.weight
        n_old, n_new = w.shape[0], idx.numel()
        module.weight = nn.Parameter(w[idx.to(w.device)] * math.sqrt(n_old / n_new),
                                     requires_grad=w.requires_grad)
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, getattr(module, attr) * n_old / n_new)


def _record_sizes(model: Any, layout: Layout) -> list[dict[str, int]]:
    sizes = layer_sizes(model)
    config = model.config
    setattr(config, SIZES_KEY, sizes)
    if sizes and all(s == sizes[0] for s in sizes) and config_can_say(layout, config, sizes[0]):
        s = sizes[0]
        head_dim = layout.head_dim(config)
        setattr(config, layout.n_heads_attr, s["heads"])
        if isinstance(layout.n_kv_heads_attr, str):
            setattr(config, layout.n_kv_heads_attr, s["kv_heads"])
        setattr(config, layout.intermediate_attr, s["channels"])
        if layout.head_dim_attr is not None:
            setattr(config, layout.head_dim_attr, head_dim)
    return sizes


def config_can_say(layout: Layout, config: Any, sizes: dict[str, int]) -> bool:
    """Whether the family's standard config can express these uniform sizes (then plain
    ``from_pretrained`` loads the shrunk model): unchanged sizes always, fewer heads where
    ``layout.sizes_in_config``, fewer channels where ``layout.channels_expressible``."""
    same_heads = (sizes["heads"] == layout.n_heads(config)
                  and sizes["kv_heads"] == layout.n_kv_heads(config))
    same_channels = sizes["channels"] == getattr(config, layout.intermediate_attr, None)
    return ((same_heads or layout.heads_in_config)
            and (same_channels or layout.channels_expressible))


def shrink_group(model: nn.Module, group: UnitGroup, layout: Layout) -> int:
    """Drop the dead units of one group from the module shapes (at least one unit stays: a
    zero one if all were pruned); returns how many went."""
    keep_mask = ~group.dead()
    if not bool(keep_mask.any()):
        keep_mask[0] = True
    if bool(keep_mask.all()):
        return 0
    _keep_units(model, group, torch.nonzero(keep_mask).reshape(-1), layout)
    return int((~keep_mask).sum())


def shrink_model(model: Any) -> dict[str, Any]:
    """Remove every dead unit (heads in whole KV groups, MLP channels) from the module shapes.

    At least one unit of each kind stays in every layer (a zero one if all were pruned: its
    output is zero, so the function is unchanged). Returns a summary with the parameters before
    and after and the per-layer sizes. The model computes exactly what the zero-masked model did.
    """
    layout = layout_for(model)
    before = sum(p.numel() for p in model.parameters())
    removed = {"heads": 0, "channels": 0}
    for g in unit_groups(model):
        removed[g.kind] += shrink_group(model, g, layout)
    sizes = _record_sizes(model, layout)
    after = sum(p.numel() for p in model.parameters())
    return {
        "params_before": before,
        "params_after": after,
        "kv_groups_removed": removed["heads"],
        "channels_removed": removed["channels"],
        "layer_sizes": sizes,
    }


def resize_to(model: Any, sizes: list[dict[str, int]]) -> None:
    """Give a freshly built model the recorded per-layer sizes (keeps the first units; their
    values are overwritten by the loaded weights)."""
    layout = layout_for(model)
    groups = unit_groups(model)
    n_layers = len({g.layer for g in groups})
    if len(sizes) != n_layers:
        raise UserError(f"{SIZES_KEY} lists {len(sizes)} layers, the model has {n_layers}")
    for g in groups:
        want = sizes[g.layer]["kv_heads" if g.kind == "heads" else "channels"]
        if not 1 <= want <= g.count:
            raise UserError(f"layer {g.layer}: recorded size {want} for {g.kind} is not in "
                            f"1..{g.count}")
        if want != g.count:
            _keep_units(model, g, torch.arange(want), layout)
    _record_sizes(model, layout)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights")
    return files


def _checkpoint_names_to_model(model: Any, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Apply the renamings ``transformers`` applies when loading (some families save tensors
    under other names than their modules', e.g. GPT-NeoX ``embed_out`` for ``lm_head``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names on disk are the modules' names
        return state
    try:  # private internals of transformers: any change of theirs means no renaming
        renamings = [t for t in get_model_conversion_mapping(model)
                     if isinstance(t, WeightRenaming)]
        if not renamings:
            return state
        return {rename_source_key(k, renamings, [])[0]: v for k, v in state.items()}
    except (TypeError, AttributeError) as exc:
        log.info("transformers' weight renaming is unavailable (%s: %s); loading the names "
                 "as saved", type(exc).__name__, exc)
        return state


def load_pruned(folder: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """Load a folder written by ``llm-surgeon prune`` whose layers may differ in size."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    sizes = getattr(config, SIZES_KEY, None)
    # Parameters on the meta device (no memory, no random init); buffers such as rotary
    # frequencies are computed for real. The loaded tensors are then assigned, not copied, so
    # peak memory is one copy of the (smaller) weights.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if sizes:
        resize_to(model, sizes)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        state.update(load_file(str(f)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = _checkpoint_names_to_model(model, state)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise UserError(f"{folder}: unexpected tensors {unexpected[:3]}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise UserError(f"{folder}: missing tensors {still_empty[:3]}")
    return model.eval()
