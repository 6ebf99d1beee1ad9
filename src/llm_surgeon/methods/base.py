"""The three interfaces a method plugs in through, and what they exchange.

Every method is one class deriving from exactly one of:

* :class:`GlobalMethod` (surgeon, K-OBD, L-OBD, magnitude): sees one linear layer at a time
  through questions the structure picks from (``structures.py``):

  1. ``element_costs(W, curv)`` / ``line_costs(W, curv)`` (rows, columns) /
     ``unit_costs(W, curv, axis, width, count)`` (this layer's share of each coupled unit:
     blocks of ``width`` rows or columns, see ``models/units.py``): what removing each
     candidate would cost under the curvature the method declares (``curvature``),
  2. ``apply(W, curv, removal)``: the new weights once a removal is decided (zeroed for the
     remove-only baselines; the closed-form correlated update for the surgeon).

  One threshold over all layers (or per layer: ``allocation``, ``methods/threshold.py``) sits
  between the two; several shots on a linear schedule.
* :class:`LayerwiseMethod` (SparseGPT, Wanda, mAIHT): ``prune_linear(W, H, sparsity, nm)``,
  each linear from H = XᵀX of its own inputs, layer after layer, in one pass.
* :class:`UnitScoringMethod` (Numerical pruning): ``unit_scores`` of coupled units from H of
  the output projections, one ranking, then ``compensate``.

Each class declares its ``name``, the ``structures`` it supports and its ``Settings`` (a small
frozen dataclass of ``settings.py``); the base class declares ``kind`` and the pass the driver
runs (:meth:`Method.prune_pass`), so the driver, the reports and the benchmarks never ask what
a method is. ``W`` is always the *augmented* weight: the bias, where there is one, is its last
column. Register a new method with :func:`llm_surgeon.methods.registry.register_method`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch

from llm_surgeon.curvature.factors import Curvature  # the one factor type, re-exported here
from llm_surgeon.settings import NoSettings, Settings

Counts = dict[str, tuple[int, int]]  # target name -> (zeros, total) after a pass
Run = Any  # llm_surgeon.driver.Run: the model, its layer store, targets, settings, structure
Pass = Callable[..., Counts]


@dataclass(frozen=True)
class Passes:
    """The passes the driver offers (``driver.PASSES``); each interface below picks its own in
    :meth:`Method.prune_pass`, so the driver never asks which kind of method it holds."""

    global_shot: Pass  # (run, sparsity, windows, shot): curvature, costs, threshold, updates
    layerwise_pass: Pass  # (run, sparsity, windows): layer after layer from H = XᵀX
    unit_scoring_pass: Pass  # (run, sparsity, windows): scores, one ranking, compensation


@dataclass
class Removal:
    """What to remove from one layer: an element mask, or sets of rows and columns."""

    mask: torch.Tensor | None = None  # bool, shape of W, True = removed
    rows: torch.Tensor | None = None  # int indices
    cols: torch.Tensor | None = None  # int indices
    # False: the removed entries are zeroed and nothing else moves, whatever the method
    # (``obd.zero_removed``), e.g. the producer rows of a unit costed by its consumer alone
    update: bool = True


@dataclass
class Costs:
    """Costs of the candidates of one layer: elements, rows and columns, or shares of units."""

    elements: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    units: torch.Tensor | None = None  # this layer's share of each coupled unit's cost


class Method(ABC):
    """Base of the three interfaces. A method is built from its settings (defaults when None;
    keyword arguments override single fields: ``SparseGPTMethod(blocksize=64)``)."""

    kind: ClassVar[Literal["global", "layerwise", "units"]]  # declared by the three bases
    name: ClassVar[str]
    structures: ClassVar[tuple[str, ...]]  # names of the structures it supports
    Settings: ClassVar[type[Settings]] = NoSettings

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else self.Settings()
        self.settings = replace(base, **overrides) if overrides else base

    def supports(self, structure: Any) -> bool:
        return structure.name in self.structures

    def shots(self, requested: int) -> int:
        """Shots this method runs when ``requested`` are asked for (one-pass methods: 1)."""
        return 1

    @abstractmethod
    def prune_pass(self, passes: Passes, run: Run, sparsity: float, windows: torch.Tensor,
                   shot: int) -> Counts:
        """Prune the run's model to ``sparsity`` (shot ``shot``) with this method's pass of
        ``passes``; returns (zeros, total) of every target."""


class GlobalMethod(Method):
    """Costs and updates of one linear under a curvature; one threshold over all layers."""

    kind = "global"
    curvature: ClassVar[Literal["none", "activations", "kfac"]] = "none"
    # "global": one threshold over all layers; "layer": every layer loses the target fraction
    # (costs without a common scale across layers, e.g. a curvature without G)
    allocation: ClassVar[Literal["global", "layer"]] = "global"
    updates: ClassVar[bool] = False  # whether ``apply`` changes the remaining weights
    # whether ``prepared`` turns the curvature into what costs and updates read (damped
    # factors and inverses), kept through the shot instead of the raw factors
    prepares: ClassVar[bool] = False

    def shots(self, requested: int) -> int:
        return requested

    def prune_pass(self, passes: Passes, run: Run, sparsity: float, windows: torch.Tensor,
                   shot: int) -> Counts:
        return passes.global_shot(run, sparsity, windows, shot)

    def prepared(self, curv: Curvature, name: str = "layer",
                 inverses: Curvature | None = None) -> Curvature:
        """One layer's raw curvature turned into what the costs and updates read (a new
        object; ``curv`` as it is by default); a ValueError names what is unusable.
        ``inverses``: the ``Ainv``/``Ginv``/``flat`` of an earlier call on the same ``curv``
        (the driver keeps only those between the costs and the updates), so that only the
        cheap part is redone."""
        return curv

    @abstractmethod
    def element_costs(self, W: torch.Tensor, curv: Curvature) -> torch.Tensor:
        """Cost of removing each single weight (shape of W)."""

    def nm_element_costs(self, W: torch.Tensor, curv: Curvature, n: int, m: int,
                         groupable: int) -> torch.Tensor:
        """Element costs under an N:M structure (groups of M among the first ``groupable``
        columns): :meth:`element_costs` by default, each group then losing its M−N cheapest
        weights. A method that chooses each group's M−N jointly returns
        :func:`~llm_surgeon.methods.threshold.nm_chosen_costs` instead (the surgeon's
        ``--nm-cost joint``)."""
        return self.element_costs(W, curv)

    def line_costs(self, W: torch.Tensor, curv: Curvature
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cost of removing each whole row (out,) and each whole column (in,)."""
        raise NotImplementedError(f"{self.name} has no row and column costs")

    def unit_costs(self, W: torch.Tensor, curv: Curvature, axis: str, width: int,
                   count: int) -> torch.Tensor:
        """This layer's share of the cost of each of ``count`` coupled units (blocks of
        ``width`` rows, or columns among the first ``count · width``)."""
        raise NotImplementedError(f"{self.name} has no unit costs")

    @abstractmethod
    def apply(self, W: torch.Tensor, curv: Curvature, removal: Removal) -> torch.Tensor:
        """The new weights once ``removal`` is decided (removed entries exactly zero)."""


