"""The passes over the layers of a run, each written once over a *layer store*.

The decoder layers live in a *layer store* (:mod:`llm_surgeon.stores`): in memory (the default;
bringing a layer in costs nothing) or on disk, one file per layer (``--max-memory``). A pass
only ever asks the store for layer ℓ, so every pass below is written once and runs the same
arithmetic whatever the store. Hidden states at the layer boundaries go to an *activation
store* (memory, or disk when they would be large), and each shot's per-layer factors, costs and
masks are written per layer to the run's work folder, so that factors, inverses and costs are in
memory for one decoder layer at a time in every mode.

One shot of a global method (surgeon, K-OBD, L-OBD, magnitude), :func:`global_shot`:

    forward sweep     h₀ = embed(x); for ℓ = 0..L−1: h_{ℓ+1} = layer_ℓ(h_ℓ) per batch
    head              loss(head(h_L)) → g_L = ∂loss/∂h_L
    backward sweep    for ℓ = L−1..0: recompute layer_ℓ(h_ℓ) with grad, backward g_{ℓ+1} → g_ℓ;
                      hooks on its linears give A and G (and the nearest-Kronecker iterations)
                      → layer ℓ's factors to the work folder
    costs             per layer: its factors, damped and inverted (kept in the work folder for
                      the updates), → costs of the structure's candidates
    threshold         the structure's selection over all layers' costs (one global threshold,
                      or per layer), read back one layer at a time
    updates           per layer: its inverted factors and removal → updated weights, written back

The layer-wise methods (SparseGPT, Wanda, mAIHT), :func:`layerwise_pass`: each layer pruned on
its inputs, then run to make the next layer's inputs. Numerical pruning,
:func:`unit_scoring_pass`: one forward sweep for XᵀX, scores per layer, one ranking,
compensation per layer. Which pass a method runs is its own choice
(:meth:`llm_surgeon.methods.base.Method.prune_pass` picks from :data:`PASSES`).

Under torchrun every rank takes its share of the windows; factors and Grams are all-reduced per
layer, so every rank takes the same decision.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.config import PruneConfig
from llm_surgeon.curvature.kfac import (
    FactorCollector,
    kfac_sums,
    nearest_kronecker,
    nearest_kronecker_layer,
    next_token_loss,
)
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.perplexity import perplexity_from_nll, token_nll
from llm_surgeon.evaluate.size import peak_rss_mb, reset_peak_rss
from llm_surgeon.layerwise import (
    StopLayer,
    at_layer,
    capture_layer_inputs,
    prune_layer_linears,
)
from llm_surgeon.methods.base import Costs, Curvature, Method, Passes
from llm_surgeon.methods.obd import zero_removed
from llm_surgeon.methods.unit_scoring import rank_units, remove_scored_units
from llm_surgeon.models.layouts import TargetLinear
from llm_surgeon.models.offload import release_free_memory
from llm_surgeon.models.units import unit_groups
from llm_surgeon.stores import (
    DiskStates,
    Layers,
    MemoryStates,
    States,
    WorkFiles,
)
from llm_surgeon.structures import ShotCosts, Structure

Batch = dict[str, Any]  # the keyword arguments the model passes to its decoder layers
OnEvent = Callable[..., None]  # on_event(name, **info): progress points (tests inject kills)

# Boundary states of a whole sweep above this many bytes go to disk even for an in-memory run.
STATES_IN_MEMORY_BYTES = 256 * 2**20


# ---- small helpers ------------------------------------------------------------------------


def augmented_weight(t: TargetLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W with the bias appended as the last column (the bias is pruned with its row)."""
    W = t.module.weight.detach().to(dtype)
    if t.module.bias is None:
        return W.clone()
    return torch.cat([W, t.module.bias.detach().to(dtype)[:, None]], dim=1)


@torch.no_grad()
def write_augmented(t: TargetLinear, W_aug: torch.Tensor) -> None:
    inp = t.module.in_features
    t.module.weight.copy_(W_aug[:, :inp].to(t.module.weight.dtype))
    if t.module.bias is not None:
        t.module.bias.copy_(W_aug[:, inp].to(t.module.bias.dtype))


def layer_sparsity(t: TargetLinear) -> tuple[int, int]:
    """(zeros, total) over the weight and bias of one linear."""
    zeros = total = 0
    for p in (t.module.weight, t.module.bias):
        if p is not None:
            zeros += int((p.detach() == 0).sum())
            total += p.numel()
    return zeros, total


