"""The one multi-shot driver: schedule, shots, checkpoints/resume, progress, report.

The decoder layers live in a *layer store* (:mod:`llm_surgeon.stores`): in memory (the default;
bringing a layer in costs nothing) or on disk, one file per layer (``--max-memory``). The driver
only ever asks the store for layer ℓ, so every pass below is written once and runs the same
arithmetic whatever the store. Hidden states at the layer boundaries go to an *activation
store* (memory, or disk when they would be large), and each shot's per-layer factors, costs and
masks are written per layer to the run's work folder, so that factors, inverses and costs are in
memory for one decoder layer at a time in every mode.

One shot of a global method (surgeon, K-OBD, L-OBD, magnitude):

    forward sweep     h₀ = embed(x); for ℓ = 0..L−1: h_{ℓ+1} = layer_ℓ(h_ℓ) per batch
    head              loss(head(h_L)) → g_L = ∂loss/∂h_L
    backward sweep    for ℓ = L−1..0: recompute layer_ℓ(h_ℓ) with grad, backward g_{ℓ+1} → g_ℓ;
                      hooks on its linears give A and G (and the nearest-Kronecker iterations)
                      → layer ℓ's factors to the work folder
    costs             per layer: its factors, damped and inverted (kept in the work folder for
                      the updates), → costs of every candidate
    threshold         one global threshold over all layers' costs, read back one layer at a time
    updates           per layer: its inverted factors and removal → updated weights, written back

Shot t of T reaches the target t·α/T (linear schedule); what was removed stays removed.
The layer-wise methods (SparseGPT, Wanda, mAIHT) run one pass: each layer pruned on its inputs,
then run to make the next layer's inputs. Numerical pruning: one forward sweep for XᵀX, scores
per layer, one ranking, compensation per layer. Then one shrink (heads-channels), one
perplexity, one save and one report.

Under torchrun every rank takes its share of the windows; factors and Grams are all-reduced per
layer, so every rank takes the same decision; rank 0's weights are broadcast after each shot and
only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.checkpoint import has_checkpoint, read_state
from llm_surgeon.config import PruneConfig
from llm_surgeon.curvature.kfac import (
    FactorCollector,
    collect_kfac,
    nearest_kronecker,
    nearest_kronecker_layer,
    next_token_loss,
)
from llm_surgeon.data.corpora import load_text
from llm_surgeon.data.windows import calibration_windows, tokenize
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.perplexity import perplexity_from_nll, token_nll
from llm_surgeon.evaluate.runner import check_seqlen, eval_windows_for
from llm_surgeon.evaluate.size import peak_rss_mb, reset_peak_rss
from llm_surgeon.io import check_replaceable, remove_work_folder, work_folder
from llm_surgeon.layerwise import (
    StopLayer,
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
from llm_surgeon.models.load import cache_dir, load_model, load_tokenizer
from llm_surgeon.models.offload import parse_memory, release_free_memory, resident_bytes
from llm_surgeon.models.shrink import _record_sizes, shrink_group
from llm_surgeon.models.units import UnitGroup, remove_dead_units, unit_groups
from llm_surgeon.stores import (
    DiskLayers,
    DiskStates,
    Layers,
    MemoryLayers,
    MemoryStates,
    States,
    WorkFiles,
)

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


def prepare_curvature(method: Any, curv: Curvature, t: TargetLinear, cfg: PruneConfig) -> None:
    """Let a method that needs them (the surgeon) damp and invert one layer's factors; an
    unusable factor becomes a one-line error naming the layer."""
    if not hasattr(method, "prepare"):
        return
    try:
        method.prepare(curv, cfg.damp_g, cfg.damp_a, name=t.name)
    except ValueError as exc:
        raise UserError(
            f"curvature of {t.name} is unusable ({exc}); try more "
            "damping (--damp-g/--damp-a) or more calibration data"
        ) from None


def allocate_per_layer(targets: list[TargetLinear], numel: dict[str, int],
                       target_sparsity: float, pick: Any) -> None:
    """Each layer gets the target fraction; what a coarse layer (whole rows and columns)
    cannot take exactly is carried over to the next, so the total stays on target.
    ``pick(t, want)`` removes up to ``want`` candidates of ``t`` and returns how many went."""
    seen = removed = 0
    for t in targets:
        seen += numel[t.name]
        removed += pick(t, threshold.target_count(seen, target_sparsity) - removed)


def select_removals(costs: dict[str, Costs], targets: list[TargetLinear],
                    shapes: dict[str, torch.Size], structure: Structure, target_sparsity: float,
                    total: int, method_allocation: Any = None,
                    units: list[UnitGroup] | None = None,
                    unit_shape: tuple[int | None, bool] = (1, False)) -> dict[str, Removal]:
    """Removals from the small costs (rows and columns, coupled units), which stay in memory:
    one global threshold over every layer's candidates, or, for methods whose costs share no
    scale across layers (``allocation == "layer"``, e.g. L-OBD), one within each layer with the
    remainder carried over."""
    layerwise = getattr(method_allocation, "allocation", "global") == "layer"
    if structure.kind == "heads-channels":
        assert units is not None
        return _select_units(costs, units, total, target_sparsity, layerwise, unit_shape)
    assert structure.kind == "rows-columns"

    def rows_columns(names: list[str], n_remove: int) -> dict[str, Removal]:
        picked = threshold.select_rows_columns(
            {k: (costs[k].rows, costs[k].cols) for k in names},
            {k: tuple(shapes[k]) for k in names}, n_remove, per_param=True)
        return {k: Removal(rows=r, cols=c) for k, (r, c) in picked.items()}

    if layerwise and len(targets) > 1:
        removals: dict[str, Removal] = {}

        def pick(t: TargetLinear, want: int) -> int:
            removals.update(rows_columns([t.name], want))
            return _removed_count(removals[t.name], shapes[t.name])

        allocate_per_layer(targets, {k: math.prod(s) for k, s in shapes.items()},
                           target_sparsity, pick)
        return removals
    return rows_columns([t.name for t in targets], threshold.target_count(total, target_sparsity))


def _select_units(costs: dict[str, Costs], units: list[UnitGroup], total: int,
                  target_sparsity: float, layerwise: bool,
                  unit_shape: tuple[int | None, bool] = (1, False)) -> dict[str, Removal]:
    """Coupled units ranked by cost per parameter (globally, or within each decoder layer with
    the remainder carried over), turned into each linear's rows and columns. ``unit_shape`` =
    (channel multiple, uniform): channels go in blocks that keep every layer's width a multiple,
    and with uniform every layer loses the same counts (one global ranking, even for methods
    with layer-wise allocation)."""
    unit_costs = [
        torch.stack([costs[p.target.name].units.double().cpu() for p in g.parts]).sum(0)
        for g in units
    ]
    sizes = [g.params_per_unit() for g in units]
    multiple = threshold.default_channel_multiple(
        [g.count for g in units if g.kind == "channels"], unit_shape[0])
    uniform = unit_shape[1]

    def choose(ks: list[int], n_remove: int) -> list[torch.Tensor]:
        if multiple == 1 and not uniform:
            return threshold.select_units([unit_costs[k] for k in ks], [sizes[k] for k in ks],
                                          n_remove)
        return threshold.select_shaped_units(
            [unit_costs[k] for k in ks], [sizes[k] for k in ks], [units[k].kind for k in ks],
            [units[k].layer for k in ks], n_remove, channel_multiple=multiple, uniform=uniform)

    if layerwise and not uniform:
        masks: list[torch.Tensor] = []
        seen = removed = 0
        for layer in sorted({g.layer for g in units}):
            ks = [k for k, g in enumerate(units) if g.layer == layer]
            seen += sum(units[k].params_per_unit() * units[k].count for k in ks)
            want = threshold.target_count(seen, target_sparsity) - removed
            part = choose(ks, max(want, 0))
            masks.extend(part)
            removed += sum(int(m.sum()) * sizes[k] for k, m in zip(ks, part, strict=True))
    else:
        masks = choose(list(range(len(units))), threshold.target_count(total, target_sparsity))
    removals: dict[str, Removal] = {}
    for g, mask in zip(units, masks, strict=True):
        chosen = torch.nonzero(mask).reshape(-1)
        for p in g.parts:
            idx = p.indices(chosen)
            removals[p.target.name] = Removal(rows=idx) if p.axis == "rows" else Removal(cols=idx)
    return removals


def _removed_count(removal: Removal, shape: torch.Size) -> int:
    if removal.mask is not None:
        return int(removal.mask.sum())
    r = 0 if removal.rows is None else removal.rows.numel()
    c = 0 if removal.cols is None else removal.cols.numel()
    return r * shape[1] + c * shape[0] - r * c


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
    method: Any
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
               collect: bool = True) -> None:
    """K-FAC factors of every target, written per layer to the work folder (``curv{ℓ}``): a
    forward sweep keeping the boundaries, the head's gradient, then a backward sweep that
    recomputes each layer from its stored input and carries the gradient down; hooks on the
    layer's linears sum A and G, all-reduced under torchrun. With ``--nearest-kronecker`` the
    power iterations run on the same layer while its inputs and output gradients are at hand.
    ``collect=False``: the same sweeps without statistics (the plain pass's yardstick)."""
    cfg, store = run.cfg, run.store
    batches = run.batches(windows)
    L = len(store)
    states = run.states("states", batches, L + 1)
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
            states.save("g", L, b, x.grad)
            states.drop("h", L, b)
        inject.value = None
    n_windows = int(windows.shape[0])
    by_layer = _by_layer(run.targets)
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
                    out.backward(states.load("g", ell + 1, b))
                    if ell > 0:
                        states.save("g", ell, b, x.grad)
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
                        lambda layer=layer, ell=ell: _recompute(layer, ell, kwargs, states))
            run.emit("factors", layer=ell, tensors=[m for f in factors.values() for m in f])
            check_finite({k: Curvature(A=a, G=g) for k, (a, g) in factors.items()})
            WorkFiles(run.work / "shot", run.device).put(f"curv{ell}", factors)
            del factors
        del col
        for b in range(len(kwargs)):
            states.drop("g", ell + 1, b)
            states.drop("h", ell, b)


