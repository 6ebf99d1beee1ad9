"""Every method by its command-line name, behind the shared interface of ``methods/base.py``."""

from __future__ import annotations

from typing import Any

from llm_surgeon.errors import UserError
from llm_surgeon.methods.obd import K_OBD, L_OBD, MAGNITUDE


def _surgeon() -> Any:
    from llm_surgeon.methods.surgeon import SURGEON

    return SURGEON


# name -> factory (lazy, so importing the registry stays cheap)
GLOBAL_METHODS: dict[str, Any] = {
    "surgeon": _surgeon,
    "k-obd": lambda: K_OBD,
    "l-obd": lambda: L_OBD,
    "magnitude": lambda: MAGNITUDE,
}


def method_names() -> list[str]:
    return list(GLOBAL_METHODS)


def get_method(name: str) -> Any:
    try:
        factory = GLOBAL_METHODS[name]
    except KeyError:
        raise UserError(
            f"unknown --method {name!r} (choose from {', '.join(method_names())})"
        ) from None
    return factory()
