"""Every method by its command-line name, behind the shared interface of ``methods/base.py``."""

from __future__ import annotations

from typing import Any

from llm_surgeon.errors import UserError
from llm_surgeon.methods.obd import K_OBD, L_OBD, MAGNITUDE


def _surgeon(cfg: Any = None) -> Any:
    from llm_surgeon.methods.surgeon import SurgeonMethod

    if cfg is None:
        return SurgeonMethod()
    return SurgeonMethod(max_correlate=cfg.max_correlate)


# name -> factory taking the run's PruneConfig (or None); lazy, so importing stays cheap
GLOBAL_METHODS: dict[str, Any] = {
    "surgeon": _surgeon,
    "k-obd": lambda cfg=None: K_OBD,
    "l-obd": lambda cfg=None: L_OBD,
    "magnitude": lambda cfg=None: MAGNITUDE,
}


def method_names() -> list[str]:
    return list(GLOBAL_METHODS)


def get_method(name: str, cfg: Any = None) -> Any:
    """The method called ``name``, configured from ``cfg`` (a PruneConfig) where it has knobs."""
    try:
        factory = GLOBAL_METHODS[name]
    except KeyError:
        raise UserError(
            f"unknown --method {name!r} (choose from {', '.join(method_names())})"
        ) from None
    return factory(cfg)