def kfac_hooks(run: Run, windows: torch.Tensor, seed: int, desc: str) -> None:
    """The other strategy, for a model wholly in memory (``--curvature-pass hooks``): hooks
    over one ordinary forward and backward of the whole model per batch (no recomputed
    forward, but every layer's running sums at once), then the same per-layer factor files as
    :func:`kfac_sweep`. Nearest-Kronecker iterations: whole-model passes
    (:func:`~llm_surgeon.curvature.kfac.nearest_kronecker`)."""
    cfg = run.cfg
    factors = collect_kfac(run.model, run.targets, windows, fisher=cfg.fisher,
                           batch_size=cfg.batch_size, seed=seed, progress=run.progress,
                           desc=desc)
    if cfg.nearest_kronecker > 0:
        factors = nearest_kronecker(run.model, run.targets, windows, factors,
                                    cfg.nearest_kronecker, fisher=cfg.fisher, seed=seed,
                                    progress=run.progress)
    work = WorkFiles(run.work / "shot", run.device)
    for ell, mine in sorted(_by_layer(run.targets).items()):
        layer = {t.name: (factors[t.name].A, factors[t.name].G) for t in mine}
        for t in mine:
            del factors[t.name]
        run.emit("factors", layer=ell, tensors=[m for f in layer.values() for m in f])
        check_finite({k: Curvature(A=a, G=g) for k, (a, g) in layer.items()})
        work.put(f"curv{ell}", layer)
        del layer


