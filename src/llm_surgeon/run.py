"""The multi-shot driver: schedule, shots, progress, report assembly, atomic output.

One shot of a global method (surgeon, K-OBD, L-OBD, magnitude):

    curvature on the current model ──► costs of every candidate in every layer
        ──► one global threshold reaching the shot's target ──► updates (or zeroing)

Shot t of T reaches the target t·α/T (linear schedule); what was removed stays removed: removed
weights are exactly zero, so they cost nothing, are always re-selected, and the surgeon's
correlated update keeps them at zero.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.checkpoint import has_checkpoint, read_state, restore, save_checkpoint
from llm_surgeon.config import PruneConfig
from llm_surgeon.curvature.kfac import collect_activations, collect_kfac, nearest_kronecker
from llm_surgeon.data.corpora import load_text
from llm_surgeon.data.windows import calibration_windows, tokenize
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.runner import check_seqlen, evaluate_loaded
from llm_surgeon.evaluate.size import peak_rss_mb, reset_peak_rss
from llm_surgeon.methods import threshold
from llm_surgeon.methods.base import Costs, Curvature, Removal, Structure
from llm_surgeon.methods.registry import get_method
from llm_surgeon.models.layouts import TargetLinear, count_parameters, decoder_linears
from llm_surgeon.models.load import cache_dir, load_model, save_atomically
from llm_surgeon.models.shrink import shrink_model
from llm_surgeon.models.units import UnitGroup, remove_dead_units, unit_groups

log = logging.getLogger(__name__)


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


def overall_sparsity(targets: list[TargetLinear]) -> float:
    z = n = 0
    for t in targets:
        a, b = layer_sparsity(t)
        z += a
        n += b
    return z / n


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


# ---- one shot -----------------------------------------------------------------------------


def estimate_curvature(
    model: Any,
    targets: list[TargetLinear],
    kind: str,
    windows: torch.Tensor,
    cfg: PruneConfig,
    shot: int,
    progress: bool,
) -> dict[str, Curvature]:
    if kind == "none":
        return {t.name: Curvature() for t in targets}
    if kind == "activations":
        A = collect_activations(
            model,
            targets,
            windows,
            cfg.batch_size,
            progress=progress,
            desc=f"shot {shot}: activations A",
        )
        out = {name: Curvature(A=a) for name, a in A.items()}
        check_finite(out)
        return out
    factors = collect_kfac(
        model,
        targets,
        windows,
        fisher=cfg.fisher,
        batch_size=cfg.batch_size,
        seed=cfg.seed + shot,
        progress=progress,
        desc=f"shot {shot}: curvature G⊗A",
    )
    if cfg.nearest_kronecker > 0:
        factors = nearest_kronecker(
            model,
            targets,
            windows,
            factors,
            cfg.nearest_kronecker,
            fisher=cfg.fisher,
            seed=cfg.seed + shot,
            progress=progress,
        )
    out = {name: Curvature(A=f.A, G=f.G) for name, f in factors.items()}
    check_finite(out)
    return out


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


def allocate_per_layer(
    targets: list[TargetLinear],
    numel: dict[str, int],
    target_sparsity: float,
    pick: Any,
) -> None:
    """Each layer gets the target fraction; what a coarse layer (whole rows and columns)
    cannot take exactly is carried over to the next, so the total stays on target.
    ``pick(t, want)`` removes up to ``want`` candidates of ``t`` and returns how many went."""
    seen = removed = 0
    for t in targets:
        seen += numel[t.name]
        removed += pick(t, threshold.target_count(seen, target_sparsity) - removed)


def select_removals(
    costs: dict[str, Costs],
    targets: list[TargetLinear],
    weights: dict[str, torch.Tensor],
    structure: Structure,
    target_sparsity: float,
    total: int,
    method_allocation: Any = None,
    units: list[UnitGroup] | None = None,
    unit_shape: tuple[int | None, bool] = (1, False),
) -> dict[str, Removal]:
    """One global threshold over every layer's candidates → each layer's removal.

    Methods whose costs share no scale across layers (``allocation == "layer"``, e.g. L-OBD:
    I ⊗ A is a layer-wise reconstruction error) apply the threshold within each layer instead,
    so that every layer loses the target fraction. ``units``: the coupled units of
    heads-channels pruning; ``unit_shape``: (channel multiple, uniform layer sizes) of them.
    """
    if structure.kind == "heads-channels":
        assert units is not None
        layerwise = getattr(method_allocation, "allocation", "global") == "layer"
        return _select_units(costs, units, total, target_sparsity, layerwise, unit_shape)
    if getattr(method_allocation, "allocation", "global") == "layer" and len(targets) > 1:
        removals: dict[str, Removal] = {}

        def pick(t: TargetLinear, want: int) -> int:
            removals.update(_select({t.name: costs[t.name]}, [t], weights, structure, want))
            return _removed_count(removals[t.name], weights[t.name].shape)

        allocate_per_layer(targets, {k: int(w.numel()) for k, w in weights.items()},
                           target_sparsity, pick)
        return removals
    return _select(
        costs, targets, weights, structure, threshold.target_count(total, target_sparsity)
    )


def _select_units(
    costs: dict[str, Costs],
    units: list[UnitGroup],
    total: int,
    target_sparsity: float,
    layerwise: bool,
    unit_shape: tuple[int | None, bool] = (1, False),
) -> dict[str, Removal]:
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
        n_remove = threshold.target_count(total, target_sparsity)
        masks = choose(list(range(len(units))), n_remove)
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


def _select(
    costs: dict[str, Costs],
    targets: list[TargetLinear],
    weights: dict[str, torch.Tensor],
    structure: Structure,
    n_remove: int,
) -> dict[str, Removal]:
    if structure.kind == "rows-columns":
        shapes = {t.name: tuple(weights[t.name].shape) for t in targets}
        picked = threshold.select_rows_columns(
            {k: (c.rows, c.cols) for k, c in costs.items()}, shapes, n_remove, per_param=True
        )
        return {k: Removal(rows=r, cols=c) for k, (r, c) in picked.items()}
    elem = {k: c.elements for k, c in costs.items()}
    if structure.kind == "nm":
        elem = {
            t.name: threshold.nm_eligible_costs(
                elem[t.name], structure.n, structure.m, groupable=t.module.in_features
            )
            for t in targets
        }
    masks = threshold.global_masks(elem, n_remove)
    return {k: Removal(mask=m) for k, m in masks.items()}


def _test_kill_point(shot: int, phase: str) -> None:
    """Tests of resume set ``LLM_SURGEON_KILL_AT=SHOT:PHASE`` to SIGKILL the process there."""
    import os
    import signal

    if os.environ.get("LLM_SURGEON_KILL_AT") == f"{shot}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def run_shot(
    model: Any,
    targets: list[TargetLinear],
    method: Any,
    structure: Structure,
    target_sparsity: float,
    windows: torch.Tensor,
    cfg: PruneConfig,
    shot: int,
    timer: PhaseTimer,
    progress: bool,
) -> None:
    with timer("curvature"):
        curv = estimate_curvature(model, targets, method.curvature, windows, cfg, shot, progress)
    weights: dict[str, torch.Tensor] = {}
    costs: dict[str, Costs] = {}
    units = unit_groups(model, targets) if structure.kind == "heads-channels" else None
    share = {p.target.name: (g, p) for g in units or [] for p in g.parts}
    with timer("costs"):
        for t in tqdm(targets, desc=f"shot {shot}: costs", leave=False, disable=not progress):
            weights[t.name] = augmented_weight(t)
            prepare_curvature(method, curv[t.name], t, cfg)
            if units is not None:
                g, p = share[t.name]
                costs[t.name] = Costs(
                    units=p.unit_costs(method, weights[t.name], curv[t.name], g.count)
                )
            else:
                costs[t.name] = method.costs(weights[t.name], curv[t.name], structure)
    total = sum(w.numel() for w in weights.values())  # weights and biases
    with timer("threshold"):
        removals = select_removals(
            costs, targets, weights, structure, target_sparsity, total, method_allocation=method,
            units=units, unit_shape=cfg.unit_shape(),
        )
    del costs
    with timer("update"):
        for i, t in enumerate(
            tqdm(targets, desc=f"shot {shot}: updates", leave=False, disable=not progress)
        ):
            if i == len(targets) // 2:
                _test_kill_point(shot, "update")  # half the layers updated: mid-shot
            W_new = method.apply(weights[t.name], curv[t.name], removals[t.name], structure)
            write_augmented(t, W_new)
            curv[t.name] = Curvature()  # free memory as we go
            del weights[t.name]
        if units is not None:
            # rows whose downstream column is gone (and the like) go too: function unchanged
            remove_dead_units(units)


@torch.no_grad()
def sync_weights(targets: list[TargetLinear]) -> None:
    """Under torchrun, give every rank rank 0's decoder weights (a no-op otherwise)."""
    if not distributed.active():
        return
    for t in targets:
        distributed.broadcast_(t.module.weight.data)
        if t.module.bias is not None:
            distributed.broadcast_(t.module.bias.data)


