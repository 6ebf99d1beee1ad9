"""Pruning under a memory budget (``prune --max-memory``): decoder layers streamed from disk.

The model's decoder layers live on disk (:mod:`llm_surgeon.models.offload`); one is in memory at
a time. Hidden states at the layer boundaries go to disk too, one file per layer and batch of
windows. A shot of a global method (surgeon, K-OBD, L-OBD, magnitude) becomes:

    forward sweep     h₀ = embed(x); for ℓ = 0..L−1: load ℓ, h_{ℓ+1} = layer_ℓ(h_ℓ) per batch
    head              loss(head(h_L)) → g_L = ∂loss/∂h_L            (only the head is resident)
    backward sweep    for ℓ = L−1..0: load ℓ, recompute layer_ℓ(h_ℓ) with grad, backward g_{ℓ+1}
                      → g_ℓ; forward hooks on its linears add to A, gradient hooks add to G
    costs             per layer: load ℓ and its factors, costs of every candidate (to disk)
    threshold         one global threshold over all layers' costs, read back one layer at a time
                      (:func:`~llm_surgeon.methods.threshold.streamed_global_masks`)
    updates           per layer: load ℓ, its factors and its removal, update, write ℓ back

This is the same arithmetic as the in-memory run (``run.py``): the same factors up to the order
of floating-point sums, the same costs and threshold, the same updates; a test checks the
pruned weights agree to 1e-5. The layer-wise methods (SparseGPT, Wanda, mAIHT) stream the
usual way: each layer is loaded, pruned on its inputs, run to produce the next layer's inputs,
and written back.

Checkpoints: after every shot the layer files are hard-linked (copied across file systems) into
``DIR/checkpoint/``; ``--resume DIR`` reloads the model, puts them back and continues.

Coupled units (``heads-channels``: the surgeon, the remove-only baselines, Numerical pruning)
stream too: their costs are a few numbers per layer, and the physical shrink at the end runs one
layer at a time (:func:`streamed_shrink`).

Not (yet) streamed: the nearest-Kronecker estimate, the low-rank correction, and torchrun; each
is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.config import PruneConfig
from llm_surgeon.curvature.kfac import FactorCollector, next_token_loss
from llm_surgeon.data.corpora import load_text
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.perplexity import perplexity_from_nll, token_nll
from llm_surgeon.layerwise import (
    at_layer,
    capture_layer_inputs,
    prune_layer_linears,
    rank_units,
    remove_scored_units,
)
from llm_surgeon.methods import threshold
from llm_surgeon.methods.base import Costs, Curvature, Removal, Structure
from llm_surgeon.methods.registry import get_method
from llm_surgeon.models.layouts import TargetLinear, decoder_linears
from llm_surgeon.models.offload import (
    LayerStore,
    load_offloaded,
    parse_memory,
    release_free_memory,
    resident_bytes,
    save_offloaded,
)
from llm_surgeon.models.units import remove_dead_units, unit_groups

Batch = dict[str, Any]  # the keyword arguments the model passes to its decoder layers


class HiddenStates:
    """Tensors at the layer boundaries (hidden states ``h``, gradients ``g``), one file per
    (boundary, batch), so that only one batch of one boundary is in memory at a time."""

    def __init__(self, root: Path, device: str | torch.device = "cpu") -> None:
        self.root = root
        self.device = device
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, kind: str, layer: int, batch: int) -> Path:
        return self.root / f"{kind}{layer:05d}_{batch:05d}.pt"

    def save(self, kind: str, layer: int, batch: int, t: torch.Tensor) -> None:
        torch.save(t.detach().contiguous(), self._path(kind, layer, batch))

    def load(self, kind: str, layer: int, batch: int) -> torch.Tensor:
        return torch.load(self._path(kind, layer, batch), map_location=self.device,
                          weights_only=True)

    def drop(self, kind: str, layer: int, batch: int) -> None:
        self._path(kind, layer, batch).unlink(missing_ok=True)


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def embed(model: nn.Module, windows: torch.Tensor, batch_size: int,
          hs: HiddenStates) -> list[Batch]:
    """h₀ of every batch to disk (the model runs up to decoder layer 0, which stays on disk);
    returns the per-batch keyword arguments the model gives its layers (masks, rotary tables)."""
    kwargs: list[Batch] = []
    for b, start in enumerate(range(0, windows.shape[0], batch_size)):
        ((hidden, kw),) = capture_layer_inputs(model, windows[start:start + batch_size],
                                               batch_size)
        hs.save("h", 0, b, hidden)
        kwargs.append(kw)
    return kwargs


def forward_sweep(store: LayerStore, kwargs: list[Batch], hs: HiddenStates, keep_inputs: bool,
                  collectors: Callable[[int], FactorCollector | None] | None = None,
                  progress: bool = False, desc: str = "forward sweep") -> bool:
    """h_{ℓ+1} = layer_ℓ(h_ℓ) for every layer and batch, one layer in memory; ``collectors(ℓ)``
    may return a collector whose forward hooks watch layer ℓ. Returns whether the layers
    return tuples (the head pass must mimic them)."""
    tuple_out = False
    with torch.no_grad():
        for ell in tqdm(range(len(store)), desc=desc, leave=False, disable=not progress):
            col = collectors(ell) if collectors else None
            if col is not None:
                col.attach()
            try:
                with store.resident(ell) as layer:
                    for b, kw in enumerate(kwargs):
                        if col is not None:
                            col.new_batch()
                        out = layer(hs.load("h", ell, b), **at_layer(kw, ell))
                        tuple_out = isinstance(out, tuple)
                        hs.save("h", ell + 1, b, _layer_out(out))
                        if not keep_inputs:
                            hs.drop("h", ell, b)
            finally:
                if col is not None:
                    col.detach()
    return tuple_out


class _Passthrough(nn.Module):
    """Stands in for a decoder layer during the head pass: returns its input, or ``value``."""

    def __init__(self, like: nn.Module, tuple_out: bool) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None
        self.tuple_out = tuple_out
        for attr in ("attention_type", "layer_idx"):  # read by some models' layer loops
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self.value is None else self.value
        return (out,) if self.tuple_out else out


@contextlib.contextmanager
def head_only(store: LayerStore, tuple_out: bool) -> Iterator[_Passthrough]:
    """The model with every decoder layer replaced by a pass-through; the last one returns the
    tensor put in its ``value``, so ``model(ids).logits`` = head(value): final norm, LM head,
    and whatever else the family applies after the layers, without naming them."""
    layers = store.layers
    original = list(layers)
    stand_ins = [_Passthrough(m, tuple_out) for m in original]
    for i, m in enumerate(stand_ins):
        layers[i] = m
    try:
        yield stand_ins[-1]
    finally:
        for i, m in enumerate(original):
            layers[i] = m


def _batches(windows: torch.Tensor, batch_size: int, device: Any = "cpu") -> list[torch.Tensor]:
    return [windows[s:s + batch_size].to(device)
            for s in range(0, windows.shape[0], batch_size)]


def streamed_kfac(model: nn.Module, store: LayerStore, targets: list[TargetLinear],
                  windows: torch.Tensor, cfg: PruneConfig, seed: int, work: Path,
                  progress: bool, desc: str) -> None:
    """K-FAC factors of every target, written to ``work/curv{ℓ}.pt`` (one file per layer):
    forward sweep keeping the boundaries, the head's gradient, then a backward sweep that
    recomputes each layer from its stored input and carries the gradient down."""
    hs = HiddenStates(work / "states", store.device)
    ids = _batches(windows, cfg.batch_size, store.device)
    kwargs = embed(model, windows, cfg.batch_size, hs)
    tuple_out = forward_sweep(store, kwargs, hs, keep_inputs=True, progress=progress,
                              desc=f"{desc}: forward")
    gen = (torch.Generator(device=store.device).manual_seed(seed)
           if cfg.fisher == "sampled" else None)
    L = len(store)
    with head_only(store, tuple_out) as inject, torch.enable_grad():
        for b, batch in enumerate(ids):
            x = hs.load("h", L, b).requires_grad_(True)
            inject.value = x
            logits = model(input_ids=batch, use_cache=False).logits
            next_token_loss(logits, batch, cfg.fisher, gen).backward()
            del logits
            hs.save("g", L, b, x.grad)
            hs.drop("h", L, b)
        inject.value = None
    by_layer = _by_layer(targets)
    for ell in tqdm(reversed(range(L)), total=L, desc=f"{desc}: backward", leave=False,
                    disable=not progress):
        col = FactorCollector(by_layer.get(ell, []), torch.float32)
        col.attach()
        try:
            with store.resident(ell) as layer, torch.enable_grad():
                for b, kw in enumerate(kwargs):
                    col.new_batch()
                    x = hs.load("h", ell, b).requires_grad_(True)
                    out = _layer_out(layer(x, **at_layer(kw, ell)))
                    out.backward(hs.load("g", ell + 1, b))
                    hs.drop("g", ell + 1, b)
                    hs.drop("h", ell, b)
                    if ell > 0:
                        hs.save("g", ell, b, x.grad)
                    del out, x
        finally:
            col.detach()
        factors = col.factors() if col.targets else {}
        torch.save({k: (f.A, f.G) for k, f in factors.items()}, work / f"curv{ell}.pt")


def streamed_activations(model: nn.Module, store: LayerStore, targets: list[TargetLinear],
                         windows: torch.Tensor, cfg: PruneConfig, work: Path, progress: bool,
                         desc: str) -> None:
    """A = E[ā āᵀ] of every target (L-OBD), one forward sweep, to ``work/curv{ℓ}.pt``."""
    hs = HiddenStates(work / "states", store.device)
    kwargs = embed(model, windows, cfg.batch_size, hs)
    by_layer = _by_layer(targets)
    made: dict[int, FactorCollector] = {}

    def collector(ell: int) -> FactorCollector:
        made[ell] = FactorCollector(by_layer.get(ell, []), torch.float32, want_G=False)
        return made[ell]

    forward_sweep(store, kwargs, hs, keep_inputs=False, collectors=collector,
                  progress=progress, desc=desc)
    for ell, col in made.items():
        A = {t.name: col.inputs[col.input_of[t.name]].second_moment(t.has_bias)
             for t in col.targets}
        torch.save({k: (a, None) for k, a in A.items()}, work / f"curv{ell}.pt")
    for b in range(len(kwargs)):
        hs.drop("h", len(store), b)


def _by_layer(targets: list[TargetLinear]) -> dict[int, list[TargetLinear]]:
    out: dict[int, list[TargetLinear]] = {}
    for t in targets:
        out.setdefault(t.layer_index, []).append(t)
    return out


def _curvature_of(work: Path, ell: int, kind: str, names: list[str],
                  device: Any = "cpu") -> dict[str, Curvature]:
    if kind == "none":
        return {n: Curvature() for n in names}
    saved = torch.load(work / f"curv{ell}.pt", map_location=device, weights_only=True)
    return {n: Curvature(A=saved[n][0], G=saved[n][1]) for n in names}


def streamed_shot(model: nn.Module, store: LayerStore, targets: list[TargetLinear], method: Any,
                  structure: Structure, target_sparsity: float, windows: torch.Tensor,
                  cfg: PruneConfig, shot: int, timer: Any, progress: bool,
                  work: Path) -> dict[str, tuple[int, int]]:
    """One shot of a global method with one layer in memory at a time; returns (zeros, total)
    of every target after the shot."""
    from llm_surgeon.run import (
        _select,
        _test_kill_point,
        allocate_per_layer,
        augmented_weight,
        check_finite,
        layer_sparsity,
        prepare_curvature,
        select_removals,
        write_augmented,
    )

    work.mkdir(parents=True, exist_ok=True)
    kind = method.curvature
    with timer("curvature"):
        if kind == "kfac":
            streamed_kfac(model, store, targets, windows, cfg, cfg.seed + shot, work, progress,
                          f"shot {shot}: curvature G⊗A")
        elif kind == "activations":
            streamed_activations(model, store, targets, windows, cfg, work, progress,
                                 f"shot {shot}: activations A")
    by_layer = _by_layer(targets)
    index = {t.name: i for i, t in enumerate(targets)}
    shapes: dict[str, torch.Size] = {}
    small: dict[str, Costs] = {}  # rows and columns, units: a few numbers per layer, in memory
    units = unit_groups(model, targets) if structure.kind == "heads-channels" else None
    share = {p.target.name: (g, p) for g in units or [] for p in g.parts}

    with timer("costs"):
        for ell in tqdm(range(len(store)), desc=f"shot {shot}: costs", leave=False,
                        disable=not progress):
            mine = by_layer.get(ell, [])
            curv = _curvature_of(work, ell, kind, [t.name for t in mine], store.device)
            check_finite(curv)
            with store.resident(ell):
                for t in mine:
                    W = augmented_weight(t)
                    shapes[t.name] = W.shape
                    prepare_curvature(method, curv[t.name], t, cfg)
                    if units is not None:
                        g, p = share[t.name]
                        small[t.name] = Costs(units=p.unit_costs(
                            method, W, curv[t.name], g.count))
                        curv[t.name] = Curvature()
                        continue
                    c = method.costs(W, curv[t.name], structure)
                    if structure.kind == "rows-columns":
                        small[t.name] = c
                    else:
                        torch.save(c.elements, work / f"cost{index[t.name]}.pt")
                    curv[t.name] = Curvature()
    release_free_memory()
    total = sum(math.prod(s) for s in shapes.values())
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    def element_costs(i: int) -> torch.Tensor:
        return torch.load(work / f"cost{i}.pt", map_location=store.device, weights_only=True)

    removal_of: Callable[[TargetLinear], Removal]
    with timer("threshold"):
        if structure.kind in ("rows-columns", "heads-channels"):
            removals = select_removals(small, targets, meta, structure, target_sparsity, total,
                                       method_allocation=method, units=units,
                                       unit_shape=cfg.unit_shape())
            removal_of = lambda t: removals[t.name]  # noqa: E731
        elif getattr(method, "allocation", "global") == "layer" and len(targets) > 1:
            def pick(t: TargetLinear, want: int) -> int:  # one layer's mask, to disk
                part = _select({t.name: Costs(elements=element_costs(index[t.name]))}, [t],
                               meta, structure, want)[t.name]
                assert part.mask is not None
                torch.save(part.mask, work / f"mask{index[t.name]}.pt")
                return int(part.mask.sum())

            allocate_per_layer(targets, {k: math.prod(v) for k, v in shapes.items()},
                               target_sparsity, pick)
            removal_of = lambda t: Removal(mask=torch.load(  # noqa: E731
                work / f"mask{index[t.name]}.pt", map_location=store.device, weights_only=True))
        else:
            def eligible(i: int) -> torch.Tensor:
                c = element_costs(i)
                if structure.kind == "nm":
                    c = threshold.nm_eligible_costs(c, structure.n, structure.m,
                                                    groupable=targets[i].module.in_features)
                return c

            sel = threshold.streamed_global_masks(
                eligible, len(targets), threshold.target_count(total, target_sparsity))
            removal_of = lambda t: Removal(mask=sel.mask(index[t.name],  # noqa: E731
                                                         eligible(index[t.name])))
    release_free_memory()
    counts: dict[str, tuple[int, int]] = {}
    with timer("update"):
        for ell in tqdm(range(len(store)), desc=f"shot {shot}: updates", leave=False,
                        disable=not progress):
            mine = by_layer.get(ell, [])
            curv = _curvature_of(work, ell, kind, [t.name for t in mine], store.device)
            if ell == len(store) // 2:
                _test_kill_point(shot, "update")  # half the layers updated: mid-shot
            with store.resident(ell, dirty=True):
                for t in mine:
                    W = augmented_weight(t)
                    prepare_curvature(method, curv[t.name], t, cfg)
                    write_augmented(t, method.apply(W, curv[t.name], removal_of(t), structure))
                    curv[t.name] = Curvature()
                if units is not None:  # rows whose downstream column is gone go too
                    remove_dead_units([g for g in units if g.layer == ell])
                for t in mine:
                    counts[t.name] = layer_sparsity(t)
    for f in list(work.glob("cost*.pt")) + list(work.glob("mask*.pt")) + \
            list(work.glob("curv*.pt")):
        f.unlink()
    return counts


def streamed_layerwise(model: nn.Module, store: LayerStore, targets: list[TargetLinear],
                       method: Any, structure: Structure, sparsity: float,
                       windows: torch.Tensor, cfg: PruneConfig, progress: bool,
                       work: Path) -> dict[str, tuple[int, int]]:
    """SparseGPT / Wanda / mAIHT with one layer in memory: load, prune on its inputs, run the
    pruned layer to make the next layer's inputs, write back."""
    from llm_surgeon.run import layer_sparsity

    hs = HiddenStates(work / "states", store.device)
    kwargs = embed(model, windows, cfg.batch_size, hs)
    by_layer = _by_layer(targets)
    counts: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for ell in tqdm(range(len(store)), desc=f"{method.name}: layers",
                        disable=not progress):
            with store.resident(ell, dirty=True) as layer:
                mine = by_layer.get(ell, [])

                def run_all(layer: nn.Module = layer, ell: int = ell) -> None:
                    for b, kw in enumerate(kwargs):
                        layer(hs.load("h", ell, b), **at_layer(kw, ell))

                prune_layer_linears(mine, method, structure, sparsity, run_all)
                for b, kw in enumerate(kwargs):
                    out = layer(hs.load("h", ell, b), **at_layer(kw, ell))
                    hs.save("h", ell + 1, b, _layer_out(out))
                    hs.drop("h", ell, b)
                for t in mine:
                    counts[t.name] = layer_sparsity(t)
    for b in range(len(kwargs)):
        hs.drop("h", len(store), b)
    return counts