def _recompute(layer: nn.Module, ell: int, kwargs: list[Batch], states: States
               ) -> Iterator[None]:
    """Run layer ℓ forward and backward once per batch from its stored input and output
    gradient (hooks on its linears see the inputs and output gradients)."""
    with torch.enable_grad():
        for b, kw in enumerate(kwargs):
            x = states.load("h", ell, b).detach().requires_grad_(True)
            out = _layer_out(layer(x, **at_layer(kw, ell)))
            out.backward(states.load("g", ell + 1, b))
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


def _curvature_of(run: Run, ell: int, kind: str, names: list[str]) -> dict[str, Curvature]:
    if kind == "none" or not names:
        return {n: Curvature() for n in names}
    saved = WorkFiles(run.work / "shot", run.device).get(f"curv{ell}")
    run.emit("factors", layer=ell,
             tensors=[m for n in names for m in saved[n] if m is not None])
    return {n: Curvature(A=saved[n][0], G=saved[n][1]) for n in names}


def _prepared_of(run: Run, ell: int, names: list[str]) -> dict[str, Curvature]:
    """Layer ℓ's damped factors and inverses as the costs pass prepared them."""
    if not names:
        return {}
    saved = WorkFiles(run.work / "shot", run.device).get(f"prep{ell}")
    run.emit("factors", layer=ell,
             tensors=[m for n in names for m in saved[n][:4] if m is not None])
    return {n: Curvature(A=saved[n][0], G=saved[n][1], Ainv=saved[n][2], Ginv=saved[n][3],
                         flat=bool(saved[n][4])) for n in names}


