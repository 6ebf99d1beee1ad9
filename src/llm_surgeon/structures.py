"""The sparsity structures, each one object: its candidates, its selection, its checks and its
finishing step, so that adding a structure touches this file (or a file of your own that calls
:func:`register_structure`) and nothing in the driver.

=================  ==================================  =========================================
structure          candidates (what a global method     selection (methods/threshold.py) and
                   is asked the cost of)                finishing step
=================  ==================================  =========================================
unstructured       single weights                       one global threshold (or per layer)
N:M                single weights, only the M−N         the same threshold over group-mean costs;
                   cheapest of each group of M inputs   M must divide every input width
rows-columns       whole output rows, input columns     threshold on cost per parameter
heads-channels     KV head groups and MLP channels      per-parameter ranking in blocks of the
                   (coupled across q/k/v/o, up/gate/    channel multiple; then the physical
                   down)                                shrink of the module shapes
=================  ==================================  =========================================

A global method answers three questions (:class:`~llm_surgeon.methods.base.GlobalMethod`):
``element_costs``, ``line_costs`` (rows and columns) and ``unit_costs``; a structure asks the
one its candidates need. Layer-wise methods get the structure's ``nm`` pattern (None or (N, M)).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from llm_surgeon.errors import UserError
from llm_surgeon.methods import threshold
from llm_surgeon.methods.base import Costs, Curvature, GlobalMethod, Removal
from llm_surgeon.models.layouts import TargetLinear, decoder_linears
from llm_surgeon.models.shrink import _record_sizes, shrink_group
from llm_surgeon.models.units import UnitGroup, UnitSlice, remove_dead_units, unit_groups
from llm_surgeon.settings import flag
from llm_surgeon.unit_options import UnitOptions

DEFAULT_SPARSITY = 0.5
DEFAULT_UNIT_OPTIONS = UnitOptions()  # heads-channels: today's coupling, ranking, allocation


@dataclass
class ShotCosts:
    """What a structure's selection reads after the costs pass of a shot: every target's
    shape, the small costs kept in memory (rows and columns, unit shares), element costs of
    target ``i`` read back on demand (``elements(i)``), a place to keep per-layer masks, and
    the structure's own state of the shot (e.g. the unit groups)."""

    targets: list[TargetLinear]
    shapes: dict[str, torch.Size]
    small: dict[str, Costs]
    elements: Callable[[int], torch.Tensor]
    keep: Callable[[str, torch.Tensor], None]
    kept: Callable[[str], torch.Tensor]
    state: Any = None


