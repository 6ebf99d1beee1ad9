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


def _sparsegpt(cfg: Any = None) -> Any:
    from llm_surgeon.methods.sparsegpt import SparseGPTMethod

    if cfg is None:
        return SparseGPTMethod()
    return SparseGPTMethod(blocksize=cfg.blocksize, percdamp=cfg.percdamp)


def _wanda(cfg: Any = None) -> Any:
    from llm_surgeon.methods.wanda import WandaMethod

    return WandaMethod()


def _maiht(cfg: Any = None) -> Any:
    from llm_surgeon.methods.maiht import MAIHTMethod

    if cfg is None:
        return MAIHTMethod()
    return MAIHTMethod(mu=cfg.maiht_mu, iht_iters=cfg.maiht_iht_iters,
                       refine_iters=cfg.maiht_refine_iters, step_scale=cfg.maiht_step)


def _numerical(cfg: Any = None) -> Any:
    from llm_surgeon.methods.numerical import NumericalMethod

    if cfg is None:
        return NumericalMethod()
    return NumericalMethod(percdamp=cfg.percdamp)


# name -> factory taking the run's PruneConfig (or None); lazy, so importing stays cheap.
# Global methods (one threshold over all layers, multi-shot: run.py) and layer-wise ones
# (kind == "layerwise": each layer on the outputs of the pruned layers before it, layerwise.py).
GLOBAL_METHODS: dict[str, Any] = {
    "surgeon": _surgeon,
    "k-obd": lambda cfg=None: K_OBD,
    "l-obd": lambda cfg=None: L_OBD,
    "magnitude": lambda cfg=None: MAGNITUDE,
    "sparsegpt": _sparsegpt,
    "wanda": _wanda,
    "maiht": _maiht,
    "numerical": _numerical,
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