# ---- the passes of a shot -------------------------------------------------------------------


def global_shot(run: Run, target_sparsity: float, windows: torch.Tensor, shot: int
                ) -> dict[str, tuple[int, int]]:
    """One shot of a global method with one layer's work in memory at a time; returns
    (zeros, total) of every target after the shot."""
    model, store, targets, method, structure, cfg, timer = (
        run.model, run.store, run.targets, run.method, run.structure, run.cfg, run.timer)
    work = WorkFiles(run.work / "shot", run.device)
    kind = method.curvature
    with timer("curvature"):
        if kind == "kfac" and cfg.curvature_pass == "hooks":
            kfac_hooks(run, windows, cfg.seed + shot, f"shot {shot}: curvature G⊗A")
        elif kind == "kfac":
            kfac_sweep(run, windows, cfg.seed + shot, f"shot {shot}: curvature G⊗A")
        elif kind == "activations":
            activation_sweep(run, targets, windows, f"shot {shot}: activations A")
    by_layer = _by_layer(targets)
    index = {t.name: i for i, t in enumerate(targets)}
    shapes: dict[str, torch.Size] = {}
    small: dict[str, Costs] = {}  # rows and columns, units: a few numbers per layer, in memory
    units = unit_groups(model, targets) if structure.kind == "heads-channels" else None
    share = {p.target.name: (g, p) for g in units or [] for p in g.parts}

    with timer("costs"):
        for ell in tqdm(range(len(store)), desc=f"shot {shot}: costs", leave=False,
                        disable=not run.progress):
            mine = by_layer.get(ell, [])
            curv = _curvature_of(run, ell, kind, [t.name for t in mine])
            prepared: dict[str, tuple] = {}
            with store.resident(ell):
                for t in mine:
                    W = augmented_weight(t)
                    shapes[t.name] = W.shape
                    if hasattr(method, "prepare"):
                        # damped factors and their inverses, once: kept for the updates
                        prepare_curvature(method, curv[t.name], t, cfg)
                        c = curv[t.name]
                        prepared[t.name] = (c.A, c.G, c.Ainv, c.Ginv, c.flat)
                    if units is not None:
                        g, p = share[t.name]
                        small[t.name] = Costs(units=p.unit_costs(method, W, curv[t.name],
                                                                 g.count))
                    else:
                        c = method.costs(W, curv[t.name], structure)
                        if structure.kind == "rows-columns":
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
    total = sum(math.prod(s) for s in shapes.values())

    removal_of: Callable[[TargetLinear], Removal]
    with timer("threshold"):
        if structure.kind in ("rows-columns", "heads-channels"):
            removals = select_removals(small, targets, shapes, structure, target_sparsity,
                                       total, method_allocation=method, units=units,
                                       unit_shape=cfg.unit_shape())
            removal_of = lambda t: removals[t.name]  # noqa: E731
        else:
            def eligible(i: int) -> torch.Tensor:
                c = work.get(f"cost{i}")
                if structure.kind == "nm":
                    c = threshold.nm_eligible_costs(c, structure.n, structure.m,
                                                    groupable=targets[i].module.in_features)
                return c

            if getattr(method, "allocation", "global") == "layer" and len(targets) > 1:
                def pick(t: TargetLinear, want: int) -> int:  # one layer's mask, to disk
                    mask = threshold.global_masks([eligible(index[t.name])], want)[0]
                    work.put(f"mask{index[t.name]}", mask)
                    return int(mask.sum())

                allocate_per_layer(targets, {k: math.prod(v) for k, v in shapes.items()},
                                   target_sparsity, pick)
                removal_of = lambda t: Removal(mask=work.get(f"mask{index[t.name]}"))  # noqa: E731
            else:
                sel = threshold.streamed_global_masks(
                    eligible, len(targets), threshold.target_count(total, target_sparsity))
                removal_of = lambda t: Removal(  # noqa: E731
                    mask=sel.mask(index[t.name], eligible(index[t.name])))
    release_free_memory()
    counts: dict[str, tuple[int, int]] = {}
    with timer("update"):
        for ell in tqdm(range(len(store)), desc=f"shot {shot}: updates", leave=False,
                        disable=not run.progress):
            run.emit("update", shot=shot, layer=ell, layers=len(store))
            mine = by_layer.get(ell, [])
            curv = _prepared_of(run, ell, [t.name for t in mine]) if hasattr(
                method, "prepare") else _curvature_of(run, ell, kind, [t.name for t in mine])
            with store.resident(ell, dirty=True):
                for t in mine:
                    W = augmented_weight(t)
                    write_augmented(t, method.apply(W, curv[t.name], removal_of(t), structure))
                    curv[t.name] = Curvature()
                    del W
                if units is not None:  # rows whose downstream column is gone go too
                    remove_dead_units([g for g in units if g.layer == ell])
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

                prune_layer_linears(mine, run.method, run.structure, sparsity, run_all)
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