@torch.no_grad()
def streamed_unit_scoring(model: nn.Module, store: LayerStore, targets: list[TargetLinear],
                          method: Any, sparsity: float, windows: torch.Tensor, cfg: PruneConfig,
                          progress: bool, work: Path) -> dict[str, tuple[int, int]]:
    """Numerical pruning (:func:`~llm_surgeon.layerwise.run_unit_scoring`) with one layer in
    memory: one forward sweep for H = XᵀX of every output projection, scores layer by layer,
    one ranking over all layers, then compensation and zeroing layer by layer."""
    from llm_surgeon.run import layer_sparsity

    work.mkdir(parents=True, exist_ok=True)
    groups = unit_groups(model, targets)
    outs = [next(p for p in g.parts if p.axis == "cols") for g in groups]
    streamed_activations(model, store, [p.target for p in outs], windows, cfg, work, progress,
                         f"{method.name}: XᵀX")

    def grams(ell: int) -> dict[str, torch.Tensor]:
        saved = torch.load(work / f"curv{ell}.pt", map_location=store.device,
                           weights_only=True)
        out = {}
        for p in outs:
            if p.target.layer_index == ell:
                d = p.target.module.in_features
                out[p.target.name] = saved[p.target.name][0][:d, :d]  # drop the bias input
        return out

    layers = sorted({g.layer for g in groups})
    scores: list[torch.Tensor] = [torch.empty(0)] * len(groups)
    for ell in tqdm(layers, desc=f"{method.name}: scores", leave=False, disable=not progress):
        H = grams(ell)
        with store.resident(ell):
            for k, (g, p) in enumerate(zip(groups, outs, strict=True)):
                if g.layer == ell:
                    scores[k] = method.unit_scores(p.target.module.weight.detach(),
                                                   H[p.target.name], p.width, g.count,
                                                   1.0 - sparsity)
    masks = rank_units(scores, groups, targets, sparsity, cfg.unit_shape())
    counts: dict[str, tuple[int, int]] = {}
    for ell in tqdm(layers, desc=f"{method.name}: compensate", leave=False,
                    disable=not progress):
        H = grams(ell)
        with store.resident(ell, dirty=True):
            for g, p, mask in zip(groups, outs, masks, strict=True):
                if g.layer == ell:
                    remove_scored_units(method, g, p, mask, H[p.target.name])
            for t in targets:
                if t.layer_index == ell:
                    counts[t.name] = layer_sparsity(t)
    return counts


