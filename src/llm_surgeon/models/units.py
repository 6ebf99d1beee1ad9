"""Coupled units of structured pruning, derived from a :class:`~llm_surgeon.models.layouts.Layout`.

A *unit* is the smallest piece whose removal makes modules physically smaller:

* an **MLP channel** c: row c of every MLP input linear (gate and up, or fc1 with its bias) and
  column c of the MLP output linear (down, fc2);
* an **attention head group**: one key/value head together with every query head that shares it
  (grouped-query attention), i.e. its rows of q, k and v (with biases) and the matching columns
  of o. With ordinary multi-head attention (OPT, Phi) a group is one head. Heads go in whole KV
  groups, so the number of query heads per KV head (``num_key_value_groups``) never changes and
  the attention code runs unmodified.

Every unit of a group occupies one contiguous block of rows or columns in each linear (unit u of
width w is ``[u·w, (u+1)·w)``), which is how Hugging Face models lay out heads and channels.

A unit is *dead* when one of its *essential* parts is entirely zero: then its output is exactly
zero and removing all of it changes nothing. Essential are v rows and o columns of a head group
(zero q or k rows only make the attention uniform), and every part of an MLP channel (act(0) = 0
for ReLU, GELU and SiLU, so a zero gate or up row, with its bias, silences the channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from llm_surgeon.models.layouts import (
    ATTN_K,
    ATTN_O,
    ATTN_Q,
    ATTN_V,
    MLP_DOWN,
    TargetLinear,
    decoder_linears,
    layout_for,
)

Axis = Literal["rows", "cols"]
UnitKind = Literal["heads", "channels"]


@dataclass(frozen=True)
class UnitSlice:
    """One linear's share of every unit of a group: ``width`` rows (or columns) per unit."""

    target: TargetLinear
    axis: Axis
    width: int
    essential: bool

    def indices(self, units: Tensor) -> Tensor:
        """Row (or column) indices of the given units, in unit order."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        return (units[:, None] * self.width + torch.arange(self.width)).reshape(-1)

    def params_per_unit(self) -> int:
        m = self.target.module
        if self.axis == "rows":
            return self.width * (m.in_features + (1 if m.bias is not None else 0))
        return self.width * m.out_features

    def norms(self, count: int) -> Tensor:
        """Squared norm of each unit's share (bias included for rows), shape (count,)."""
        m = self.target.module
        W = m.weight.detach()
        if self.axis == "rows":
            sq = W.float().pow(2).sum(1)
            if m.bias is not None:
                sq = sq + m.bias.detach().float().pow(2)
        else:
            sq = W.float().pow(2).sum(0)
        return sq[: count * self.width].view(count, self.width).sum(1)


@dataclass(frozen=True)
class UnitGroup:
    """All units of one kind in one decoder layer."""

    kind: UnitKind
    layer: int
    count: int
    parts: tuple[UnitSlice, ...]

    def params_per_unit(self) -> int:
        return sum(p.params_per_unit() for p in self.parts)

    def dead(self) -> Tensor:
        """Bool (count,): units whose output is exactly zero (an essential part is all zero)."""
        dead = torch.zeros(self.count, dtype=torch.bool)
        for p in self.parts:
            if p.essential:
                dead |= p.norms(self.count) == 0
        return dead

    def removed(self) -> Tensor:
        """Bool (count,): units whose every part is entirely zero."""
        gone = torch.ones(self.count, dtype=torch.bool)
        for p in self.parts:
            gone &= p.norms(self.count) == 0
        return gone

    @torch.no_grad()
    def zero(self, units: Tensor) -> None:
        """Set every weight (and row bias) of the given units to zero."""
        for p in self.parts:
            idx = p.indices(units)
            m = p.target.module
            if p.axis == "rows":
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0
            else:
                m.weight[:, idx] = 0


def _slices(targets: dict[str, TargetLinear], spec: list[tuple[str, Axis, int, bool]]):
    return tuple(
        UnitSlice(targets[role], axis, width, essential)
        for role, axis, width, essential in spec
        if role in targets
    )


def unit_groups(model: Any, targets: list[TargetLinear] | None = None) -> list[UnitGroup]:
    """Head groups and MLP channels of every decoder layer, in layer order.

    Sizes are read from the modules themselves (not the config), so this works on models whose
    layers were already shrunk to different sizes.
    """
    layout = layout_for(model)
    targets = targets if targets is not None else decoder_linears(model, layout)
    head_dim = layout.head_dim(model.config)
    per_kv = layout.n_heads(model.config) // layout.n_kv_heads(model.config)
    by_layer: dict[int, dict[str, TargetLinear]] = {}
    for t in targets:
        by_layer.setdefault(t.layer_index, {})[t.role] = t
    groups: list[UnitGroup] = []
    for layer, roles in sorted(by_layer.items()):
        if all(r in roles for r in (ATTN_Q, ATTN_K, ATTN_V, ATTN_O)):
            kv_heads = roles[ATTN_K].module.out_features // head_dim
            q_width = per_kv * head_dim
            spec = [
                (ATTN_Q, "rows", q_width, False),
                (ATTN_K, "rows", head_dim, False),
                (ATTN_V, "rows", head_dim, True),
                (ATTN_O, "cols", q_width, True),
            ]
            groups.append(UnitGroup("heads", layer, kv_heads, _slices(roles, spec)))
        if MLP_DOWN in roles:
            channels = roles[MLP_DOWN].module.in_features
            spec = [(r, "rows", 1, True) for r in layout.mlp_in_roles]
            spec.append((MLP_DOWN, "cols", 1, True))
            groups.append(UnitGroup("channels", layer, channels, _slices(roles, spec)))
    return groups


def remove_dead_units(groups: list[UnitGroup]) -> int:
    """Zero out every dead unit completely (its output is already zero, so the model's function
    is unchanged), e.g. the gate and up rows of a channel whose down column is gone; returns how
    many units were completed this way."""
    n = 0
    for g in groups:
        dead = g.dead() & ~g.removed()
        if bool(dead.any()):
            g.zero(torch.nonzero(dead).reshape(-1))
            n += int(dead.sum())
    return n