def shrink(run: Run) -> dict[str, Any]:
    """Dead units leave the module shapes one layer at a time (each smaller layer written
    back); the config records every layer's sizes. Returns the shrink summary."""
    model, store = run.model, run.store

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
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        for batch in tqdm(run.batches(windows), desc="plain forward+backward", leave=False,
                          disable=not run.progress):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        elapsed = time.perf_counter() - start
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    return elapsed


# ---- loading, checks, report pieces -----------------------------------------------------------


def model_folder(spec: str) -> Path:
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


def budget_estimate(model: nn.Module, store: Layers, targets: list[TargetLinear]) -> int:
    """Bytes a shot needs besides the runtime (interpreter, torch, math libraries): the
    resident part, one decoder layer twice (loaded and being written), one layer's Kronecker
    factors, and twelve float64 copies of the largest factor (damping, symmetrising, Cholesky
    factor and inverse of one linear at a time). Measured on a random Llama with 1024-wide
    factors: the observed peak stays within this estimate."""
    curv, widest = 0, 0
    for mine in _by_layer(targets).values():
        inputs = {(t.module.in_features + int(t.has_bias)) for t in mine}
        outputs = [t.module.out_features for t in mine]
        curv = max(curv, 4 * (sum(d * d for d in inputs) + sum(d * d for d in outputs)))
        widest = max([widest, *inputs, *outputs])
    return resident_bytes(model) + 2 * store.layer_bytes() + curv + 12 * 8 * widest * widest


def refuse_unsupported(cfg: PruneConfig) -> None:
    """The one combination that cannot stream: the low-rank correction trains adapters of
    every layer jointly with Adam, each step a forward and backward through the whole model;
    with layers on disk that is 2·L layer loads per step (see README)."""
    if cfg.max_memory and cfg.lowrank_rank > 0 and cfg.lowrank_steps > 0:
        raise UserError("--max-memory does not support the low-rank correction (each of its "
                        "steps needs every layer resident); drop --max-memory or "
                        "--lowrank-steps")


def check_output_replaceable(out_dir: Path | None, resuming: bool) -> None:
    """Refuse an ``--output`` that holds an unfinished run or something else than our output
    (whether the path can be written at all is :func:`llm_surgeon.io.check_output_path_usable`)."""
    if resuming or out_dir is None:
        return
    if has_checkpoint(out_dir):  # (finishes a replace that a kill interrupted, first)
        raise UserError(
            f"--output {out_dir} holds an unfinished run; continue it with "
            f"`llm-surgeon prune --resume {out_dir}` or choose a new folder"
        )
    check_replaceable(out_dir, "--output")


def check_nm_widths(targets: list[TargetLinear], structure: Structure) -> None:
    """N:M needs M to divide every targeted linear's input width."""
    if structure.kind != "nm":
        return
    for t in targets:
        if t.module.in_features % structure.m:
            raise UserError(
                f"--structure {structure}: M={structure.m} does not divide the "
                f"input width {t.module.in_features} of {t.name}"
            )


def calibration_set(tokenizer: Any, text: str, cfg: PruneConfig) -> torch.Tensor:
    """The run's seeded calibration windows (tokens cached on disk)."""
    ids = tokenize(tokenizer, text, cache=cache_dir() / "tokens")
    return calibration_windows(ids, cfg.calib_samples, cfg.seqlen, seed=cfg.seed)