@dataclass
class PhaseTimer:
    """Wall time and peak resident memory per named phase, and the peak of the whole run."""

    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    # Resetting a phase's peak clears the kernel's high-water mark for the whole process (which
    # ``ru_maxrss`` reads too), so the peak so far is folded in here before every reset.
    peak_mb: float = 0.0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.peak_mb = max(self.peak_mb, peak_rss_mb())
        reset_peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            entry = self.phases.setdefault(name, {"time_s": 0.0, "peak_rss_mb": 0.0})
            entry["time_s"] += time.perf_counter() - start
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], peak_rss_mb())
            self.peak_mb = max(self.peak_mb, entry["peak_rss_mb"])

    def process_peak_mb(self) -> float:
        """Peak resident memory of the whole run so far, phases and the time between them."""
        return max(self.peak_mb, peak_rss_mb())


def check_finite(curv: dict[str, Curvature]) -> None:
    """A NaN or Inf in a curvature factor is an error that names the layer."""
    for name, c in curv.items():
        for label, M in (("A", c.A), ("G", c.G)):
            if M is not None and not bool(torch.isfinite(M).all()):
                raise UserError(
                    f"curvature factor {label} of {name} has NaN/Inf values (non-finite "
                    "activations or gradients); check the model's weights, or try more damping "
                    "(--damp-g/--damp-a), more calibration data or --dtype float32"
                )


def prepare_curvature(method: Any, curv: Curvature, t: TargetLinear,
                      inverses: Curvature | None = None) -> Curvature:
    """One layer's curvature as the method prepares it (the surgeon: damped factors and their
    inverses, with its settings' damping; with ``inverses`` kept from the costs pass, only the
    damping is redone); an unusable factor becomes a one-line error naming the layer."""
    try:
        return method.prepared(curv, name=t.name, inverses=inverses)
    except ValueError as exc:
        raise UserError(
            f"curvature of {t.name} is unusable ({exc}); try more "
            "damping (--damp-g/--damp-a) or more calibration data"
        ) from None


def _by_layer(targets: list[TargetLinear]) -> dict[int, list[TargetLinear]]:
    out: dict[int, list[TargetLinear]] = {}
    for t in targets:
        out.setdefault(t.layer_index, []).append(t)
    return out


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# ---- the run's context ----------------------------------------------------------------------


