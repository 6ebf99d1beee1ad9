"""LLM Surgeon behind the global-method interface of :mod:`llm_surgeon.methods.base`: what the
multi-shot driver calls (prepare the factors, costs, unit costs, apply the update)."""

from __future__ import annotations

import dataclasses

import torch

from llm_surgeon.curvature.factors import Curvature
from llm_surgeon.methods.base import GlobalMethod
from llm_surgeon.methods.surgeon.costs import (
    column_costs,
    column_group_costs,
    element_costs,
    nm_group_subset_costs,
    row_costs,
    row_group_costs,
)
from llm_surgeon.methods.surgeon.linalg import Tensor, damp, kron_factors
from llm_surgeon.methods.surgeon.solver import prune_unstructured
from llm_surgeon.methods.surgeon.updates import prune_structured
from llm_surgeon.settings import SurgeonSettings

__all__ = ["SurgeonMethod"]


class SurgeonMethod(GlobalMethod):
    """LLM Surgeon behind the global-method interface.

    ``prepared`` damps both Kronecker factors (relative to their mean diagonals; the settings'
    ``damp_g``, ``damp_a``) and inverts them once per layer per shot, returning a new
    :class:`Curvature`; ``element_costs``/``line_costs`` are the closed-form removal costs
    (elements, or rows and columns); ``apply`` performs the correlated update of the remaining
    weights for everything the global threshold selected (which always includes what earlier
    shots removed, so it stays 0).
    """

    name = "surgeon"
    curvature = "kfac"
    updates = True
    prepares = True
    structures = ("unstructured", "nm", "rows-columns", "heads-channels")
    Settings = SurgeonSettings

    def __init__(self, settings: SurgeonSettings | None = None, *, rtol_loss: float = 1e-3,
                 compute_dtype: torch.dtype = torch.float32, **overrides) -> None:
        super().__init__(settings, **overrides)
        self.rtol_loss = rtol_loss
        self.compute_dtype = compute_dtype
        self.max_correlate = self.settings.max_correlate

    def prepared(self, curv: Curvature, damp_g: float | None = None,
                 damp_a: float | None = None, name: str = "layer",
                 inverses: Curvature | None = None) -> Curvature:
        """A new :class:`Curvature` with the damped ``G``, ``A`` and their inverses in
        ``compute_dtype`` (``curv`` is left as it is; damping from the settings unless given).
        A dead layer (a factor exactly zero) comes back ``flat`` with its factors undamped and
        no inverses. ``inverses``: the ``Ainv``, ``Ginv`` and ``flat`` of an earlier call on the
        same factors; only the damping is redone (bitwise the same damped factors)."""
        damp_g = self.settings.damp_g if damp_g is None else damp_g
        damp_a = self.settings.damp_a if damp_a is None else damp_a
        if curv.G is None or curv.A is None:
            raise ValueError(f"{name}: the surgeon needs Kronecker factors G and A")
        dt = self.compute_dtype
        if inverses is not None:
            if inverses.flat:
                return dataclasses.replace(curv, flat=True)
            return dataclasses.replace(curv, A=damp(curv.A.double(), damp_a).to(dt),
                                       G=damp(curv.G.double(), damp_g).to(dt),
                                       Ainv=inverses.Ainv, Ginv=inverses.Ginv)
        if all(bool(torch.isfinite(M).all()) for M in (curv.G, curv.A)) and any(
                float(torch.diagonal(M).abs().sum()) == 0.0 for M in (curv.G, curv.A)):
            # a dead layer (every output row or input column removed, or gradients that
            # underflow to exactly zero): F = G ⊗ A = 0, every removal costs 0, no update
            return dataclasses.replace(curv, flat=True)
        f = kron_factors(curv.G.double(), curv.A.double(), rel_damp_g=damp_g,
                         rel_damp_a=damp_a, name=name)
        return dataclasses.replace(curv, A=f.A.to(dt), G=f.G.to(dt), Ainv=f.Ainv.to(dt),
                                   Ginv=f.Ginv.to(dt))

    def element_costs(self, W: Tensor, curv: Curvature) -> Tensor:
        W = W.to(self.compute_dtype)
        if curv.flat:
            return torch.zeros_like(W)
        return element_costs(W, curv.Ginv, curv.Ainv)

    def nm_element_costs(self, W: Tensor, curv: Curvature, n: int, m: int,
                         groupable: int) -> Tensor:
        """``nm_cost="independent"``: :meth:`element_costs` (each group loses its M−N cheapest
        single weights). ``"joint"``: each group's M−N chosen among all C(M, M−N) sets by
        their exact OBS cost together (:func:`~.costs.nm_group_subset_costs`), in the form
        :func:`~llm_surgeon.methods.threshold.nm_chosen_costs`."""
        if self.settings.nm_cost == "independent" or curv.flat:
            return self.element_costs(W, curv)
        from llm_surgeon.methods.threshold import nm_chosen_costs

        W = W.to(self.compute_dtype)
        cost, chosen = nm_group_subset_costs(W, curv.Ginv, curv.Ainv, n, m,
                                             n_groupable_cols=groupable)
        return nm_chosen_costs(cost.to(W.dtype), chosen, n, m)

    def line_costs(self, W: Tensor, curv: Curvature) -> tuple[Tensor, Tensor]:
        W = W.to(self.compute_dtype)
        if curv.flat:
            return W.new_zeros(W.shape[0]), W.new_zeros(W.shape[1])
        return row_costs(W, curv.A, curv.Ginv), column_costs(W, curv.G, curv.Ainv)

    def unit_costs(self, W: Tensor, curv: Curvature, axis: str, width: int, count: int) -> Tensor:
        """Cost of this layer's share of each of ``count`` coupled units (blocks of ``width``
        rows, or columns among the first ``count · width``; a bias column is never a unit's)."""
        W = W.to(self.compute_dtype)
        if curv.flat:
            return W.new_zeros(count)
        idx = torch.arange(count * width, device=W.device).view(count, width)
        if axis == "rows":
            return row_group_costs(W, curv.A, curv.Ginv, idx)
        return column_group_costs(W, curv.G, curv.Ainv, idx)

    def apply(self, W: Tensor, curv: Curvature, removal) -> Tensor:
        W = W.to(self.compute_dtype)
        if curv.flat:
            from llm_surgeon.methods.obd import zero_removed

            return zero_removed(W, removal)
        if removal.mask is not None:
            return prune_unstructured(W, curv.G, curv.A, removal.mask, Ginv=curv.Ginv,
                                      Ainv=curv.Ainv, rtol_loss=self.rtol_loss,
                                      max_correlate=self.max_correlate).weight
        new, _ = prune_structured(W, curv.G, curv.A, curv.Ginv, curv.Ainv, removal.rows,
                                  removal.cols)
        return new
