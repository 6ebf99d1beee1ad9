"""The heads-channels selection and update levers of a run (``--unit-coupling``,
``--unit-ranking``, ``--kind-allocation``): their choices and the small record the structure
reads (no torch import: the command line and the run's config use it). What each does:
``docs/structures.md``."""

from __future__ import annotations

from dataclasses import dataclass

# the first of each is the default. Coupling: "consumer" since the issue-16 ablation
# (bench/ablation: 20 % heads-channels, validation 33.92 against 43.37 with "layers")
UNIT_COUPLINGS = ("consumer", "layers")
UNIT_RANKINGS = ("per-parameter", "cost", "standardized")
KIND_ALLOCATIONS = ("global", "proportional")
# RunConfig field -> its choices
UNIT_OPTIONS = {"unit_coupling": UNIT_COUPLINGS, "unit_ranking": UNIT_RANKINGS,
                "kind_allocation": KIND_ALLOCATIONS}


@dataclass(frozen=True)
class UnitOptions:
    """How a heads-channels prune costs, updates and ranks its units (the defaults: the first
    choice of each)."""

    coupling: str = UNIT_COUPLINGS[0]
    ranking: str = UNIT_RANKINGS[0]
    kind_allocation: str = KIND_ALLOCATIONS[0]

    def changed(self) -> list[str]:
        """The run settings (RunConfig fields) set away from their defaults."""
        return [key for key, value in zip(UNIT_OPTIONS, (self.coupling, self.ranking,
                                                        self.kind_allocation), strict=True)
                if value != UNIT_OPTIONS[key][0]]