@dataclass
class Run:
    """What every pass needs: the model and its layer store, the targets, the settings."""

    model: nn.Module
    store: Layers
    targets: list[TargetLinear]
    cfg: PruneConfig
    method: Method
    structure: Structure
    work: Path
    timer: PhaseTimer
    progress: bool = False
    on_event: OnEvent | None = None

    def emit(self, name: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, **info)

    @property
    def device(self) -> Any:
        return self.store.device

    def batches(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of ``windows`` (all of them without torchrun), in batches."""
        mine = distributed.shard(windows)
        bs = self.cfg.batch_size
        return [mine[s:s + bs].to(self.device) for s in range(0, mine.shape[0], bs)]

    def states(self, name: str, batches: list[torch.Tensor], boundaries: int) -> States:
        """An activation store for ``boundaries`` layer boundaries of ``batches``: in memory
        when the whole model is and they are small, else on disk."""
        if self.store.all_resident:
            hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
            tokens = sum(b.numel() for b in batches)
            if 4 * tokens * hidden * boundaries <= STATES_IN_MEMORY_BYTES:
                return MemoryStates()
        return DiskStates(self.work / name, self.device)


# ---- sweeps over the layers ---------------------------------------------------------------------


def embed(run: Run, batches: list[torch.Tensor], states: States) -> list[Batch]:
    """h₀ of every batch into ``states`` (the model runs up to decoder layer 0); returns the
    per-batch keyword arguments the model gives its layers (masks, rotary tables)."""
    kwargs: list[Batch] = []
    for b, batch in enumerate(batches):
        ((hidden, kw),) = capture_layer_inputs(run.model, batch, batch.shape[0])
        states.save("h", 0, b, hidden)
        kwargs.append(kw)
    return kwargs


def forward_sweep(run: Run, kwargs: list[Batch], states: States, keep_inputs: bool,
                  collector: Callable[[int], FactorCollector | None] | None = None,
                  done: Callable[[int, FactorCollector], None] | None = None,
                  desc: str = "forward sweep") -> bool:
    """h_{ℓ+1} = layer_ℓ(h_ℓ) for every layer and batch; ``collector(ℓ)`` may give a collector
    whose forward hooks watch layer ℓ, handed to ``done(ℓ, collector)`` after the layer.
    Returns whether the layers return tuples (the head pass must mimic them)."""
    tuple_out = False
    store = run.store
    with torch.no_grad():
        for ell in tqdm(range(len(store)), desc=desc, leave=False, disable=not run.progress):
            col = collector(ell) if collector else None
            if col is not None:
                col.attach()
            try:
                with store.resident(ell) as layer:
                    for b, kw in enumerate(kwargs):
                        if col is not None:
                            col.new_batch()
                        out = layer(states.load("h", ell, b), **at_layer(kw, ell))
                        tuple_out = isinstance(out, tuple)
                        states.save("h", ell + 1, b, _layer_out(out))
                        if not keep_inputs:
                            states.drop("h", ell, b)
                        del out
            finally:
                if col is not None:
                    col.detach()
            if col is not None and done is not None:
                done(ell, col)
            del col
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
def head_only(store: Layers, tuple_out: bool) -> Iterator[_Passthrough]:
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


def kfac_sweep(run: Run, windows: torch.Tensor, seed: int, desc: str,
               collect: bool = True, targets: list[TargetLinear] | None = None) -> None:
    """K-FAC factors of every target (of ``targets`` when given), written per layer to the
    work folder (``curv{ℓ}``): a forward sweep keeping the boundaries, the head's gradient,
    then a backward sweep that recomputes each layer from its stored input and carries the
    gradient down; hooks on the layer's linears sum A and G, all-reduced under torchrun. With
    ``--nearest-kronecker`` the power iterations run on the same layer while its inputs and
    output gradients are at hand. ``collect=False``: the same sweeps without statistics (the
    plain pass's yardstick)."""
    cfg, store = run.cfg, run.store
    batches = run.batches(windows)
    L = len(store)
    states = run.states("states", batches, L + 1)
    grads = run.states("grads", batches, 2)  # the output gradients of one layer, then the next
    kwargs = embed(run, batches, states)
    tuple_out = forward_sweep(run, kwargs, states, keep_inputs=True, desc=f"{desc}: forward")
    seed = seed + 7919 * distributed.rank()
    gen = (torch.Generator(device=run.device).manual_seed(seed)
           if cfg.fisher == "sampled" else None)
    with head_only(store, tuple_out) as inject, torch.enable_grad():
        for b, batch in enumerate(batches):
            x = states.load("h", L, b).detach().requires_grad_(True)
            inject.value = x
            logits = run.model(input_ids=batch, use_cache=False).logits
            next_token_loss(logits, batch, cfg.fisher, gen).backward()
            del logits
            grads.save("g", L, b, x.grad)
            states.drop("h", L, b)
        inject.value = None
    n_windows = int(windows.shape[0])
    by_layer = _by_layer(run.targets if targets is None else targets)
    for ell in tqdm(reversed(range(L)), total=L, desc=f"{desc}: backward", leave=False,
                    disable=not run.progress):
        col = FactorCollector(by_layer.get(ell, []) if collect else [], torch.float32)
        col.attach()
        try:
            with store.resident(ell) as layer, torch.enable_grad():
                for b, kw in enumerate(kwargs):
                    col.new_batch()
                    x = states.load("h", ell, b).detach().requires_grad_(True)
                    out = _layer_out(layer(x, **at_layer(kw, ell)))
                    out.backward(grads.load("g", ell + 1, b))
                    if ell > 0:
                        grads.save("g", ell, b, x.grad)
                    del out, x
        finally:
            col.detach()
        if col.targets:
            col.all_reduce()
            factors = {k: (f.A, f.G) for k, f in col.factors().items()}
            if cfg.nearest_kronecker > 0:
                with store.resident(ell) as layer:
                    factors = nearest_kronecker_layer(
                        layer, col.targets, factors, cfg.nearest_kronecker, n_windows,
                        lambda layer=layer, ell=ell: _recompute(layer, ell, kwargs, states,
                                                                grads))
            run.emit("factors", layer=ell, tensors=[m for f in factors.values() for m in f])
            check_finite({k: Curvature(A=a, G=g) for k, (a, g) in factors.items()})
            WorkFiles(run.work / "shot", run.device).put(f"curv{ell}", factors)
            del factors
        del col
        for b in range(len(kwargs)):
            grads.drop("g", ell + 1, b)
            states.drop("h", ell, b)


def kfac_hooks(run: Run, windows: torch.Tensor, seed: int, desc: str,
               targets: list[TargetLinear] | None = None) -> None:
    """The other strategy, for a model wholly in memory (``--curvature-pass hooks``): hooks
    over one ordinary forward and
    backward of the whole model per batch (no recomputed forward, but every layer's running
    sums at once, packed), then the same per-layer factor files as
    :func:`kfac_sweep`, turned one layer at a time (each layer's sums released as it is
    written). Nearest-Kronecker iterations: whole-model passes
    (:func:`~llm_surgeon.curvature.kfac.nearest_kronecker`), every layer's factors at once."""
    cfg = run.cfg
    targets = run.targets if targets is None else targets
    col = kfac_sums(run.model, targets, windows, fisher=cfg.fisher,
                    batch_size=cfg.batch_size, seed=seed, progress=run.progress, desc=desc)
    factors = None
    if cfg.nearest_kronecker > 0:
        factors = nearest_kronecker(run.model, targets, windows, col.factors(release=True),
                                    cfg.nearest_kronecker, fisher=cfg.fisher, seed=seed,
                                    progress=run.progress)
    work = WorkFiles(run.work / "shot", run.device)
    for ell, mine in sorted(_by_layer(targets).items()):
        turned = (col.factors(mine, release=True) if factors is None
                  else {t.name: factors.pop(t.name) for t in mine})
        layer = {k: (f.A, f.G) for k, f in turned.items()}
        del turned
        run.emit("factors", layer=ell, tensors=[m for f in layer.values() for m in f])
        check_finite({k: Curvature(A=a, G=g) for k, (a, g) in layer.items()})
        work.put(f"curv{ell}", layer)
        del layer


def _recompute(layer: nn.Module, ell: int, kwargs: list[Batch], states: States,
               grads: States) -> Iterator[None]:
    """Run layer ℓ forward and backward once per batch from its stored input (``states``) and
    output gradient (``grads``); hooks on its linears see the inputs and output gradients."""
    with torch.enable_grad():
        for b, kw in enumerate(kwargs):
            x = states.load("h", ell, b).detach().requires_grad_(True)
            out = _layer_out(layer(x, **at_layer(kw, ell)))
            out.backward(grads.load("g", ell + 1, b))
            del out, x
            yield None


def activation_sweep(run: Run, targets: list[TargetLinear], windows: torch.Tensor,
                     desc: str) -> None:
    """A = E[ā āᵀ] of every target (L-OBD; XᵀX of Numerical pruning), one forward sweep,
    written per layer (``curv{ℓ}``) as soon as the layer is done."""
    batches = run.batches(windows)
    states = run.states("states", batches, 2)
    kwargs = embed(run, batches, states)
    by_layer = _by_layer(targets)
    work = WorkFiles(run.work / "shot", run.device)

    def collector(ell: int) -> FactorCollector | None:
        mine = by_layer.get(ell)
        return FactorCollector(mine, torch.float32, want_G=False) if mine else None

    def done(ell: int, col: FactorCollector) -> None:
        col.all_reduce()
        A = {t.name: (col.inputs[col.input_of[t.name]].second_moment(t.has_bias), None)
             for t in col.targets}
        run.emit("factors", layer=ell, tensors=[a for a, _ in A.values()])
        work.put(f"curv{ell}", A)

    forward_sweep(run, kwargs, states, keep_inputs=False, collector=collector, done=done,
                  desc=desc)
    for b in range(len(kwargs)):
        states.drop("h", len(run.store), b)


def kfac_pass(run: Run, windows: torch.Tensor, shot: int, targets: list[TargetLinear]
              ) -> None:
    """K-FAC factors of ``targets`` for shot ``shot``, by ``--curvature-pass``."""
    collect = kfac_hooks if run.cfg.curvature_pass == "hooks" else kfac_sweep
    collect(run, windows, run.cfg.seed + shot, f"shot {shot}: curvature G⊗A", targets=targets)


def activations_pass(run: Run, windows: torch.Tensor, shot: int, targets: list[TargetLinear]
                     ) -> None:
    """A = E[ā āᵀ] of ``targets`` for shot ``shot`` (one forward sweep)."""
    activation_sweep(run, targets, windows, f"shot {shot}: activations A")


# a global method's ``curvature`` -> the pass that writes the per-layer factors of the targets it
# is given (None: none)
CURVATURE_PASSES: dict[str, Callable[[Run, torch.Tensor, int, list[TargetLinear]], None] | None] = {
    "none": None,
    "activations": activations_pass,
    "kfac": kfac_pass,
}


def _curvature_of(run: Run, ell: int, names: list[str]) -> dict[str, Curvature]:
    if CURVATURE_PASSES[run.method.curvature] is None or not names:
        return {n: Curvature() for n in names}
    saved = WorkFiles(run.work / "shot", run.device).get(f"curv{ell}")
    run.emit("factors", layer=ell,
             tensors=[m for n in names for m in saved[n] if m is not None])
    return {n: Curvature(A=saved[n][0], G=saved[n][1]) for n in names}


def _prepared_of(run: Run, ell: int, targets: list[TargetLinear]) -> dict[str, Curvature]:
    """Layer ℓ's curvature as the costs pass prepared it: its raw factors (``curv{ℓ}``) made
    again into the method's damped ones, with the inverses that pass kept (``prep{ℓ}``)."""
    if not targets:
        return {}
    raw = _curvature_of(run, ell, [t.name for t in targets])
    saved = WorkFiles(run.work / "shot", run.device).get(f"prep{ell}")
    run.emit("factors", layer=ell,
             tensors=[m for t in targets for m in saved[t.name][:2] if m is not None])
    return {t.name: prepare_curvature(run.method, raw.pop(t.name), t,
                                      Curvature(Ainv=saved[t.name][0], Ginv=saved[t.name][1],
                                                flat=bool(saved[t.name][2])))
            for t in targets}


# ---- the passes of a shot -------------------------------------------------------------------


def _takes_options(structure: Any) -> bool:
    """Whether ``structure.shot_state`` accepts the run's unit options (a third argument)."""
    import inspect

    params = inspect.signature(structure.shot_state).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3 or \
        any(p.kind == p.VAR_POSITIONAL for p in params)


def global_shot(run: Run, target_sparsity: float, windows: torch.Tensor, shot: int
                ) -> dict[str, tuple[int, int]]:
    """One shot of a global method with one layer's work in memory at a time; returns
    (zeros, total) of every target after the shot."""
    model, store, targets, method, structure, cfg, timer = (
        run.model, run.store, run.targets, run.method, run.structure, run.cfg, run.timer)
    work = WorkFiles(run.work / "shot", run.device)
    options = cfg.unit_options()
    # a structure that takes no unit options (e.g. a plug-in's two-argument shot_state) gets none
    state = (structure.shot_state(model, targets, options) if _takes_options(structure)
             else structure.shot_state(model, targets))
    # the targets whose curvature the structure reads (all but e.g. the producers of a unit
    # costed by its consumer alone): the others get no statistics, no inverses, no update
    needs = {t.name for t in targets if structure.needs_curvature(t, state)}
    collect = CURVATURE_PASSES[method.curvature]
    with timer("curvature"):
        if collect is not None:
            collect(run, windows, shot, [t for t in targets if t.name in needs])
    by_layer = _by_layer(targets)
    index = {t.name: i for i, t in enumerate(targets)}
    shapes: dict[str, torch.Size] = {}
    small: dict[str, Costs] = {}  # rows and columns, units: a few numbers per layer, in memory

    with timer("costs"):
        for ell in tqdm(range(len(store)), desc=f"shot {shot}: costs", leave=False,
                        disable=not run.progress):
            mine = by_layer.get(ell, [])
            curv = {t.name: Curvature() for t in mine}
            curv.update(_curvature_of(run, ell, [t.name for t in mine if t.name in needs]))
            prepared: dict[str, tuple] = {}
            with store.resident(ell):
                for t in mine:
                    W = augmented_weight(t)
                    shapes[t.name] = W.shape
                    if method.prepares and t.name in needs:
                        # damped factors and their inverses, once; the inverses are kept for
                        # the updates (the damping is redone there from the raw factors)
                        c = curv[t.name] = prepare_curvature(method, curv[t.name], t)
                        prepared[t.name] = (c.Ainv, c.Ginv, c.flat)
                    c = structure.costs(method, W, curv[t.name], t, state)
                    if structure.small_costs:
                        small[t.name] = c
                    else:
                        work.put(f"cost{index[t.name]}", c.elements)
                    del c
                    curv[t.name] = Curvature()
                    del W
            if prepared:
                work.put(f"prep{ell}", prepared)
            del curv, prepared
    release_free_memory()

    with timer("threshold"):
        removal_of = structure.select(
            ShotCosts(targets, shapes, small, elements=lambda i: work.get(f"cost{i}"),
                      keep=lambda name, mask: work.put(f"mask{index[name]}", mask),
                      kept=lambda name: work.get(f"mask{index[name]}"), state=state),
            target_sparsity, method.allocation, cfg.unit_shape())
    release_free_memory()
    counts: dict[str, tuple[int, int]] = {}
    with timer("update"):
        for ell in tqdm(range(len(store)), desc=f"shot {shot}: updates", leave=False,
                        disable=not run.progress):
            run.emit("update", shot=shot, layer=ell, layers=len(store))
            mine = by_layer.get(ell, [])
            needed = [t for t in mine if t.name in needs]
            curv = (_prepared_of(run, ell, needed) if method.prepares
                    else _curvature_of(run, ell, [t.name for t in needed]))
            with store.resident(ell, dirty=True):
                for t in mine:
                    W = augmented_weight(t)
                    removal = removal_of(t)
                    assert t.name in needs or not removal.update, t.name
                    write_augmented(t, method.apply(W, curv[t.name], removal) if removal.update
                                    else zero_removed(W, removal))
                    curv[t.name] = Curvature()
                    del W
                structure.after_update(state, ell)
                for t in mine:
                    counts[t.name] = layer_sparsity(t)
            del curv
    work.clear()
    return counts


def layerwise_pass(run: Run, sparsity: float, windows: torch.Tensor
                   ) -> dict[str, tuple[int, int]]:
    """SparseGPT / Wanda / mAIHT: each layer pruned on its inputs (H = XᵀX summed over the
    batches, all-reduced under torchrun), then run to make the next layer's inputs."""
    batches = run.batches(windows)
    states = run.states("states", batches, 2)
    kwargs = embed(run, batches, states)
    by_layer = _by_layer(run.targets)
    counts: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for ell in tqdm(range(len(run.store)), desc=f"{run.method.name}: layers",
                        disable=not run.progress):
            with run.store.resident(ell, dirty=True) as layer:
                mine = by_layer.get(ell, [])

                def run_all(layer: nn.Module = layer, ell: int = ell) -> None:
                    for b, kw in enumerate(kwargs):
                        with contextlib.suppress(StopLayer):  # every input seen: stop early
                            layer(states.load("h", ell, b), **at_layer(kw, ell))

                prune_layer_linears(mine, run.method, run.structure.nm, sparsity, run_all)
                for b, kw in enumerate(kwargs):
                    out = layer(states.load("h", ell, b), **at_layer(kw, ell))
                    states.save("h", ell + 1, b, _layer_out(out))
                    states.drop("h", ell, b)
                for t in mine:
                    counts[t.name] = layer_sparsity(t)
    for b in range(len(kwargs)):
        states.drop("h", len(run.store), b)
    return counts


@torch.no_grad()
def unit_scoring_pass(run: Run, sparsity: float, windows: torch.Tensor
                      ) -> dict[str, tuple[int, int]]:
    """Numerical pruning: one forward sweep for H = XᵀX of every output projection, scores
    layer by layer, one ranking over all layers, then compensation and zeroing layer by
    layer."""
    method, store, targets = run.method, run.store, run.targets
    work = WorkFiles(run.work / "shot", run.device)
    groups = unit_groups(run.model, targets)
    outs = [next(p for p in g.parts if p.axis == "cols") for g in groups]
    activation_sweep(run, [p.target for p in outs], windows, f"{method.name}: XᵀX")

    def grams(ell: int) -> dict[str, torch.Tensor]:
        saved = work.get(f"curv{ell}")
        out = {}
        for p in outs:
            if p.target.layer_index == ell:
                d = p.target.module.in_features
                out[p.target.name] = saved[p.target.name][0][:d, :d]  # drop the bias input
        return out

    layers = sorted({g.layer for g in groups})
    scores: list[torch.Tensor] = [torch.empty(0)] * len(groups)
    for ell in tqdm(layers, desc=f"{method.name}: scores", leave=False,
                    disable=not run.progress):
        H = grams(ell)
        with store.resident(ell):
            for k, (g, p) in enumerate(zip(groups, outs, strict=True)):
                if g.layer == ell:
                    scores[k] = method.unit_scores(p.target.module.weight.detach(),
                                                   H[p.target.name], p.width, g.count,
                                                   1.0 - sparsity)
    masks = rank_units(scores, groups, targets, sparsity, run.cfg.unit_shape())
    counts: dict[str, tuple[int, int]] = {}
    for ell in tqdm(range(len(store)), desc=f"{method.name}: compensate", leave=False,
                    disable=not run.progress):
        H = grams(ell) if ell in layers else {}
        with store.resident(ell, dirty=True):
            for g, p, mask in zip(groups, outs, masks, strict=True):
                if g.layer == ell:
                    remove_scored_units(method, g, p, mask, H[p.target.name])
            for t in targets:
                if t.layer_index == ell:
                    counts[t.name] = layer_sparsity(t)
    work.clear()
    return counts


def count_zeros(run: Run) -> dict[str, tuple[int, int]]:
    """(zeros, total) of every target, one layer at a time."""
    counts: dict[str, tuple[int, int]] = {}
    by_layer = _by_layer(run.targets)
    for ell in range(len(run.store)):
        with run.store.resident(ell):
            for t in by_layer.get(ell, []):
                counts[t.name] = layer_sparsity(t)
    return counts


@torch.no_grad()
def sync_weights(run: Run) -> None:
    """Under torchrun, give every rank rank 0's decoder weights (a no-op otherwise)."""
    if not distributed.active():
        return
    by_layer = _by_layer(run.targets)
    for ell in range(len(run.store)):
        with run.store.resident(ell, dirty=True):
            for t in by_layer.get(ell, []):
                distributed.broadcast_(t.module.weight.data)
                if t.module.bias is not None:
                    distributed.broadcast_(t.module.bias.data)


@torch.no_grad()
def perplexity(run: Run, windows: torch.Tensor, desc: str = "perplexity") -> dict[str, float]:
    """Perplexity (SparseGPT protocol: mean next-token NLL over every predicted token of the
    evaluation windows, exponentiated), one decoder layer at a time; under torchrun each rank
    takes its share and the sums are all-reduced."""
    batches = run.batches(windows)
    states = run.states("eval", batches, 2)
    kwargs = embed(run, batches, states)
    tuple_out = forward_sweep(run, kwargs, states, keep_inputs=False, desc=desc)
    total, count = 0.0, 0
    L = len(run.store)
    with head_only(run.store, tuple_out) as inject:
        for b, batch in enumerate(batches):
            inject.value = states.load("h", L, b)
            nll = token_nll(run.model(input_ids=batch, use_cache=False).logits, batch)
            total += float(nll.double().sum())
            count += nll.numel()
            states.drop("h", L, b)
        inject.value = None
    if distributed.active():
        sums = distributed.all_reduce_sum_(torch.tensor([total, float(count)],
                                                        dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    return {"ppl": perplexity_from_nll(total, count), "nll": total / count, "tokens": count,
            "windows": int(windows.shape[0])}


def plain_pass_time(run: Run, windows: torch.Tensor) -> float:
    """Seconds of one ordinary forward + backward pass over the calibration windows: the
    yardstick of a shot's cost. With every layer resident, ``loss.backward()`` with parameter
    gradients; with layers on disk, the same forward and recomputing backward sweeps as the
    curvature's, without statistics."""
    start = time.perf_counter()
    if not run.store.all_resident:
        kfac_sweep(run, windows, run.cfg.seed, "plain forward+backward", collect=False)
        return time.perf_counter() - start
    model = run.model
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in flags:
            p.grad = None  # the caller's gradients are put back below
            p.requires_grad_(True)
        for batch in tqdm(run.batches(windows), desc="plain forward+backward", leave=False,
                          disable=not run.progress):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        elapsed = time.perf_counter() - start
    finally:
        for p, flag, grad in flags:
            p.grad = grad
            p.requires_grad_(flag)
    return elapsed


# what a method's ``prune_pass`` picks from (each interface of methods/base.py names its own)
PASSES = Passes(global_shot=global_shot, layerwise_pass=layerwise_pass,
                unit_scoring_pass=unit_scoring_pass)
