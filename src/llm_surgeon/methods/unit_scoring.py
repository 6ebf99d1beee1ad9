"""Coupled units scored from activations (Numerical pruning), the parts that are not the
method's math: one forward pass (``driver.unit_scoring_pass``) collects H = XᵀX of every output
projection (o, down); the method scores every unit (KV head group, MLP channel) of every layer;
one ranking over all layers picks the units to remove (:func:`rank_units`), and each output
projection is compensated in closed form for its removed inputs, then every part of the chosen
units is zeroed (:func:`remove_scored_units`). The scores and the compensation themselves are
in :mod:`llm_surgeon.methods.numerical`.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_surgeon.methods import threshold
from llm_surgeon.models.layouts import TargetLinear

__all__ = ["rank_units", "remove_scored_units"]


def rank_units(scores: list[torch.Tensor], groups: list[Any], targets: list[TargetLinear],
               sparsity: float,
               unit_shape: tuple[int | None, bool] = (1, False)) -> list[torch.Tensor]:
    """One ranking of all units by score (lowest first) until ``sparsity`` of the
    decoder-linear weights and biases is gone; per group a bool mask of the chosen units.
    ``unit_shape`` = (channel multiple, uniform): see :func:`~llm_surgeon.methods.threshold.
    select_shaped_units`."""
    total = sum(t.module.weight.numel() + (t.module.bias.numel() if t.has_bias else 0)
                for t in targets)
    n_remove = threshold.target_count(total, sparsity)
    sizes = [g.params_per_unit() for g in groups]
    multiple = threshold.default_channel_multiple(
        [g.count for g in groups if g.kind == "channels"], unit_shape[0])
    uniform = unit_shape[1]
    if multiple == 1 and not uniform:
        return threshold.select_units(scores, sizes, n_remove, per_param=False)
    return threshold.select_shaped_units(scores, sizes, [g.kind for g in groups],
                                         [g.layer for g in groups], n_remove,
                                         channel_multiple=multiple, uniform=uniform,
                                         per_param=False)


@torch.no_grad()
def remove_scored_units(method: Any, group: Any, out: Any, mask: torch.Tensor,
                        H: torch.Tensor) -> None:
    """Compensate the output projection ``out`` for the chosen units' inputs in closed form
    (``method.compensate`` with H = XᵀX of its input), then zero every part of those units."""
    chosen = torch.nonzero(mask).reshape(-1)
    if chosen.numel() == 0:
        return
    lin = out.target.module
    keep = torch.ones(lin.in_features, dtype=torch.bool)
    keep[out.indices(chosen)] = False
    new = method.compensate(lin.weight.detach().float(), H.float(), keep)
    lin.weight.copy_(new.to(lin.weight.dtype))
    group.zero(chosen)
