"""Each method's own small settings, declared once: type, default, bounds and help text.

A settings class is a frozen dataclass whose fields are built with :func:`setting`. From these
declarations come, without copying a name by hand:

* the command line's method flags (``cli.py`` loops over :data:`BUILTIN_SETTINGS`),
* the flat fields of :class:`~llm_surgeon.config.PruneConfig` (the record a report, a bench YAML
  and a checkpoint use: ``maiht_mu``, ``percdamp``, ...), under their *key*: ``prefix + name``,
* the range checks (:func:`~llm_surgeon.config.check_number`).

A method plug-in names its settings class (``Settings``) and reads ``self.settings``; nothing
else needs to know its knobs. No torch import here: the command line loads this to build flags.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar

from llm_surgeon.errors import UserError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_bounded(name: str, value: object, bounds: tuple[float, float],
                  open_low: bool = False) -> None:
    """``value`` of the setting ``name``: the bounds' type (an int low bound: an integer),
    finite, in [low, high] (or (low, high] with ``open_low``); one-line errors."""
    lo, hi = bounds
    if open_low:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{flag(name)} must be a number, got {value!r}")
        if not math.isfinite(value) or not lo < value <= hi:
            raise UserError(f"{flag(name)} must be in ({lo:g}, {hi:g}], got {value!r}")
        return
    kind = int if isinstance(lo, int) else float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)):
        raise UserError(f"{flag(name)} must be {'an integer' if kind is int else 'a number'}"
                        f", got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise UserError(f"{flag(name)} must be in [{lo}, {hi}], got {value!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` of the setting ``name`` one of ``choices`` (one-line error)."""
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def setting(default: Any, help: str, *, bounds: tuple[float, float] | None = None,
            open_low: bool = False, kind: str | None = None, choices: tuple[str, ...] = (),
            metavar: str | None = None) -> Any:
    """A settings field: ``default``, the flag's ``help`` (``%(default)s`` allowed), inclusive
    ``bounds`` (low, high) or, with ``open_low``, (low, high]; ``kind`` the command-line parser
    ("positive-int" | "integer" | "number"; default from the default's type)."""
    if kind is None:
        kind = "integer" if isinstance(default, int) and not isinstance(default, bool) else (
            "number" if isinstance(default, float) else "text")
    return field(default=default, metadata={"help": help, "bounds": bounds,
                                            "open_low": open_low, "kind": kind,
                                            "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    """Base of every method's settings: ``prefix`` + a field's name is its key in the flat
    record (``maiht_`` + ``mu`` = ``maiht_mu``); ``title`` heads its group of flags."""

    prefix: ClassVar[str] = ""
    title: ClassVar[str | None] = None  # None: the flags go with the prune command's own

    @classmethod
    def declared(cls) -> Iterator[tuple[str, Field]]:
        """(key, field) of every setting."""
        for f in fields(cls):
            yield cls.prefix + f.name, f

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Settings:
        """The settings found in a flat record (a PruneConfig as a dict, a report's
        ``settings``); keys it does not hold keep their defaults."""
        return cls(**{f.name: record[key] for key, f in cls.declared() if key in record})

    @classmethod
    def accepts(cls, name: str) -> str | None:
        """The field ``name`` refers to, by field name or by key (``mu`` or ``maiht_mu``)."""
        for key, f in cls.declared():
            if name in (key, f.name):
                return f.name
        return None

    def check(self) -> None:
        """Every bounded setting in its range, every setting with choices one of them
        (one-line errors naming its flag)."""
        for key, f in self.declared():
            if f.metadata.get("bounds") is not None:
                check_bounded(key, getattr(self, f.name), f.metadata["bounds"],
                              f.metadata.get("open_low", False))
            if f.metadata.get("choices"):
                check_choice(key, getattr(self, f.name), f.metadata["choices"])

    def record(self) -> dict[str, Any]:
        """The settings under their flat keys."""
        return {key: getattr(self, f.name) for key, f in self.declared()}


@dataclass(frozen=True)
class NoSettings(Settings):
    """A method without knobs (magnitude, L-OBD, K-OBD, Wanda)."""


NM_COSTS = ("independent", "joint")  # the surgeon's N:M group choice (SurgeonSettings.nm_cost)
MAX_NM_SUBSETS = 1024  # C(M, M−N) sets per group that nm_cost="joint" enumerates at most


@dataclass(frozen=True)
class SurgeonSettings(Settings):
    """LLM Surgeon: damping of the Kronecker factors, the size of a correlated update and how
    an N:M group's removals are chosen."""

    damp_g: float = setting(
        0.1, "damping of G relative to its mean diagonal (default: %(default)s, as the paper's "
        "released scripts; 0.01 over-trusts a Fisher from a few thousand tokens)",
        bounds=(0.0, 1e6))
    damp_a: float = setting(0.01, "damping of A relative to its mean diagonal "
                            "(default: %(default)s)", bounds=(0.0, 1e6))
    max_correlate: int = setting(
        256, "surgeon: weights removed together in one correlated update (default: "
        "%(default)s)", bounds=(1, 1_048_576), kind="positive-int")
    nm_cost: str = setting(
        "independent", "surgeon, N:M only: how each group's M-N weights to remove are chosen and "
        "ranked: 'independent' (the M-N cheapest single-weight costs, their mean; the default) "
        "or 'joint' (the set of M-N with the least exact cost removed together, all C(M, M-N) "
        "sets compared; other structures ignore it)", choices=NM_COSTS)


def _percdamp() -> Any:
    return setting(0.01, "SparseGPT: damping of XᵀX relative to its mean diagonal "
                   "(default: %(default)s)", bounds=(0.0, 1e6))


LAYERWISE_TITLE = "layer-wise methods (sparsegpt, wanda, maiht)"


@dataclass(frozen=True)
class SparseGPTSettings(Settings):
    """SparseGPT: lazy-update block and relative damping of H = XᵀX."""

    title: ClassVar[str | None] = LAYERWISE_TITLE
    blocksize: int = setting(128, "SparseGPT: columns per lazy-update block (default: "
                             "%(default)s)", bounds=(1, 1_048_576), kind="positive-int")
    percdamp: float = _percdamp()


@dataclass(frozen=True)
class MAIHTSettings(Settings):
    """mAIHT: l2 penalty, iteration counts and step."""

    prefix: ClassVar[str] = "maiht_"
    title: ClassVar[str | None] = LAYERWISE_TITLE
    mu: float = setting(0.1, "mAIHT: l2 penalty μ (default: %(default)s)", bounds=(0.0, 1e12))
    iht_iters: int = setting(50, "mAIHT: iterative hard thresholding steps (default: "
                             "%(default)s)", bounds=(0, 1_000_000))
    refine_iters: int = setting(30, "mAIHT: refinement steps on the final support (default: "
                                "%(default)s)", bounds=(0, 1_000_000))
    step: float = setting(0.95, "mAIHT: step as a fraction of 1/L, L = 2(‖XᵀX‖₂ + μ) "
                          "(default: %(default)s)", bounds=(0.0, 1.0), open_low=True)


@dataclass(frozen=True)
class NumericalSettings(Settings):
    """Numerical pruning: relative damping of H = XᵀX in the compensation."""

    title: ClassVar[str | None] = LAYERWISE_TITLE
    percdamp: float = _percdamp()


@dataclass(frozen=True)
class LowRankSettings(Settings):
    """The first-order low-rank correction between the shots of a global method."""

    prefix: ClassVar[str] = "lowrank_"
    rank: int = setting(0, "rank of the first-order low-rank correction between shots (0 = off,"
                        " the default)", bounds=(0, 65_536))
    steps: int = setting(0, "optimizer steps of that correction per shot (default: "
                         "%(default)s)", bounds=(0, 1_000_000))
    lr: float = setting(1e-4, "its learning rate", bounds=(0.0, 1e3), open_low=True)

    @property
    def active(self) -> bool:
        return self.rank > 0 and self.steps > 0


# Every built-in settings class: the flat fields of PruneConfig and the command line's flags.
# (A plug-in registered at run time takes its settings through llm_surgeon.prune_model.)
BUILTIN_SETTINGS: tuple[type[Settings], ...] = (
    SurgeonSettings, LowRankSettings, SparseGPTSettings, MAIHTSettings, NumericalSettings)


def declared_settings() -> dict[str, Field]:
    """key -> field of every built-in setting, each key once (``percdamp`` is shared)."""
    out: dict[str, Field] = {}
    for cls in BUILTIN_SETTINGS:
        for key, f in cls.declared():
            out.setdefault(key, f)
    return out


def default_of(f: Field) -> Any:
    return None if f.default is MISSING else f.default
