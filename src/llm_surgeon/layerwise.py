"""The pieces of the passes of the methods that work from layer inputs alone (no gradients);
the passes themselves are in :mod:`llm_surgeon.driver` (``layerwise_pass``,
``unit_scoring_pass``), over whatever layer store the run has.

**Layer-wise** (SparseGPT, Wanda, mAIHT): one decoder layer at a time, each on the outputs of the
already-pruned layers before it (as their papers do).

    calibration windows ──► inputs of decoder layer 0 and every layer's keyword arguments
                            (captured by stand-ins for the layers; the model stops at the last)
    for every decoder layer ℓ:
        run ℓ on its inputs with hooks on its linears ──► statistics (H = XᵀX, or diag H)
        prune every linear of ℓ from its statistics (the method's pure math)
        run the pruned ℓ on the same inputs ──► inputs of layer ℓ + 1

Only the hidden states at one layer boundary are kept (``windows × seqlen × hidden`` floats);
no backward pass is needed. Methods plug in through
:class:`~llm_surgeon.methods.base.LayerwiseMethod`.

The unit-scoring pass (Numerical pruning) reuses the input capture but is not layer-wise: its
ranking and compensation are in :mod:`llm_surgeon.methods.unit_scoring`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.curvature.kfac import add_gram_, symmetric_from_upper
from llm_surgeon.methods.base import LayerwiseMethod
from llm_surgeon.models.layouts import TargetLinear, decoder_layers


class _Stop(Exception):
    pass


class LayerKwargs(dict):
    """The keyword arguments the model passes to decoder layer 0, and in ``per_layer[ℓ]`` those
    that differ for layer ℓ (families alternating sliding-window and global attention give
    those layers other masks and rotary tables); read them with :func:`at_layer`."""

    per_layer: list[dict[str, Any]]


def at_layer(kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """The keyword arguments of decoder layer ``index`` (``kwargs`` itself where they equal
    layer 0's)."""
    per_layer = getattr(kwargs, "per_layer", None)
    if not per_layer or index >= len(per_layer) or not per_layer[index]:
        return kwargs
    return {**kwargs, **per_layer[index]}


@torch.no_grad()
def capture_layer_inputs(
    model: Any, windows: torch.Tensor, batch_size: int, progress: bool = False
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Hidden states entering decoder layer 0 and the keyword arguments the model passes to its
    layers (attention mask, rotary embeddings, positions; a :class:`LayerKwargs` when they differ
    between layers), one entry per batch of windows. No layer runs: each is replaced by a
    stand-in that records its arguments and passes the hidden states through."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []
    seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def stand_in(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            seen.append((hidden.detach(), {k: v for k, v in kwargs.items()
                                           if k != "hidden_states"}))
            if index == len(layers) - 1:
                raise _Stop
            return hidden

        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. an accelerate hook's
    for i, layer in enumerate(layers):
        layer.forward = stand_in(i)
    try:
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="layer-0 inputs",
                      leave=False, disable=not progress):
            seen.clear()
            with contextlib.suppress(_Stop):
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            hidden, first = seen[0]
            differ = [{k: v for k, v in kw.items() if k not in first or first[k] is not v}
                      for _, kw in seen]
            if any(differ):
                first = LayerKwargs(first)
                first.per_layer = differ
            captured.append((hidden, first))
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return captured


def add_square_sums_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += Σ_t x_t ⊙ x_t (x: (n, d), acc: (d,)), in place: diag(XᵀX) without the rest of
    the product, all that a method reading only the diagonal needs; returns acc."""
    acc += x.square().sum(0)
    return acc


class StopLayer(Exception):
    """Raised by :func:`prune_layer_linears`' hooks once every linear of the layer has seen its
    input: the rest of that layer forward is not needed (``run_all`` suppresses it per batch)."""


@torch.no_grad()
def prune_layer_linears(mine: list[TargetLinear], method: LayerwiseMethod,
                        nm: tuple[int, int] | None, sparsity: float, run_all: Any) -> None:
    """Prune the linears ``mine`` of one decoder layer: ``run_all()`` runs the layer over every
    calibration batch (suppressing :class:`StopLayer` per batch: the forward stops before the
    last linear, once every input is summed) while hooks sum H = XᵀX of each linear's input
    (each batch's product in float32, or float64 for a float64 model; the sum over batches in
    float64); then each weight is replaced by ``method.prune_linear(W, H, sparsity, nm)``
    (``nm``: the structure's N:M pattern, None for unstructured). A method that declares
    ``diagonal_statistic`` (Wanda) gets diag(H) only, a vector. Linears reading one
    input tensor (q/k/v; gate/up) share the batch's product, computed once (upper block
    triangle, :func:`~llm_surgeon.curvature.kfac.add_gram_`)."""
    diagonal = method.diagonal_statistic
    sums: dict[int, torch.Tensor] = {}  # keyed by module
    # this batch's product of each input seen, keyed by tensor address; the tensor is kept so
    # that no other tensor can reuse the address; dropped when a module runs again (next batch)
    batch: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    called: set[int] = set()
    handles = []
    for t in mine:
        key = id(t.module)

        def hook(_m: Any, args: tuple, key: int = key) -> None:
            if key in called:  # the layer runs its next batch (it did not stop)
                batch.clear()
                called.clear()
            called.add(key)
            x = args[0].detach()
            where = (x.data_ptr(), tuple(x.shape))
            seen = batch.get(where)
            if seen is None or seen[0] is not x:
                rows = x.reshape(-1, x.shape[-1])
                d = rows.shape[1]
                if diagonal:
                    product = add_square_sums_(rows.new_zeros(d, dtype=torch.float64),
                                               rows.double())
                else:  # one batch's product in float32 (fast), summed over batches in float64
                    rows = rows.float() if rows.dtype != torch.float64 else rows
                    product = add_gram_(rows.new_zeros(d, d), rows).double()
                seen = batch[where] = (x, product)
            if key in sums:
                sums[key] += seen[1]
            else:
                sums[key] = seen[1].clone()
            if len(called) == len(mine):  # every input of this batch summed
                batch.clear()
                called.clear()
                raise StopLayer

        handles.append(t.module.register_forward_pre_hook(hook))
    try:
        run_all()
    finally:
        for h in handles:
            h.remove()
        batch.clear()
    for t in mine:
        W = t.module.weight.detach()
        H = distributed.all_reduce_sum_(sums.pop(id(t.module)))  # torchrun: all ranks' sum
        if not diagonal:
            H = symmetric_from_upper(H)
        new = method.prune_linear(W.float(), H.float(), sparsity, nm)
        t.module.weight.copy_(new.to(W.dtype))
