"""Every method by its command-line name: name -> plug-in class (and so its settings class).

The built-ins are imported on first use (importing stays cheap); a plug-in of your own is one
call, from anywhere (a test file, a script), without touching the driver::

    from llm_surgeon.methods.base import GlobalMethod
    from llm_surgeon.methods.registry import register_method

    @register_method
    class Mine(GlobalMethod):
        name = "mine"
        structures = ("unstructured",)
        def element_costs(self, W, curv): return W.square()
        def apply(self, W, curv, removal): return W.masked_fill(removal.mask, 0)

then ``llm_surgeon.prune_model(model, tokenizer, text, method="mine")``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from llm_surgeon.errors import UserError
from llm_surgeon.methods.base import Method
from llm_surgeon.settings import Settings

# name -> (module, class) of the built-ins, imported on first use
_BUILTIN: dict[str, tuple[str, str]] = {
    "surgeon": ("llm_surgeon.methods.surgeon", "SurgeonMethod"),
    "k-obd": ("llm_surgeon.methods.obd", "KOBD"),
    "l-obd": ("llm_surgeon.methods.obd", "LOBD"),
    "magnitude": ("llm_surgeon.methods.obd", "Magnitude"),
    "sparsegpt": ("llm_surgeon.methods.sparsegpt", "SparseGPTMethod"),
    "wanda": ("llm_surgeon.methods.wanda", "WandaMethod"),
    "maiht": ("llm_surgeon.methods.maiht", "MAIHTMethod"),
    "numerical": ("llm_surgeon.methods.numerical", "NumericalMethod"),
}
_REGISTERED: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make the plug-in class ``cls`` known under ``cls.name`` (to ``--method``, the bench and
    :func:`llm_surgeon.prune_model`); usable as a class decorator. It must derive from one of
    the three interfaces of ``methods/base.py``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a GlobalMethod, LayerwiseMethod or UnitScoringMethod")
    _REGISTERED[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return [*_BUILTIN, *(k for k in _REGISTERED if k not in _BUILTIN)]


def method_class(name: str) -> type[Method]:
    """The plug-in class called ``name``."""
    if name not in _REGISTERED:
        if name not in _BUILTIN:
            raise UserError(
                f"unknown --method {name!r} (choose from {', '.join(method_names())})")
        module, attr = _BUILTIN[name]
        register_method(getattr(importlib.import_module(module), attr))
    return _REGISTERED[name]


def settings_class(name: str) -> type[Settings]:
    return method_class(name).Settings


def get_method(name: str, cfg: Any = None, **overrides: Any) -> Method:
    """The method called ``name``, its settings read from ``cfg`` (a PruneConfig, or any flat
    record such as a report's ``settings``) where given, then ``overrides`` (by field name or
    flat key: ``mu`` or ``maiht_mu``)."""
    cls = method_class(name)
    record: Mapping[str, Any] = {}
    if cfg is not None:
        record = cfg if isinstance(cfg, Mapping) else vars(cfg)
    settings = cls.Settings.from_record(record)
    fields: dict[str, Any] = {}
    for key, value in overrides.items():
        field_name = cls.Settings.accepts(key)
        if field_name is None:
            raise UserError(f"method {name!r} has no setting {key!r}")
        fields[field_name] = value
    return cls(settings, **fields)
