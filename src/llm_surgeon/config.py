"""Every setting of a prune run, in one light dataclass (no torch import), so that the command
line takes its defaults from here and the report records them verbatim.

The run's own settings are declared here; each method's knobs are declared once, in its
settings class (``settings.py``), and appear here as flat fields under their keys
(``max_correlate``, ``maiht_mu``, ...), the names a bench YAML, a checkpoint and a report use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, make_dataclass

from llm_surgeon.errors import UserError
from llm_surgeon.settings import (
    MAX_NM_SUBSETS,
    check_bounded,
    check_choice,
    declared_settings,
    flag,
)
from llm_surgeon.unit_options import UNIT_OPTIONS, UnitOptions

FISHER_KINDS = ("empirical", "sampled")
CURVATURE_PASSES = ("sweep", "hooks")
LAYER_SIZES = ("global", "uniform")
MAX_SHOTS = 1000  # the paper uses 40; beyond this a run is a mistake, and each shot checkpoints
MAX_SEED = 2**32 - 1
MAX_CHANNEL_MULTIPLE = 65_536

# Bounds of every number a run takes, inclusive: (smallest, largest). Floats must be finite.
BOUNDS: dict[str, tuple[float, float]] = {
    "shots": (1, MAX_SHOTS),
    "calib_samples": (1, 1_000_000),
    "seqlen": (2, 1_048_576),
    "seed": (0, MAX_SEED),
    "eval_windows": (1, 1_000_000),
    "nearest_kronecker": (0, 1000),
    "batch_size": (1, 65_536),
}
_OPEN_LOW: dict[str, tuple[float, float]] = {}  # (low, high]
for _key, _f in declared_settings().items():  # every method's settings, from settings.py
    if _f.metadata["bounds"] is not None:
        (_OPEN_LOW if _f.metadata["open_low"] else BOUNDS)[_key] = _f.metadata["bounds"]


def check_number(name: str, value: object) -> None:
    """One setting's number: the right type, finite, inside its bounds (one-line errors)."""
    if name in BOUNDS:
        check_bounded(name, value, BOUNDS[name])
    elif name in _OPEN_LOW:
        check_bounded(name, value, _OPEN_LOW[name], open_low=True)


