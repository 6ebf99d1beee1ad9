"""The one interface every global-threshold method follows, and the sparsity structures.

A *global* method (surgeon, K-OBD, L-OBD, magnitude) sees one linear layer at a time through two
questions, so that the multi-shot driver, the reports and the benchmarks never special-case a
method:

1. ``costs(W, curvature, structure)``: what removing each candidate would cost
   (elements for unstructured and N:M; rows and columns for rows-columns); for heads-channels
   ``unit_costs(W, curvature, axis, width, count)``: this layer's share of the cost of each
   coupled unit (blocks of ``width`` rows or columns, see ``models/units.py``),
2. ``apply(W, curvature, removal)``: the new weights once a removal is decided (zeroed for the
   remove-only baselines; the closed-form correlated update for the surgeon).

The global threshold over all layers (``methods/threshold.py``) sits between the two.
``W`` is always the *augmented* weight: the bias, where there is one, is its last column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from llm_surgeon.curvature.factors import Curvature  # the one factor type, re-exported here
from llm_surgeon.errors import UserError

StructureKind = Literal["unstructured", "nm", "rows-columns", "heads-channels"]


@dataclass(frozen=True)
class Structure:
    """A sparsity structure: unstructured, N:M (at most N nonzero of every M inputs) or rows and
    columns (whole output rows and input columns of each linear)."""

    kind: StructureKind
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def nm_sparsity(self) -> float:
        return 1.0 - self.n / self.m


_NM = re.compile(r"^(\d+):(\d+)$")
STRUCTURE_NAMES = ("unstructured", "N:M (e.g. 2:4, 4:8)", "rows-columns", "heads-channels")


def parse_structure(text: str) -> Structure:
    """'unstructured' | 'N:M' | 'rows-columns' | 'heads-channels' → :class:`Structure`."""
    text = text.strip().lower()
    if text in ("unstructured", "rows-columns", "heads-channels"):
        return Structure(text)  # type: ignore[arg-type]
    match = _NM.match(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UserError(f"--structure {text}: N:M needs 0 < N < M (got N={n}, M={m})")
        return Structure("nm", n, m)
    raise UserError(f"unknown --structure {text!r} (choose from {', '.join(STRUCTURE_NAMES)})")


@dataclass
class Removal:
    """What to remove from one layer: an element mask, or sets of rows and columns."""

    mask: torch.Tensor | None = None  # bool, shape of W, True = removed
    rows: torch.Tensor | None = None  # int indices
    cols: torch.Tensor | None = None  # int indices


@dataclass
class Costs:
    """Costs of the candidates of one layer: elements, rows and columns, or shares of units."""

    elements: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    units: torch.Tensor | None = None  # this layer's share of each coupled unit's cost


class GlobalMethod(Protocol):
    name: str
    curvature: Literal["none", "activations", "kfac"]
    updates: bool

    def costs(self, W: torch.Tensor, curv: Curvature, structure: Structure) -> Costs: ...

    def unit_costs(
        self, W: torch.Tensor, curv: Curvature, axis: str, width: int, count: int
    ) -> torch.Tensor: ...

    def apply(
        self, W: torch.Tensor, curv: Curvature, removal: Removal, structure: Structure
    ) -> torch.Tensor: ...
