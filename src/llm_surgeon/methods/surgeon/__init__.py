"""The math of *The LLM Surgeon* (van der Ouderaa et al., ICLR 2024, arXiv:2312.17244).

Pure tensor functions: no hooks, no models, no I/O. Every function works in fp32 and fp64 (half
precision inputs are computed in fp32) on whatever device its inputs live on.

Conventions
-----------
A linear layer's weight ``W`` has shape ``(out, in)`` like :class:`torch.nn.Linear`; when the layer
has a bias the caller appends it as the last column (``W`` is ``(out, in+1)``) and ``A`` includes
the constant-1 input. The curvature of the loss around ``W`` is Kronecker-factored,

    F ≈ G ⊗ A,     A = E[a aᵀ]  (in × in),     G = E[g gᵀ]  (out × out),

so that, with the row-major ``vec``, the loss change of a weight change ``ΔW`` is

    ΔL(ΔW) = ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(ΔWᵀ G ΔW A)

and ``(G ⊗ A)⁻¹ = Ginv ⊗ Ainv`` with ``Ginv = G⁻¹``, ``Ainv = A⁻¹`` (of the *damped* factors: damp
once with :func:`damp`, invert once with :func:`spd_inverse`, and use the same damped ``G``, ``A``
and their inverses everywhere; :func:`kron_factors` does all of it and returns them as one
:class:`~llm_surgeon.curvature.factors.Curvature`).

Removing a set Q of weights (forcing ``(W + ΔW)_q = 0`` for q ∈ Q) with the least loss is the
equality-constrained quadratic

    min_ΔW ½ vec(ΔW)ᵀ (G⊗A) vec(ΔW)   s.t.  ΔW_q = −W_q  (q ∈ Q)

whose KKT solution is, with ``K_qp = Ginv[i_q, i_p] · Ainv[j_q, j_p]`` (the Q×Q block of
``Ginv ⊗ Ainv``) and ``λ = K⁻¹ w_Q``,

    ΔW = −Σ_q λ_q Ginv[:, i_q] Ainv[j_q, :] = −Ginv Λ Ainv,     cost = ½ w_Qᵀ K⁻¹ w_Q,

``Λ`` being the (out × in) matrix holding λ_q at position q and zeros elsewhere.

Where to find what
------------------
* ``linalg.py``: damping and inversion (:func:`damp`, :func:`spd_inverse`, :func:`kron_factors`)
  and the small helpers the others share;
* ``costs.py``: the closed-form costs used to rank candidates: :func:`element_costs`,
  :func:`row_costs`, :func:`column_costs`, :func:`row_group_costs`, :func:`column_group_costs`;
* ``updates.py``: the exact correlated updates: :func:`correlated_update` (a set of single
  weights, dense in |Q|), :func:`structured_update` and :func:`prune_structured` (rows and
  columns together);
* ``solver.py``: :func:`prune_unstructured`, the same KKT system for large Q (unstructured and
  N:M) by preconditioned conjugate gradients with a duality-gap stop and a line-search
  safeguard, or the released code's chunked Gauss-Seidel sweep;
* ``adapter.py``: :class:`SurgeonMethod`, all of the above behind the global-method interface
  the driver calls.

Generic N:M masks and checks are in :mod:`llm_surgeon.methods.nm`. Brute-force oracles the tests
check these closed forms against (the quadratic itself, single-weight updates, the
inclusion-exclusion structured cost, coupled units across layers) are in ``tests/oracles.py``.
"""

from llm_surgeon.curvature.factors import Curvature
from llm_surgeon.methods.surgeon.adapter import SurgeonMethod
from llm_surgeon.methods.surgeon.costs import (
    column_costs,
    column_group_costs,
    element_costs,
    row_costs,
    row_group_costs,
)
from llm_surgeon.methods.surgeon.linalg import damp, kron_factors, spd_inverse
from llm_surgeon.methods.surgeon.solver import PruneResult, prune_unstructured
from llm_surgeon.methods.surgeon.updates import (
    correlated_update,
    prune_structured,
    structured_update,
)

__all__ = [
    "Curvature",
    "PruneResult",
    "SurgeonMethod",
    "column_costs",
    "column_group_costs",
    "correlated_update",
    "damp",
    "element_costs",
    "kron_factors",
    "prune_structured",
    "prune_unstructured",
    "row_costs",
    "row_group_costs",
    "spd_inverse",
    "structured_update",
]
