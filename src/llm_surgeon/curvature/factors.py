"""The one factor type: what a method knows about the loss around one linear layer.

The curvature of the loss around a weight ``W`` (out × in, the bias as its last column) is
Kronecker-factored, ``F ≈ G ⊗ A``, with

    A = E[ā āᵀ]  (in × in, the bias-augmented inputs),   G = E[g gᵀ]  (out × out, output gradients).

K-FAC collection (:mod:`llm_surgeon.curvature.kfac`) fills ``A``, ``G`` and ``count``; a method
that needs the inverses (the surgeon) returns a copy with the *damped* ``A``, ``G`` and their
inverses ``Ainv``, ``Ginv`` (see :func:`llm_surgeon.methods.surgeon.kron_factors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Curvature:
    """Kronecker factors of one layer (or nothing), and optionally their inverses.

    ``A``/``G`` are ``None`` when a method does not use them (identity: magnitude has neither,
    L-OBD and the layer-wise methods only ``A``). ``Ainv``/``Ginv`` are the inverses of the
    damped factors, present only once a method prepared them. ``flat``: a factor is exactly zero
    (no gradient reached the outputs, or every input is zero), so the loss is flat in this
    layer's weights and removing any of them costs nothing. ``count``: the number of tokens the
    means are over (0 when unknown).
    """

    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    Ainv: torch.Tensor | None = None
    Ginv: torch.Tensor | None = None
    flat: bool = False
    count: int = 0