def streamed_shrink(model: nn.Module, store: LayerStore) -> dict[str, Any]:
    """:func:`~llm_surgeon.models.shrink.shrink_model` one layer at a time: each layer's dead
    units leave its module shapes, the smaller layer is written back; the config records every
    layer's sizes. Returns the same summary."""
    from llm_surgeon.models.shrink import _record_sizes, shrink_group

    def n_params() -> int:
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    before = n_params()
    removed = {"heads": 0, "channels": 0}
    for ell in range(len(store)):
        with store.resident(ell, dirty=True):
            for g in unit_groups(model, [t for t in decoder_linears(model)
                                         if t.layer_index == ell]):
                removed[g.kind] += shrink_group(model, g, store.layout)
    sizes = _record_sizes(model, store.layout)
    return {"params_before": before, "params_after": n_params(),
            "kv_groups_removed": removed["heads"], "channels_removed": removed["channels"],
            "layer_sizes": sizes}


@torch.no_grad()
def streamed_perplexity(model: nn.Module, store: LayerStore, windows: torch.Tensor,
                        batch_size: int, work: Path, progress: bool = True,
                        desc: str = "perplexity") -> dict[str, float]:
    """Perplexity (SparseGPT protocol, as :func:`~llm_surgeon.evaluate.perplexity.
    evaluate_perplexity`) with one decoder layer in memory at a time."""
    hs = HiddenStates(work / "eval", store.device)
    kwargs = embed(model, windows, batch_size, hs)
    tuple_out = forward_sweep(store, kwargs, hs, keep_inputs=False, progress=progress,
                              desc=desc)
    total, count = 0.0, 0
    with head_only(store, tuple_out) as inject:
        for b, batch in enumerate(_batches(windows, batch_size, store.device)):
            inject.value = hs.load("h", len(store), b)
            nll = token_nll(model(input_ids=batch, use_cache=False).logits, batch)
            total += float(nll.double().sum())
            count += nll.numel()
            hs.drop("h", len(store), b)
        inject.value = None
    return {"ppl": perplexity_from_nll(total, count), "nll": total / count, "tokens": count,
            "windows": int(windows.shape[0])}