def plain_forward_backward_time(
    model: Any, windows: torch.Tensor, batch_size: int, progress: bool
) -> float:
    """Seconds of one ordinary forward + backward pass (``loss.backward()`` with parameter
    gradients) of the model over the calibration windows: the yardstick of a shot's cost."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    start = time.perf_counter()
    for i in tqdm(
        range(0, windows.shape[0], batch_size),
        desc="plain forward+backward",
        leave=False,
        disable=not progress,
    ):
        batch = windows[i : i + batch_size].to(device)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


# ---- the whole run ------------------------------------------------------------------------


def layer_report(targets: list[TargetLinear]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    return layer_report_from_counts(targets, {t.name: layer_sparsity(t) for t in targets})


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


def resume(out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Continue a run whose ``--output`` folder holds a checkpoint, with its recorded settings."""
    state = read_state(out_dir)
    cfg = PruneConfig(**{**state["settings"], "output": str(out_dir)})
    return prune(cfg, progress=progress, _resume=state)


def check_output_replaceable(out_dir: Path | None, resuming: bool) -> None:
    """Refuse an ``--output`` that holds an unfinished run or something else than our output
    (whether the path can be written at all is :func:`llm_surgeon.io.check_output_path_usable`)."""
    if resuming or out_dir is None:
        return
    from llm_surgeon.io import check_replaceable

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


