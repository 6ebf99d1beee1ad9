"""Coupled units of structured pruning, derived from a :class:`~llm_surgeon.models.layouts.Layout`.

A *unit* is the smallest piece whose removal makes modules physically smaller:

* an **MLP channel** c: row c of every MLP input linear (gate and up, or fc1 with its bias) and
  column c of the MLP output linear (down, fc2);
* an **attention head group**: one key/value head together with every query head that shares it
  (grouped-query attention), i.e. its rows of q, k and v (with biases) and the matching columns
  of o. With ordinary multi-head attention (OPT, Phi) a group is one head. Heads go in whole KV
  groups, so the number of query heads per KV head (``num_key_value_groups``) never changes and
  the attention code runs unmodified.

In a plain linear every unit occupies one contiguous block of rows or columns (unit u of width
w is ``[u·w, (u+1)·w)``), which is how Hugging Face models lay out heads and channels. A fused
linear (see :class:`~llm_surgeon.models.layouts.Fused`) holds one *piece* per member role: unit
u's rows of role r are ``offset_r + u·stride_r + [0, w_r)``, with ``stride_r = w_r`` and
``offset_r = count·Σ_{earlier roles} w`` when roles come block after block (Phi-3), and
``stride_r = Σ_all w`` and ``offset_r = Σ_{earlier roles} w`` when units come group after group
(GPT-NeoX, Falcon). Its share of a unit is the concatenation of its pieces.

A unit is *dead* when one of its *essential* parts is entirely zero: then its output is exactly
zero and removing all of it changes nothing. Essential are v rows and o columns of a head group
(zero q or k rows only make the attention uniform), and every part of an MLP channel (act(0) = 0
for ReLU, GELU and SiLU, so a zero gate or up row, with its bias, silences the channel). Where a
norm spans the whole q or k projection (OLMo 2), the unit's q and k rows still feed the other
heads' normalisation, so such a unit is dead only once those rows are zero too (*binding* parts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from llm_surgeon.errors import UserError
from llm_surgeon.models.layouts import (
    ATTN_IN_ROLES,
    ATTN_K,
    ATTN_O,
    ATTN_Q,
    ATTN_V,
    MLP_DOWN,
    MLP_GATE,
    MLP_UP,
    TargetLinear,
    decoder_linears,
    layout_for,
)

Axis = Literal["rows", "cols"]
UnitKind = Literal["heads", "channels"]


@dataclass(frozen=True)
class Piece:
    """One role's share of every unit in a fused linear: unit u owns
    ``offset + u·stride + [0, width)``."""

    role: str
    offset: int
    stride: int
    width: int
    essential: bool
    binding: bool = False


@dataclass(frozen=True)
class UnitSlice:
    """One linear's share of every unit of a group: ``width`` rows (or columns) per unit, one
    contiguous block per unit, or (fused linears) the concatenation of ``pieces``."""

    target: TargetLinear
    axis: Axis
    width: int
    essential: bool
    pieces: tuple[Piece, ...] = ()
    binding: bool = False  # dead only once this part is zero too (see module docstring)

    def index_matrix(self, units: Tensor) -> Tensor:
        """(len(units), width) row (or column) indices of each given unit."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        if not self.pieces:
            return units[:, None] * self.width + torch.arange(self.width)
        return torch.cat([p.offset + units[:, None] * p.stride + torch.arange(p.width)
                          for p in self.pieces], dim=1)

    def indices(self, units: Tensor) -> Tensor:
        """Row (or column) indices of the given units, in unit order."""
        return self.index_matrix(units).reshape(-1)

    def params_per_unit(self) -> int:
        m = self.target.module
        if self.axis == "rows":
            return self.width * (m.in_features + (1 if m.bias is not None else 0))
        return self.width * m.out_features

    def _squares(self) -> Tensor:
        m = self.target.module
        W = m.weight.detach()
        if self.axis == "rows":
            sq = W.float().pow(2).sum(1)
            if m.bias is not None:
                sq = sq + m.bias.detach().float().pow(2)
        else:
            sq = W.float().pow(2).sum(0)
        return sq

    def norms(self, count: int) -> Tensor:
        """Squared norm of each unit's share (bias included for rows), shape (count,)."""
        sq = self._squares()
        if not self.pieces:
            return sq[: count * self.width].view(count, self.width).sum(1)
        return sq[self.index_matrix(torch.arange(count))].sum(1)

    def zero_flags(self, count: int) -> list[tuple[Tensor, bool, bool]]:
        """(unit share is all zero, essential, binding) per piece (or for the whole part)."""
        if not self.pieces:
            return [(self.norms(count) == 0, self.essential, self.binding)]
        sq = self._squares()
        out = []
        for p in self.pieces:
            idx = p.offset + torch.arange(count)[:, None] * p.stride + torch.arange(p.width)
            out.append((sq[idx].sum(1) == 0, p.essential, p.binding))
        return out

    def unit_costs(self, method: Any, W: Tensor, curv: Any, count: int) -> Tensor:
        """``method.unit_costs`` of this share. A fused linear's units are not contiguous
        blocks: the problem is relabelled by the permutation P that makes them so (rows: W → PW,
        G → PGPᵀ; columns: W → WPᵀ, A → PAPᵀ, and likewise the inverses), which leaves every
        cost unchanged (unit u of the relabelled problem is unit u of this one)."""
        if not self.pieces:
            return method.unit_costs(W, curv, self.axis, self.width, count)
        order = self.indices(torch.arange(count))
        n = W.shape[0] if self.axis == "rows" else W.shape[1]
        rest = torch.ones(n, dtype=torch.bool)
        rest[order] = False
        perm = torch.cat([order, torch.nonzero(rest).reshape(-1)]).to(W.device)

        def sym(M: Tensor | None) -> Tensor | None:
            if M is None:
                return None
            pm = perm.to(M.device)
            return M[pm][:, pm]

        if self.axis == "rows":
            Wp, cp = W[perm], replace(curv, G=sym(curv.G), Ginv=sym(curv.Ginv))
        else:
            Wp, cp = W[:, perm], replace(curv, A=sym(curv.A), Ainv=sym(curv.Ainv))
        return method.unit_costs(Wp, cp, self.axis, self.width, count)


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
        """Bool (count,): units whose output is exactly zero (an essential part is all zero)
        and whose removal changes no other unit (every binding part is all zero too)."""
        dead = torch.zeros(self.count, dtype=torch.bool)
        bound = torch.ones(self.count, dtype=torch.bool)
        for p in self.parts:
            if not p.pieces and not p.binding:  # the plain case
                if p.essential:
                    dead |= p.norms(self.count) == 0
                continue
            for zero, essential, binding in p.zero_flags(self.count):
                if essential:
                    dead |= zero
                if binding:
                    bound &= zero
        return dead & bound

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