def _model_folder(spec: str) -> Path:
    """A local folder of safetensors for any model spec (downloads a hub id's files)."""
    from llm_surgeon.models.load import ensure_bundled_cache, resolve_model

    kind, path = resolve_model(spec)
    if kind == "bundled":
        return ensure_bundled_cache(spec)
    if kind == "gguf":
        raise UserError("--max-memory streams safetensors checkpoints; convert the .gguf "
                        "first (e.g. `llm-surgeon prune ... --sparsity 0` saves one) or pass "
                        "a Hugging Face folder")
    if kind == "folder":
        assert path is not None
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as exc:
        raise UserError(f"unknown model {spec!r}: could not fetch it from the Hugging Face hub "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None


def _refuse(cfg: PruneConfig, structure: Structure, kind: str) -> None:
    why = None
    if distributed.active():
        why = "under torchrun"
    elif cfg.nearest_kronecker > 0:
        why = "with --nearest-kronecker"
    elif cfg.lowrank_rank > 0 and cfg.lowrank_steps > 0:
        why = "with the low-rank correction"
    if why:
        raise UserError(f"--max-memory is not supported {why} yet; drop --max-memory")


def budget_estimate(model: nn.Module, store: LayerStore, targets: list[TargetLinear]) -> int:
    """Bytes a streamed shot needs besides the runtime (interpreter, torch, math libraries):
    the resident part, one decoder layer twice (loaded and being written), one layer's
    Kronecker factors, and twelve float64 copies of the largest factor (damping, symmetrising,
    Cholesky factor and inverse of one linear at a time). Measured on a random Llama with
    1024-wide factors: the observed peak stays within this estimate."""
    curv, widest = 0, 0
    for mine in _by_layer(targets).values():
        inputs = {(t.module.in_features + int(t.has_bias)) for t in mine}
        outputs = [t.module.out_features for t in mine]
        curv = max(curv, 4 * (sum(d * d for d in inputs) + sum(d * d for d in outputs)))
        widest = max([widest, *inputs, *outputs])
    return resident_bytes(model) + 2 * store.layer_bytes() + curv + 12 * 8 * widest * widest


def prune_streamed(cfg: PruneConfig, progress: bool = True, dense_ppl: float | None = None,
                   _resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`llm_surgeon.run.prune` with the decoder layers streamed from disk under the budget
    ``cfg.max_memory``. Same report, same saved model (sharded safetensors), same checkpoints
    after every shot (the layer files, hard-linked) and ``--resume``."""

    from llm_surgeon.checkpoint import restore_layer_files, save_checkpoint
    from llm_surgeon.evaluate.runner import check_seqlen, eval_windows_for
    from llm_surgeon.io import remove_work_folder, work_folder
    from llm_surgeon.models.load import cache_dir, load_tokenizer, parse_dtype
    from llm_surgeon.run import (
        PhaseTimer,
        _test_kill_point,
        calibration_set,
        check_nm_widths,
        check_output_replaceable,
        layer_report_from_counts,
        report_header,
        shrink_report,
    )

    structure = cfg.validate()
    method = get_method(cfg.method, cfg)
    kind = getattr(method, "kind", "global")
    _refuse(cfg, structure, kind)
    budget = parse_memory(cfg.max_memory or "")
    out_dir = Path(cfg.output) if cfg.output else None
    check_output_replaceable(out_dir, resuming=_resume is not None)
    torch.manual_seed(cfg.seed)
    timer = PhaseTimer()
    calib_text = load_text(cfg.calib_data, "train")
    eval_text = load_text(cfg.eval_data, "test") if cfg.eval else None
    folder = _model_folder(cfg.model)
    root = Path(cfg.offload_dir) if cfg.offload_dir else cache_dir() / "offload"
    work = work_folder(root)  # (removes stale run folders of killed runs first)
    try:
        with timer("load"):
            model, store = load_offloaded(folder, work / "layers", parse_dtype(cfg.dtype),
                                          cfg.device)
            tokenizer = load_tokenizer(str(folder))
        check_seqlen(model, cfg.seqlen)
        targets = decoder_linears(model)
        need = budget_estimate(model, store, targets)
        if need > budget:
            raise UserError(
                f"--max-memory {cfg.max_memory} is below what one streamed layer needs "
                f"(~{need / 2**20:.0f} MiB: embeddings and head {resident_bytes(model) / 2**20:.0f}"
                f" MiB, a decoder layer {store.layer_bytes() / 2**20:.0f} MiB, its curvature); "
                "raise it"
            )
        check_nm_widths(targets, structure)
        windows = calibration_set(tokenizer, calib_text, cfg)

        def evaluate(desc: str) -> float | None:
            if not cfg.eval:
                return None
            with timer("eval"):
                ew = eval_windows_for(tokenizer, cfg.eval_data, cfg.seqlen, cfg.eval_windows,
                                      eval_text)
                return streamed_perplexity(model, store, ew, cfg.batch_size, work,
                                           progress, desc)["ppl"]

        report = report_header(cfg, structure)
        report["streamed"] = {
            "max_memory_bytes": budget,
            "estimated_need_bytes": need,
            "resident_bytes": resident_bytes(model),
            "layer_bytes": store.layer_bytes(),
            "decoder_layers": len(store),
        }
        shots: list[dict[str, Any]] = []
        if _resume is not None:
            assert out_dir is not None
            restore_layer_files(out_dir, store.dir, _resume)
            report.update(_resume["report"])
            shots = list(_resume["shots"])
            for k, v in _resume["phases"].items():
                timer.phases[k] = dict(v)
        else:
            report["ppl_dense"] = (dense_ppl if dense_ppl is not None and cfg.eval
                                   else evaluate("dense perplexity"))
        target = report["sparsity_target"]
        n_shots = 1 if kind in ("layerwise", "units") else cfg.shots
        counts: dict[str, tuple[int, int]] = dict(_resume.get("counts", {})) if _resume else {}
        counts = {k: (int(v[0]), int(v[1])) for k, v in counts.items()}
        start = time.perf_counter() - sum(s["time_s"] for s in shots)
        for shot in tqdm(range(len(shots) + 1, n_shots + 1), initial=len(shots), total=n_shots,
                         desc=f"{cfg.method} shots (streamed)", disable=not progress):
            _test_kill_point(shot, "start")
            t0 = time.perf_counter()
            shot_target = threshold.linear_schedule(shot, n_shots, target)
            if kind == "layerwise":
                with timer("layerwise"):
                    counts = streamed_layerwise(model, store, targets, method, structure,
                                                shot_target, windows, cfg, progress,
                                                work / "shot")
            elif kind == "units":
                with timer("units"):
                    counts = streamed_unit_scoring(model, store, targets, method, shot_target,
                                                   windows, cfg, progress, work / "shot")
            else:
                counts = streamed_shot(model, store, targets, method, structure, shot_target,
                                       windows, cfg, shot, timer, progress, work / "shot")
            zeros = sum(z for z, _ in counts.values())
            entry: dict[str, Any] = {
                "shot": shot, "sparsity_target": shot_target,
                "sparsity_achieved": zeros / sum(n for _, n in counts.values()),
                "time_s": time.perf_counter() - t0,
            }
            if cfg.eval_every_shot and shot < n_shots:
                entry["ppl"] = evaluate(f"shot {shot} perplexity")
            shots.append(entry)
            if out_dir is not None and shot < n_shots:
                save_checkpoint(out_dir, targets, {
                    "settings": asdict(cfg), "shots": shots, "counts": counts,
                    "report": {k: report[k] for k in ("ppl_dense",) if k in report},
                    "phases": timer.phases,
                }, layer_files=[store.path(i) for i in range(len(store))])
        report["prune_time_s"] = time.perf_counter() - start
        report["sparsity_achieved"] = sum(z for z, _ in counts.values()) / sum(
            n for _, n in counts.values())
        report["shots"] = shots
        report["layers"], report["sparsity_by_type"] = layer_report_from_counts(targets, counts)
        if structure.kind == "heads-channels":
            dense_linear = sum(n for _, n in counts.values())
            with timer("shrink"):
                summary = streamed_shrink(model, store)
            targets = decoder_linears(model)
            report["shrink"] = shrink_report(summary, dense_linear, sum(
                t.module.weight.numel() + (t.module.bias.numel() if t.has_bias else 0)
                for t in targets))
        report["ppl"] = evaluate("pruned perplexity")
        if shots and cfg.eval_every_shot:
            shots[-1]["ppl"] = report["ppl"]
        report["phases"] = timer.phases
        report["peak_rss_mb"] = timer.process_peak_mb()
        if out_dir is not None:
            save_offloaded(model, store, tokenizer, out_dir,
                           extra_files={"report.json": json.dumps(report, indent=2) + "\n"})
        report["_model"] = None  # the layers live on disk only; load DIR to use the model
        return report
    finally:
        remove_work_folder(work)