class Structure:
    """Base of every structure. ``name`` is what a method's ``structures`` lists and what
    ``--structure`` takes (:meth:`parse` may accept more, as N:M does)."""

    name: ClassVar[str]
    syntax: ClassVar[str]  # how --structure spells it, for the error message listing them
    accepts_unit_shape: ClassVar[bool] = False  # --channel-multiple, --layer-sizes
    # where a global method's costs go in a shot: False: element costs (one layer at a time,
    # to the work folder); True: a few numbers per layer (rows/columns, units), kept in memory
    small_costs: ClassVar[bool] = False
    nm: tuple[int, int] | None = None  # the pattern a layer-wise method is given
    fixed_sparsity: float | None = None  # a sparsity the structure itself fixes (N:M)

    pattern_axis: ClassVar[str] = "pattern"  # x label of a plot of fixed-sparsity patterns

    @property
    def family(self) -> str:
        """The plot its runs go to (``report/plots.py``): its name; N:M patterns share one."""
        return self.name

    @property
    def pattern_order(self) -> Any:
        """Sort key of its pattern on such a plot's x axis."""
        return str(self)

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), str(self)))

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        """This structure if ``text`` (stripped, lower case) names it, else None."""
        return cls() if text == cls.name else None

    # ---- checks ---------------------------------------------------------------------------

    def target_sparsity(self, sparsity: float | None) -> float:
        """The run's target: ``sparsity``, or the default (0.5) when None."""
        return DEFAULT_SPARSITY if sparsity is None else sparsity

    def check_unit_shape(self, channel_multiple: int | None, layer_sizes: str) -> None:
        if not self.accepts_unit_shape and (layer_sizes != "global"
                                            or channel_multiple is not None):
            raise UserError("--layer-sizes and --channel-multiple apply to --structure "
                            "heads-channels only")

    def check_unit_options(self, options: UnitOptions) -> None:
        """--unit-coupling, --unit-ranking and --kind-allocation away from their defaults
        only where the structure has units (one-line error)."""
        changed = options.changed()
        if changed and not self.accepts_unit_shape:
            raise UserError(f"{', '.join(flag(k) for k in changed)} "
                            f"appl{'ies' if len(changed) == 1 else 'y'} to --structure "
                            "heads-channels only")

    def check_widths(self, targets: list[TargetLinear]) -> None:
        """Refuse a model whose linears this structure cannot cut (one-line error)."""

    # ---- a global method's shot -------------------------------------------------------------

    def shot_state(self, model: Any, targets: list[TargetLinear],
                   options: UnitOptions = DEFAULT_UNIT_OPTIONS) -> Any:
        """What the structure needs through one shot (the unit groups of heads-channels, with
        the run's ``options`` for them)."""
        return None

    def needs_curvature(self, t: TargetLinear, state: Any) -> bool:
        """Whether this shot's costs and update of ``t`` read its curvature (every target by
        default); the others get no statistics and no inverses, and must never be updated."""
        return True

    def costs(self, method: GlobalMethod, W: torch.Tensor, curv: Curvature, t: TargetLinear,
              state: Any) -> Costs:
        """The costs of ``t``'s candidates under ``method`` (element costs by default)."""
        return Costs(elements=method.element_costs(W, curv))

    def eligible(self, costs: torch.Tensor, t: TargetLinear) -> torch.Tensor:
        """Element costs as the threshold sees them (+inf: never removed)."""
        return costs

    def select(self, shot: ShotCosts, target_sparsity: float, allocation: str,
               unit_shape: tuple[int | None, bool]) -> Callable[[TargetLinear], Removal]:
        """Removal of every target: element masks by one streamed global threshold, or one
        per layer with ``allocation="layer"`` (:func:`~llm_surgeon.methods.threshold.
        select_elements`)."""
        names = [t.name for t in shot.targets]

        def eligible(i: int) -> torch.Tensor:
            return self.eligible(shot.elements(i), shot.targets[i])

        mask_of = threshold.select_elements(
            eligible, names, {k: math.prod(s) for k, s in shot.shapes.items()},
            target_sparsity, allocation,  # type: ignore[arg-type]
            keep=lambda i, m: shot.keep(names[i], m), kept=lambda i: shot.kept(names[i]))
        index = {k: i for i, k in enumerate(names)}
        return lambda t: Removal(mask=mask_of(index[t.name]))

    def after_update(self, state: Any, layer: int) -> None:
        """Called once a decoder layer's updates are written."""

    # ---- the end of the run -------------------------------------------------------------------

    def finish(self, run: Any, counts: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        """The finishing step after the last shot; returns entries for the report."""
        return {}


class Unstructured(Structure):
    """Any single weight."""

    name = "unstructured"
    syntax = "unstructured"


_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(eq=False)
class NM(Structure):
    """At most N nonzero weights in every group of M consecutive inputs of each row."""

    name: ClassVar[str] = "nm"
    syntax: ClassVar[str] = "N:M (e.g. 2:4, 4:8)"
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise UserError(f"--structure {self.n}:{self.m}: N:M needs 0 < N < M (got "
                            f"N={self.n}, M={self.m})")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property  # type: ignore[override]
    def nm(self) -> tuple[int, int]:
        return (self.n, self.m)

    @property
    def nm_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property  # type: ignore[override]
    def fixed_sparsity(self) -> float:
        return self.nm_sparsity

    @property
    def family(self) -> str:
        return "N:M"

    pattern_axis: ClassVar[str] = "N:M pattern (N of every M inputs kept)"

    @property
    def pattern_order(self) -> tuple[int, int]:
        return (self.n, self.m)

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        match = _NM.match(text)
        return cls(int(match.group(1)), int(match.group(2))) if match else None

    def target_sparsity(self, sparsity: float | None) -> float:
        if sparsity is not None and not math.isclose(sparsity, self.nm_sparsity):
            raise UserError(f"--structure {self} fixes the sparsity at {self.nm_sparsity:g}; "
                            f"omit --sparsity or pass {self.nm_sparsity:g}")
        return self.nm_sparsity

    def check_widths(self, targets: list[TargetLinear]) -> None:
        """M must divide every targeted linear's input width."""
        for t in targets:
            if t.module.in_features % self.m:
                raise UserError(f"--structure {self}: M={self.m} does not divide the input "
                                f"width {t.module.in_features} of {t.name}")

    def costs(self, method: GlobalMethod, W: torch.Tensor, curv: Curvature, t: TargetLinear,
              state: Any) -> Costs:
        """The method's element costs for N:M (:meth:`GlobalMethod.nm_element_costs`)."""
        return Costs(elements=method.nm_element_costs(W, curv, self.n, self.m,
                                                      t.module.in_features))

    def eligible(self, costs: torch.Tensor, t: TargetLinear) -> torch.Tensor:
        return threshold.nm_eligible_costs(costs, self.n, self.m,
                                           groupable=t.module.in_features)


class RowsColumns(Structure):
    """Whole output rows and input columns of each linear."""

    name = "rows-columns"
    syntax = "rows-columns"
    small_costs = True

    def costs(self, method: GlobalMethod, W: torch.Tensor, curv: Curvature, t: TargetLinear,
              state: Any) -> Costs:
        rows, cols = method.line_costs(W, curv)
        return Costs(rows=rows, cols=cols)

    def select(self, shot: ShotCosts, target_sparsity: float, allocation: str,
               unit_shape: tuple[int | None, bool]) -> Callable[[TargetLinear], Removal]:
        picked = threshold.select_lines(
            {t.name: (shot.small[t.name].rows, shot.small[t.name].cols) for t in shot.targets},
            shot.shapes, target_sparsity, allocation)  # type: ignore[arg-type]
        return lambda t: Removal(rows=picked[t.name][0], cols=picked[t.name][1])


@dataclass
class UnitShot:
    """Heads-channels' state of one shot: the unit groups, each target's (group, part), and
    the run's options."""

    groups: list[UnitGroup]
    parts: dict[str, tuple[UnitGroup, UnitSlice]]
    options: UnitOptions

    def counts(self, part: UnitSlice) -> bool:
        """Whether ``part``'s share is costed and updated: every part with
        ``--unit-coupling layers``, only the consumer's columns with ``consumer``."""
        return self.options.coupling == "layers" or part.axis == "cols"

    def scores(self, small: Mapping[str, Costs]) -> list[torch.Tensor]:
        """Each group's unit costs: the sum of its counted parts' shares."""
        return [torch.stack([small[p.target.name].units.double().cpu()  # type: ignore[union-attr]
                             for p in g.parts if self.counts(p)]).sum(0) for g in self.groups]


class HeadsChannels(Structure):
    """Attention heads in whole KV groups and MLP channels, coupled across the linears that
    share them (``models/units.py``), physically removed at the end. The run's
    :class:`~llm_surgeon.unit_options.UnitOptions` (``--unit-coupling``, ``--unit-ranking``,
    ``--kind-allocation``) reach it through :meth:`shot_state`."""

    name = "heads-channels"
    syntax = "heads-channels"
    accepts_unit_shape = True
    small_costs = True

    def shot_state(self, model: Any, targets: list[TargetLinear],
                   options: UnitOptions = DEFAULT_UNIT_OPTIONS) -> UnitShot:
        groups = unit_groups(model, targets)
        return UnitShot(groups, {p.target.name: (g, p) for g in groups for p in g.parts},
                        options)

    def needs_curvature(self, t: TargetLinear, state: UnitShot) -> bool:
        """With ``--unit-coupling consumer`` the producers (q/k/v, gate/up) are neither
        costed nor updated: only the consumers' (o, down) curvature is collected."""
        return state.counts(state.parts[t.name][1])

    def costs(self, method: GlobalMethod, W: torch.Tensor, curv: Curvature, t: TargetLinear,
              state: UnitShot) -> Costs:
        """This linear's share of each unit's cost; with ``--unit-coupling consumer`` only the
        consumer's (o, down: the ``cols`` part) is costed, the producers' are not."""
        g, p = state.parts[t.name]
        if not state.counts(p):
            return Costs()
        return Costs(units=p.unit_costs(method, W, curv, g.count))

    def select(self, shot: ShotCosts, target_sparsity: float, allocation: str,
               unit_shape: tuple[int | None, bool]) -> Callable[[TargetLinear], Removal]:
        """Units ranked by cost per parameter (the sum of their parts' shares; or as
        ``--unit-ranking`` says, per kind with ``--kind-allocation proportional``); channels
        in blocks that keep every width a multiple of the channel multiple; ``uniform``: every
        layer loses the same counts (one global ranking, whatever the allocation). With
        ``--unit-coupling consumer`` the producers' rows are zeroed without an update."""
        state: UnitShot = shot.state
        groups, options = state.groups, state.options
        masks = threshold.select_unit_masks(
            state.scores(shot.small), [g.params_per_unit() for g in groups],
            [g.kind for g in groups], [g.layer for g in groups],
            sum(math.prod(s) for s in shot.shapes.values()),
            target_sparsity, allocation=allocation,  # type: ignore[arg-type]
            channel_multiple=unit_shape[0], uniform=unit_shape[1], ranking=options.ranking,
            kind_allocation=options.kind_allocation)
        removals: dict[str, Removal] = {}
        for g, mask in zip(groups, masks, strict=True):
            chosen = torch.nonzero(mask).reshape(-1)
            for p in g.parts:
                idx = p.indices(chosen)
                removals[p.target.name] = (Removal(rows=idx, update=state.counts(p))
                                           if p.axis == "rows" else Removal(cols=idx))
        return lambda t: removals[t.name]

    def after_update(self, state: UnitShot, layer: int) -> None:
        """Rows whose downstream column is gone go too."""
        remove_dead_units([g for g in state.groups if g.layer == layer])

    def finish(self, run: Any, counts: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        """Physically smaller: heads (in whole KV groups) and channels leave the module
        shapes, one layer at a time; the report's ``shrink`` entry."""
        dense_linear = sum(n for _, n in counts.values())
        with run.timer("shrink"):
            summary = shrink(run.model, run.store)
        run.targets = decoder_linears(run.model)
        return {"shrink": shrink_report(summary, dense_linear, sum(
            t.module.weight.numel() + (t.module.bias.numel() if t.has_bias else 0)
            for t in run.targets))}


def shrink(model: Any, store: Any) -> dict[str, Any]:
    """Dead units leave the module shapes one layer of the layer ``store`` at a time (each
    smaller layer written back); the config records every layer's sizes. Returns the shrink
    summary."""

    def n_params() -> int:
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    before = n_params()
    removed = {"heads": 0, "channels": 0}
    for ell in range(len(store)):
        with store.resident(ell, dirty=True):
            for g in unit_groups(model, [t for t in decoder_linears(model)
                                         if t.layer_index == ell]):
                removed[g.kind] += shrink_group(model, g, store.layout)
    sizes = _record_sizes(model, store.layout)
    return {"params_before": before, "params_after": n_params(),
            "kv_groups_removed": removed["heads"], "channels_removed": removed["channels"],
            "layer_sizes": sizes}


def shrink_report(summary: dict[str, Any], linear_before: int, linear_after: int
                  ) -> dict[str, Any]:
    """The report's ``shrink`` entry from a shrink summary and the decoder-linear counts."""
    return {
        "params_total_before": summary["params_before"],
        "params_total_after": summary["params_after"],
        "params_decoder_linear_before": linear_before,
        "params_decoder_linear_after": linear_after,
        "kv_groups_removed": summary["kv_groups_removed"],
        "channels_removed": summary["channels_removed"],
        "layer_sizes": summary["layer_sizes"],
    }


# ---- the registry ---------------------------------------------------------------------------

STRUCTURES: dict[str, type[Structure]] = {}


def register_structure(cls: type[Structure]) -> type[Structure]:
    """Make ``cls`` known to :func:`parse_structure` (and so to ``--structure`` and
    ``llm_surgeon.prune_model``); usable as a class decorator."""
    STRUCTURES[cls.name] = cls
    return cls


for _cls in (Unstructured, NM, RowsColumns, HeadsChannels):
    register_structure(_cls)


def structure_names() -> list[str]:
    return [cls.syntax for cls in STRUCTURES.values()]


def parse_structure(text: str | Structure) -> Structure:
    """'unstructured' | 'N:M' | 'rows-columns' | 'heads-channels' | any registered structure's
    name → its :class:`Structure` (a Structure is returned as is)."""
    if isinstance(text, Structure):
        return text
    key = text.strip().lower()
    for cls in STRUCTURES.values():
        found = cls.parse(key)
        if found is not None:
            return found
    raise UserError(f"unknown --structure {text!r} (choose from "
                    f"{', '.join(structure_names())})")


__all__ = ["NM", "STRUCTURES", "HeadsChannels", "RowsColumns", "ShotCosts", "Structure",
           "Unstructured", "parse_structure", "register_structure"]