def _part(t: TargetLinear, axis: Axis, widths: dict[str, int], count: int,
          essential: set[str], binding: set[str]) -> UnitSlice:
    """One linear's share of a group's units, from the widths per unit of its member roles."""
    members = t.members
    if len(members) == 1:
        r = members[0]
        return UnitSlice(t, axis, widths[r], r in essential, binding=r in binding)
    total = sum(widths[r] for r in members)
    pieces, before = [], 0
    for r in members:
        w = widths[r]
        if t.arrangement == "groups":  # unit after unit, each [role 1 | role 2 | ...]
            pieces.append(Piece(r, before, total, w, r in essential, r in binding))
        else:  # role after role, each [unit 0 | unit 1 | ...]
            pieces.append(Piece(r, before * count, w, w, r in essential, r in binding))
        before += w
    return UnitSlice(t, axis, total, any(p.essential for p in pieces), tuple(pieces),
                     any(p.binding for p in pieces))


def unit_groups(model: Any, targets: list[TargetLinear] | None = None) -> list[UnitGroup]:
    """Head groups and MLP channels of every decoder layer, in layer order.

    Sizes are read from the modules themselves (not the config), so this works on models whose
    layers were already shrunk to different sizes.
    """
    layout = layout_for(model)
    targets = targets if targets is not None else decoder_linears(model, layout)
    head_dim = layout.head_dim(model.config)
    per_kv = layout.n_heads(model.config) // layout.n_kv_heads(model.config)
    refusal = layout.heads_refusal(model.config)
    binding = {n.role for n in layout.head_norms if n.spans == "projection"}
    by_layer: dict[int, list[TargetLinear]] = {}
    for t in targets:
        by_layer.setdefault(t.layer_index, []).append(t)
    groups: list[UnitGroup] = []
    for layer, ts in sorted(by_layer.items()):
        held = {r for t in ts for r in t.members}
        if all(r in held for r in (ATTN_Q, ATTN_K, ATTN_V, ATTN_O)):
            if refusal is not None:
                raise UserError(f"cannot remove attention heads: {refusal}")
            widths = {ATTN_Q: per_kv * head_dim, ATTN_K: head_dim, ATTN_V: head_dim,
                      ATTN_O: per_kv * head_dim}
            ins = [t for t in ts if set(t.members) & set(ATTN_IN_ROLES)]
            kv_heads = ins[0].module.out_features // sum(widths[r] for r in ins[0].members)
            parts = [_part(t, "rows", widths, kv_heads, {ATTN_V}, binding) for t in ins]
            o = next(t for t in ts if t.role == ATTN_O)
            parts.append(_part(o, "cols", widths, kv_heads, {ATTN_O}, binding))
            groups.append(UnitGroup("heads", layer, kv_heads, tuple(parts)))
        if MLP_DOWN in held:
            widths = {MLP_GATE: 1, MLP_UP: 1, MLP_DOWN: 1}
            down = next(t for t in ts if t.role == MLP_DOWN)
            channels = down.module.in_features
            every = {MLP_GATE, MLP_UP, MLP_DOWN}
            parts = [_part(t, "rows", widths, channels, every, set())
                     for t in ts if set(t.members) & {MLP_GATE, MLP_UP}]
            parts.append(_part(down, "cols", widths, channels, every, set()))
            groups.append(UnitGroup("channels", layer, channels, tuple(parts)))
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