def report_header(cfg: PruneConfig, structure: Structure) -> dict[str, Any]:
    """The first fields of every report: method, structure, target, settings, environment."""
    return {
        "method": cfg.method,
        "structure": str(structure),
        "sparsity_target": structure.nm_sparsity
        if structure.kind == "nm"
        else (0.5 if cfg.sparsity is None else cfg.sparsity),
        "settings": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }


def layer_report_from_counts(
    targets: list[TargetLinear], counts: dict[str, tuple[int, int]]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-layer and per-module-type sparsity from each target's (zeros, total)."""
    layers = []
    by_type: dict[str, list[int]] = {}
    for t in targets:
        z, n = counts[t.name]
        layers.append(
            {"name": t.name, "type": t.type, "layer": t.layer_index, "sparsity": z / n, "params": n}
        )
        acc = by_type.setdefault(t.type, [0, 0])
        acc[0] += z
        acc[1] += n
    return layers, {k: z / n for k, (z, n) in by_type.items()}


def shrink_report(summary: dict[str, Any], linear_before: int, linear_after: int
                  ) -> dict[str, Any]:
    """The report's ``shrink`` entry from a shrink summary and the decoder-linear counts."""
    return {
        "params_total_before": summary["params_before"],
        "params_total_after": summary["params_after"],
        "params_decoder_linear_before": linear_before,
        "params_decoder_linear_after": linear_after,
        "kv_groups_removed": summary["kv_groups_removed"],
        "channels_removed": summary["channels_removed"],
        "layer_sizes": summary["layer_sizes"],
    }


def strip_private(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def open_layers(cfg: PruneConfig, work: Path) -> tuple[nn.Module, Any, Layers]:
    """The model, its tokenizer and its layer store: whole in memory, or (``--max-memory``)
    built on the meta device with every decoder layer in its own file under ``work``."""
    if cfg.max_memory:
        from llm_surgeon.models.load import parse_dtype
        from llm_surgeon.models.offload import load_offloaded

        folder = model_folder(cfg.model)
        model, store = load_offloaded(folder, work / "layers", parse_dtype(cfg.dtype),
                                      cfg.device, store_cls=DiskLayers)
        return model, load_tokenizer(str(folder)), store
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model.eval()
    for p in model.parameters():  # sweeps need activation gradients only
        p.requires_grad_(False)
    return model, tokenizer, MemoryLayers(model, cfg.device)


# ---- the whole run ------------------------------------------------------------------------


def resume(out_dir: str | Path, progress: bool = True, on_event: OnEvent | None = None
           ) -> dict[str, Any]:
    """Continue a run whose ``--output`` folder holds a checkpoint, with its recorded settings."""
    state = read_state(out_dir)
    cfg = PruneConfig(**{**state["settings"], "output": str(out_dir)})
    return prune(cfg, progress=progress, _resume=state, on_event=on_event)


def prune(cfg: PruneConfig, progress: bool = True, dense_ppl: float | None = None,
          _resume: dict[str, Any] | None = None, on_event: OnEvent | None = None
          ) -> dict[str, Any]:
    """Run a whole pruning job; return the report (and save the model if ``cfg.output``).

    ``dense_ppl``: the dense model's perplexity under the same evaluation settings when already
    known (the bench shares it between runs). With an output folder a checkpoint is written
    there after every shot (see ``checkpoint.py``); :func:`resume` continues a killed run.
    ``on_event(name, **info)`` is called at the run's progress points (``"shot"`` at the start
    of each shot, ``"update"`` before each layer's update, ``"factors"`` whenever a layer's
    curvature factors are made or read back); tests use it to kill the run or watch memory.
    """
    structure = cfg.validate()
    method = get_method(cfg.method, cfg)
    refuse_unsupported(cfg)
    distributed.init_from_env(cfg.device)  # a no-op unless launched by torchrun
    budget = parse_memory(cfg.max_memory) if cfg.max_memory else None
    out_dir = Path(cfg.output) if cfg.output else None
    check_output_replaceable(out_dir, resuming=_resume is not None)
    torch.manual_seed(cfg.seed)
    timer = PhaseTimer()
    calib_text = load_text(cfg.calib_data, "train")
    eval_text = load_text(cfg.eval_data, "test") if cfg.eval else None
    root = Path(cfg.offload_dir) if cfg.offload_dir else cache_dir() / "offload"
    work = work_folder(root)  # (removes stale run folders of killed runs first)
    try:
        with timer("load"):
            model, tokenizer, store = open_layers(cfg, work)
        check_seqlen(model, cfg.seqlen)
        targets = decoder_linears(model)
        need = budget_estimate(model, store, targets)
        if budget is not None and need > budget:
            raise UserError(
                f"--max-memory {cfg.max_memory} is below what one streamed layer needs "
                f"(~{need / 2**20:.0f} MiB: embeddings and head {resident_bytes(model) / 2**20:.0f}"
                f" MiB, a decoder layer {store.layer_bytes() / 2**20:.0f} MiB, its curvature); "
                "raise it"
            )
        check_nm_widths(targets, structure)
        windows = calibration_set(tokenizer, calib_text, cfg)
        run = Run(model, store, targets, cfg, method, structure, work, timer, progress,
                  on_event)
        report = _run(run, windows, tokenizer, eval_text, budget, need, dense_ppl, _resume,
                      out_dir)
        if out_dir is not None and distributed.is_main():
            store.save(tokenizer, out_dir,
                       extra_files={"report.json": json.dumps(report, indent=2) + "\n"})
        report["_model"] = store.handle()  # in-memory handle for callers (not serialised)
        return report
    finally:
        remove_work_folder(work)


def _run(run: Run, windows: torch.Tensor, tokenizer: Any, eval_text: str | None,
         budget: int | None, need: int, dense_ppl: float | None,
         resumed: dict[str, Any] | None, out_dir: Path | None) -> dict[str, Any]:
    cfg, store, timer, structure = run.cfg, run.store, run.timer, run.structure
    eval_windows: torch.Tensor | None = None

    def evaluate(desc: str) -> float | None:
        nonlocal eval_windows
        if not cfg.eval:
            return None
        with timer("eval"):
            if eval_windows is None:
                eval_windows = eval_windows_for(tokenizer, cfg.eval_data, cfg.seqlen,
                                                cfg.eval_windows, eval_text)
            return perplexity(run, eval_windows, desc)["ppl"]

    report = report_header(cfg, structure)
    report["store"] = {
        "kind": "memory" if store.all_resident else "disk",
        "max_memory_bytes": budget,
        "estimated_need_bytes": need,
        "resident_bytes": resident_bytes(run.model),
        "layer_bytes": store.layer_bytes(),
        "decoder_layers": len(store),
    }
    shots: list[dict[str, Any]] = []
    counts: dict[str, tuple[int, int]] = {}
    if resumed is not None:
        assert out_dir is not None
        store.restore(out_dir, run.targets, resumed)
        report.update(resumed["report"])
        shots = list(resumed["shots"])
        counts = {k: (int(v[0]), int(v[1])) for k, v in resumed.get("counts", {}).items()}
        for k, v in resumed["phases"].items():
            timer.phases[k] = dict(v)
    else:
        report["ppl_dense"] = (dense_ppl if dense_ppl is not None and cfg.eval
                               else evaluate("dense perplexity"))
        if cfg.time_plain_pass:
            report["plain_fwd_bwd_s"] = plain_pass_time(run, windows)
    target = report["sparsity_target"]
    # layer-wise methods (SparseGPT, Wanda, mAIHT) and Numerical pruning prune in one pass
    kind = getattr(run.method, "kind", "global")
    n_shots = 1 if kind in ("layerwise", "units") else cfg.shots
    start = time.perf_counter() - sum(s["time_s"] for s in shots)
    for shot in tqdm(range(len(shots) + 1, n_shots + 1), desc=f"{cfg.method} shots",
                     initial=len(shots), total=n_shots, disable=not run.progress):
        run.emit("shot", shot=shot)
        t0 = time.perf_counter()
        before = {k: dict(v) for k, v in timer.phases.items()}
        shot_target = threshold.linear_schedule(shot, n_shots, target)
        if kind == "layerwise":
            with timer("layerwise"):
                counts = layerwise_pass(run, shot_target, windows)
        elif kind == "units":
            with timer("units"):
                counts = unit_scoring_pass(run, shot_target, windows)
        else:
            counts = global_shot(run, shot_target, windows, shot)
        sync_weights(run)  # torchrun: every rank continues from rank 0's weights
        if cfg.lowrank_rank > 0 and cfg.lowrank_steps > 0 and shot < n_shots:
            from llm_surgeon.methods.lowrank import first_order_correction

            with timer("lowrank"):
                first_order_correction(run.model, run.targets, windows, rank=cfg.lowrank_rank,
                                       steps=cfg.lowrank_steps, lr=cfg.lowrank_lr,
                                       seed=cfg.seed + shot, progress=run.progress)
            counts = count_zeros(run)
        entry: dict[str, Any] = {
            "shot": shot,
            "sparsity_target": shot_target,
            "sparsity_achieved": sum(z for z, _ in counts.values())
            / sum(n for _, n in counts.values()),
            "time_s": time.perf_counter() - t0,
            "phases": {
                k: {"time_s": v["time_s"] - before.get(k, {}).get("time_s", 0.0),
                    "peak_rss_mb": v["peak_rss_mb"]}
                for k, v in timer.phases.items() if k not in ("eval", "load")
            },
        }
        if cfg.eval_every_shot and shot < n_shots:
            entry["ppl"] = evaluate(f"shot {shot} perplexity")
        shots.append(entry)
        if out_dir is not None and shot < n_shots and distributed.is_main():
            keep = ("ppl_dense", "plain_fwd_bwd_s")
            store.save_checkpoint(out_dir, run.targets, {
                "settings": asdict(cfg), "shots": shots, "counts": counts,
                "report": {k: report[k] for k in keep if k in report},
                "phases": timer.phases,
            })
    report["prune_time_s"] = time.perf_counter() - start
    if cfg.time_plain_pass and shots:
        pruning = ("curvature", "costs", "threshold", "update")
        first = sum(shots[0]["phases"].get(k, {}).get("time_s", 0.0) for k in pruning)
        report["shot_time_s"] = first
        report["shot_cost_ratio"] = first / report["plain_fwd_bwd_s"]
    report["sparsity_achieved"] = sum(z for z, _ in counts.values()) / sum(
        n for _, n in counts.values())
    report["shots"] = shots
    report["layers"], report["sparsity_by_type"] = layer_report_from_counts(run.targets, counts)
    if structure.kind == "heads-channels":
        # physically smaller: heads (in whole KV groups) and channels leave the module shapes
        dense_linear = sum(n for _, n in counts.values())
        with timer("shrink"):
            summary = shrink(run)
        run.targets = decoder_linears(run.model)
        report["shrink"] = shrink_report(summary, dense_linear, sum(
            t.module.weight.numel() + (t.module.bias.numel() if t.has_bias else 0)
            for t in run.targets))
    report["ppl"] = evaluate("pruned perplexity")
    if shots and cfg.eval_every_shot:
        shots[-1]["ppl"] = report["ppl"]
    report["phases"] = timer.phases
    report["peak_rss_mb"] = timer.process_peak_mb()
    return report


# ---- the passes on a model in memory (for tests and scripts) -----------------------------------


def _memory_run(model: nn.Module, targets: list[TargetLinear], method: Any,
                structure: Structure, batch_size: int, progress: bool, work: Path,
                unit_shape: tuple[int | None, bool] = (1, False)) -> Run:
    cfg = PruneConfig(model="", batch_size=batch_size, channel_multiple=unit_shape[0],
                      layer_sizes="uniform" if unit_shape[1] else "global")
    return Run(model, MemoryLayers(model, next(model.parameters()).device), targets, cfg,
               method, structure, work, PhaseTimer(), progress)


def run_layerwise(model: Any, targets: list[TargetLinear], method: Any, structure: Structure,
                  sparsity: float, windows: torch.Tensor, batch_size: int = 1,
                  progress: bool = True) -> None:
    """Prune every targeted linear of an in-memory ``model`` in place with the layer-wise pass
    the driver runs (:func:`layerwise_pass`)."""
    with tempfile.TemporaryDirectory() as work:
        layerwise_pass(_memory_run(model, targets, method, structure, batch_size, progress,
                                   Path(work)), sparsity, windows)


def run_unit_scoring(model: Any, targets: list[TargetLinear], method: Any, sparsity: float,
                     windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                     unit_shape: tuple[int | None, bool] = (1, False)) -> None:
    """Numerical pruning of an in-memory ``model`` in place (:func:`unit_scoring_pass`);
    ``unit_shape``: (channel multiple, uniform layer sizes)."""
    with tempfile.TemporaryDirectory() as work:
        unit_scoring_pass(_memory_run(model, targets, method, Structure("heads-channels"),
                                      batch_size, progress, Path(work), unit_shape),
                          sparsity, windows)