class LayerwiseMethod(Method):
    """Each linear pruned from H = XᵀX of its own inputs, one decoder layer after the other,
    each on the outputs of the pruned layers before it (one pass)."""

    kind = "layerwise"
    # True: ``prune_linear`` reads only diag(H), so the pass may hand it diag(XᵀX) as a vector
    diagonal_statistic: ClassVar[bool] = False

    def prune_pass(self, passes: Passes, run: Run, sparsity: float, windows: torch.Tensor,
                   shot: int) -> Counts:
        with run.timer("layerwise"):
            return passes.layerwise_pass(run, sparsity, windows)

    @abstractmethod
    def prune_linear(self, W: torch.Tensor, H: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
        """New weight (removed entries exactly zero) from W (out, in) and H = XᵀX (in, in):
        ``sparsity`` of every row (or layer) unstructured, or the N:M pattern ``nm``."""


class UnitScoringMethod(Method):
    """Coupled units (KV groups, MLP channels) scored from H = XᵀX of the output projections,
    one ranking over all layers, then a closed-form compensation (one pass)."""

    kind = "units"

    def prune_pass(self, passes: Passes, run: Run, sparsity: float, windows: torch.Tensor,
                   shot: int) -> Counts:
        with run.timer("units"):
            return passes.unit_scoring_pass(run, sparsity, windows)

    @abstractmethod
    def unit_scores(self, W: torch.Tensor, H: torch.Tensor, width: int, count: int,
                    keep_fraction: float) -> torch.Tensor:
        """Scores (lowest removed first) of ``count`` units of ``width`` input columns of the
        output projection W, from H = XᵀX of its input."""

    @abstractmethod
    def compensate(self, W: torch.Tensor, H: torch.Tensor, keep_cols: torch.Tensor
                   ) -> torch.Tensor:
        """W updated for the removal of the columns not in ``keep_cols``."""
