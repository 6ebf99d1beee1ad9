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


@torch.no_grad()
def prune_layer_linears(mine: list[TargetLinear], method: LayerwiseMethod,
                        nm: tuple[int, int] | None, sparsity: float, run_all: Any) -> None:
    """Prune the linears ``mine`` of one decoder layer: ``run_all()`` runs the layer over every
    calibration batch while hooks sum H = XᵀX of each linear's input; then each weight is
    replaced by ``method.prune_linear(W, H, sparsity, nm)`` (``nm``: the structure's N:M
    pattern, None for unstructured)."""
    grams: dict[int, torch.Tensor] = {}  # keyed by module: q/k/v share an input
    handles = []
    for t in mine:
        key = id(t.module)

        def hook(_m: Any, args: tuple, _out: Any, key: int = key) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if key in grams:
                grams[key] += x.T @ x
            else:
                grams[key] = x.T @ x

        handles.append(t.module.register_forward_hook(hook))
    try:
        run_all()
    finally:
        for h in handles:
            h.remove()
    for t in mine:
        W = t.module.weight.detach()
        H = distributed.all_reduce_sum_(grams.pop(id(t.module)))  # torchrun: all ranks' sum
        new = method.prune_linear(W.float(), H.float(), sparsity, nm)
        t.module.weight.copy_(new.to(W.dtype))