def prune(
    cfg: PruneConfig,
    progress: bool = True,
    dense_ppl: float | None = None,
    _resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a whole pruning job; return the report (and save the model if ``cfg.output``).

    ``dense_ppl``: the dense model's perplexity under the same evaluation settings when already
    known (the bench shares it between runs), so it is not measured again. With an output
    folder, a checkpoint is written there after every shot (see ``checkpoint.py``); use
    :func:`resume` to continue a killed run.
    """
    structure = cfg.validate()
    method = get_method(cfg.method, cfg)
    distributed.init_from_env(cfg.device)  # a no-op unless launched by torchrun
    if cfg.max_memory:
        from llm_surgeon.streaming import prune_streamed

        return prune_streamed(cfg, progress=progress, dense_ppl=dense_ppl, _resume=_resume)
    out_dir = Path(cfg.output) if cfg.output else None
    check_output_replaceable(out_dir, resuming=_resume is not None)
    torch.manual_seed(cfg.seed)
    timer = PhaseTimer()
    calib_text = load_text(cfg.calib_data, "train")
    eval_text = load_text(cfg.eval_data, "test") if cfg.eval else None
    with timer("load"):
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    check_seqlen(model, cfg.seqlen)
    targets = decoder_linears(model)
    check_nm_widths(targets, structure)
    windows = calibration_set(tokenizer, calib_text, cfg)

    def evaluate(desc: str) -> float | None:
        if not cfg.eval:
            return None
        with timer("eval"):
            return evaluate_loaded(
                model,
                tokenizer,
                cfg.eval_data,
                cfg.seqlen,
                cfg.eval_windows,
                progress=progress,
                desc=desc,
                text=eval_text,
            )["ppl"]

    report = report_header(cfg, structure)
    shots: list[dict[str, Any]] = []
    if _resume is not None:
        assert out_dir is not None
        restore(out_dir, targets, _resume)
        report.update(_resume["report"])
        shots = list(_resume["shots"])
        for k, v in _resume["phases"].items():
            timer.phases[k] = dict(v)
    else:
        report["ppl_dense"] = (
            dense_ppl if dense_ppl is not None and cfg.eval else evaluate("dense perplexity")
        )
        if cfg.time_plain_pass:
            report["plain_fwd_bwd_s"] = plain_forward_backward_time(
                model, windows, cfg.batch_size, progress
            )
    target = report["sparsity_target"]
    # layer-wise methods (SparseGPT, Wanda, mAIHT) and Numerical pruning prune in one pass
    kind = getattr(method, "kind", "global")
    layerwise = kind == "layerwise"
    n_shots = 1 if kind in ("layerwise", "units") else cfg.shots
    start = time.perf_counter() - sum(s["time_s"] for s in shots)
    for shot in tqdm(range(len(shots) + 1, n_shots + 1), desc=f"{cfg.method} shots",
                     initial=len(shots), total=n_shots, disable=not progress):
        _test_kill_point(shot, "start")
        t0 = time.perf_counter()
        before = {k: dict(v) for k, v in timer.phases.items()}
        shot_target = threshold.linear_schedule(shot, n_shots, target)
        if layerwise:
            from llm_surgeon.layerwise import run_layerwise

            with timer("layerwise"):
                run_layerwise(model, targets, method, structure, shot_target, windows,
                              cfg.batch_size, progress)
        elif kind == "units":
            from llm_surgeon.layerwise import run_unit_scoring

            with timer("units"):
                run_unit_scoring(model, targets, method, shot_target, windows,
                                 cfg.batch_size, progress, unit_shape=cfg.unit_shape())
        else:
            run_shot(
                model, targets, method, structure, shot_target, windows, cfg, shot, timer,
                progress,
            )
        sync_weights(targets)  # torchrun: every rank continues from rank 0's weights
        if cfg.lowrank_rank > 0 and cfg.lowrank_steps > 0 and shot < n_shots:
            from llm_surgeon.methods.lowrank import first_order_correction

            with timer("lowrank"):
                first_order_correction(
                    model,
                    targets,
                    windows,
                    rank=cfg.lowrank_rank,
                    steps=cfg.lowrank_steps,
                    lr=cfg.lowrank_lr,
                    seed=cfg.seed + shot,
                    progress=progress,
                )
        entry: dict[str, Any] = {
            "shot": shot,
            "sparsity_target": shot_target,
            "sparsity_achieved": overall_sparsity(targets),
            "time_s": time.perf_counter() - t0,
            "phases": {
                k: {
                    "time_s": v["time_s"] - before.get(k, {}).get("time_s", 0.0),
                    "peak_rss_mb": v["peak_rss_mb"],
                }
                for k, v in timer.phases.items()
                if k not in ("eval", "load")
            },
        }
        if cfg.eval_every_shot and shot < cfg.shots:
            entry["ppl"] = evaluate(f"shot {shot} perplexity")
        shots.append(entry)
        if out_dir is not None and shot < n_shots and distributed.is_main():
            keep = ("ppl_dense", "plain_fwd_bwd_s")
            save_checkpoint(out_dir, targets, {
                "settings": asdict(cfg),
                "shots": shots,
                "report": {k: report[k] for k in keep if k in report},
                "phases": timer.phases,
            })
    report["prune_time_s"] = time.perf_counter() - start
    if cfg.time_plain_pass and shots:
        pruning = ("curvature", "costs", "threshold", "update")
        first = sum(shots[0]["phases"].get(k, {}).get("time_s", 0.0) for k in pruning)
        report["shot_time_s"] = first
        report["shot_cost_ratio"] = first / report["plain_fwd_bwd_s"]
    report["sparsity_achieved"] = overall_sparsity(targets)
    report["shots"] = shots
    report["layers"], report["sparsity_by_type"] = layer_report(targets)
    if structure.kind == "heads-channels":
        # physically smaller: heads (in whole KV groups) and channels leave the module shapes
        dense_linear = count_parameters(model)["params_decoder_linear"]
        with timer("shrink"):
            summary = shrink_model(model)
        targets = decoder_linears(model)
        report["shrink"] = shrink_report(summary, dense_linear,
                                         count_parameters(model)["params_decoder_linear"])
    report["ppl"] = evaluate("pruned perplexity")
    if shots and cfg.eval_every_shot:
        shots[-1]["ppl"] = report["ppl"]
    report["phases"] = timer.phases
    report["peak_rss_mb"] = timer.process_peak_mb()
    if out_dir is not None and distributed.is_main():
        save_atomically(
            model,
            tokenizer,
            out_dir,
            extra_files={"report.json": json.dumps(report, indent=2) + "\n"},
        )
    report["_model"] = model  # in-memory handle for callers (dropped before serialising)
    return report


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