@dataclass
class RunConfig:
    """The run's own settings (what every method shares); :class:`PruneConfig` adds every
    method's settings."""

    model: str = "smollm2-135m"
    method: str = "surgeon"
    structure: str = "unstructured"
    sparsity: float | None = None  # None: 0.5, or 1 - N/M for N:M
    shots: int = 5
    calib_data: str = "sotu"
    calib_samples: int = 32
    seqlen: int = 512
    seed: int = 0
    eval_data: str = "sotu"
    eval_windows: int = 64
    eval: bool = True
    # evaluate on a validation split instead of the test text: the last eval_windows × seqlen
    # tokens of the calibration text, which calibration then never draws from
    validation: bool = False
    eval_every_shot: bool = False
    fisher: str = "empirical"
    nearest_kronecker: int = 0  # power iterations of the nearest-Kronecker estimate (0: K-FAC)
    batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    output: str | None = None
    time_plain_pass: bool = False
    max_memory: str | None = None  # e.g. "2GB": stream decoder layers from disk under it
    offload_dir: str | None = None  # where streamed layers and hidden states go (a cache)
    # K-FAC pass: "sweep" (layer by layer, one layer's factors in memory; any store) or "hooks"
    # (one whole-model backward per batch; every layer resident, every layer's sums at once)
    curvature_pass: str = "sweep"
    # heads-channels: every layer keeps a multiple of this many MLP channels (None: 32, the
    # quantization block of llama.cpp's Q8_0/Q4_0, where layers have >= 512 channels; else 1)
    channel_multiple: int | None = None
    layer_sizes: str = "global"  # heads-channels: "global" (per-layer sizes) | "uniform"
    # heads-channels: "consumer": only the o/down columns are costed and updated, the
    # q/k/v/gate/up rows are zeroed without an update; "layers": a unit's cost is the sum of
    # every linear's share, each linear updated on its own
    unit_coupling: str = "consumer"
    # heads-channels: rank units by "per-parameter" cost, raw "cost", or the cost per parameter
    # "standardized" (z-score) within each layer and kind
    unit_ranking: str = "per-parameter"
    # heads-channels: "global": KV groups and channels in one threshold; "proportional": each
    # kind loses the target fraction of its own parameters
    kind_allocation: str = "global"

    def unit_shape(self) -> tuple[int | None, bool]:
        """(channel multiple or None for the default, uniform layer sizes) of a heads-channels
        prune; see :func:`llm_surgeon.methods.threshold.default_channel_multiple`."""
        return self.channel_multiple, self.layer_sizes == "uniform"

    def unit_options(self) -> UnitOptions:
        """The heads-channels levers of this run (coupling, ranking, kind allocation)."""
        return UnitOptions(self.unit_coupling, self.unit_ranking, self.kind_allocation)

    def inert_settings(self) -> set[str]:
        """The settings this run has no use for: the unit shape and levers outside
        heads-channels, the levers for a method with its own unit ranking (Numerical). A
        recorded run that differs from this one only in these is the same run."""
        from llm_surgeon.methods.registry import method_class
        from llm_surgeon.structures import parse_structure

        if not parse_structure(self.structure).accepts_unit_shape:
            return {"channel_multiple", "layer_sizes", *UNIT_OPTIONS}
        if method_class(self.method).kind != "global":
            return set(UNIT_OPTIONS)
        return set()

    def target_sparsity(self) -> float:
        """The run's target sparsity, resolved by its structure (None: 0.5; N:M: 1 - N/M)."""
        from llm_surgeon.structures import parse_structure

        return parse_structure(self.structure).target_sparsity(self.sparsity)

    def validate(self):
        from llm_surgeon.methods.registry import method_class
        from llm_surgeon.structures import parse_structure

        self.check_types()
        if self.sparsity is not None and (not math.isfinite(self.sparsity)
                                          or not 0.0 <= self.sparsity < 1.0):
            raise UserError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        for name in (*BOUNDS, *_OPEN_LOW):
            check_number(name, getattr(self, name))
        for key, f in declared_settings().items():
            if f.metadata["choices"]:
                check_choice(key, getattr(self, key), f.metadata["choices"])
        if self.fisher not in FISHER_KINDS:
            raise UserError(f"--fisher must be one of {', '.join(FISHER_KINDS)}")
        if self.curvature_pass not in CURVATURE_PASSES:
            raise UserError(f"--curvature-pass must be one of {', '.join(CURVATURE_PASSES)}")
        if self.curvature_pass == "hooks" and self.max_memory is not None:
            raise UserError("--curvature-pass hooks needs every layer in memory; drop "
                            "--max-memory or use --curvature-pass sweep")
        if self.max_memory is not None:
            from llm_surgeon.models.offload import parse_memory

            parse_memory(self.max_memory)
        method = method_class(self.method)
        structure = parse_structure(self.structure)
        if self.layer_sizes not in LAYER_SIZES:
            raise UserError(f"--layer-sizes must be one of {', '.join(LAYER_SIZES)}")
        k = self.channel_multiple
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                              or not 1 <= k <= MAX_CHANNEL_MULTIPLE):
            raise UserError(f"--channel-multiple must be an integer in [1, "
                            f"{MAX_CHANNEL_MULTIPLE}], got {k!r}")
        structure.check_unit_shape(self.channel_multiple, self.layer_sizes)
        for key, choices in UNIT_OPTIONS.items():
            if getattr(self, key) not in choices:
                raise UserError(f"{flag(key)} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, key)!r}")
        structure.check_unit_options(self.unit_options())
        if self.unit_ranking == "standardized" and self.layer_sizes == "uniform":
            # a uniform position sums its layers' keys, and a unit of zero cost keys −inf
            # under standardized ranking: one dead unit would pull its position in every layer
            raise UserError("--unit-ranking standardized does not combine with --layer-sizes "
                            "uniform; use per-parameter or cost ranking there")
        structure.target_sparsity(self.sparsity)
        if structure.name not in method.structures:
            raise UserError(
                f"method {self.method!r} does not support --structure {structure} "
                f"(supports: {', '.join(method.structures)})"
            )
        nm = structure.nm
        if nm is not None and method.Settings.accepts("nm_cost") and \
                getattr(self, "nm_cost", None) == "joint" and \
                math.comb(nm[1], nm[1] - nm[0]) > MAX_NM_SUBSETS:
            raise UserError(f"--nm-cost joint compares all {math.comb(nm[1], nm[1] - nm[0])} "
                            f"ways to remove {nm[1] - nm[0]} of {nm[1]}, more than "
                            f"{MAX_NM_SUBSETS}; use --nm-cost independent for {structure}")
        return structure

    def check_types(self) -> None:
        """Every field of the declared type (a bench YAML or a checkpoint can hold anything)."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind.startswith("str"):
                ok = isinstance(value, str)
            else:
                ok = True
            if not ok:
                want = kind.split(" |")[0].replace("str", "a string").replace(
                    "int", "an integer").replace("float", "a number").replace("bool", "true/false")
                raise UserError(f"setting {f.name} ({flag(f.name)}) must be {want}, got "
                                f"{value!r}")


PruneConfig = make_dataclass(
    "PruneConfig",
    [(key, f.type, field(default=f.default, metadata=f.metadata))
     for key, f in declared_settings().items()],
    bases=(RunConfig,),
    namespace={"__doc__": "Every setting of a prune run (the run's own, then every method's "
                          "settings under their flat keys); recorded verbatim in the report."},
)
PruneConfig.__module__ = __name__
