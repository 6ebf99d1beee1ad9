"""The one multi-shot driver: schedule, shots, checkpoints/resume, progress, report.

:func:`prune` loads the model named in the settings (whole, or layer by layer from disk under
``--max-memory``); :func:`prune_loaded` takes a model already in memory (what
``llm_surgeon.prune_model`` calls). Both run :func:`run_passes`: shot t of T reaches the target
t·α/T (linear schedule; what was removed stays removed), each shot the method's own pass
(:mod:`llm_surgeon.passes`), a checkpoint after every shot but the last; then the structure's
finishing step (the physical shrink of heads-channels), one perplexity, one save and one
report.

Under torchrun every rank takes its share of the windows; rank 0's weights are broadcast after
each shot and only rank 0 writes.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.checkpoint import has_checkpoint, read_state
from llm_surgeon.config import PruneConfig
from llm_surgeon.data.corpora import load_text
from llm_surgeon.data.windows import calibration_windows, tokenize
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.runner import check_seqlen, eval_windows_for
from llm_surgeon.io import check_replaceable, remove_work_folder, work_folder
from llm_surgeon.methods import threshold
from llm_surgeon.methods.base import Method
from llm_surgeon.methods.registry import get_method
from llm_surgeon.models.layouts import TargetLinear, decoder_linears
from llm_surgeon.models.load import cache_dir, load_model, load_tokenizer
from llm_surgeon.models.offload import parse_memory, resident_bytes
from llm_surgeon.passes import (  # noqa: F401  (the names callers import from the driver)
    PASSES,
    OnEvent,
    PhaseTimer,
    Run,
    _by_layer,
    augmented_weight,
    count_zeros,
    layer_sparsity,
    layerwise_pass,
    perplexity,
    plain_pass_time,
    sync_weights,
    unit_scoring_pass,
    write_augmented,
)
from llm_surgeon.settings import LowRankSettings
from llm_surgeon.stores import (
    DiskLayers,
    Layers,
    MemoryLayers,
)
from llm_surgeon.structures import HeadsChannels, Structure

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


def calibration_set(tokenizer: Any, text: str, cfg: PruneConfig) -> torch.Tensor:
    """The run's seeded calibration windows (tokens cached on disk); with ``cfg.validation``
    drawn from the text before its validation tail (:func:`validation_split`)."""
    ids = tokenize(tokenizer, text, cache=cache_dir() / "tokens")
    if cfg.validation:
        ids = validation_split(ids, cfg)[0]
    return calibration_windows(ids, cfg.calib_samples, cfg.seqlen, seed=cfg.seed)


def validation_split(ids: torch.Tensor, cfg: PruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration part, validation windows) of the calibration text's tokens: the last
    ``eval_windows × seqlen`` tokens become the validation windows, shape (eval_windows,
    seqlen), and calibration draws only from the tokens before them. For choosing settings
    without looking at the test text (``--validation``)."""
    tail = cfg.eval_windows * cfg.seqlen
    if ids.numel() < tail + cfg.calib_samples * cfg.seqlen:
        raise UserError(
            f"--validation: the calibration text has {ids.numel()} tokens, fewer than the "
            f"{cfg.eval_windows} x {cfg.seqlen} validation tokens plus the {cfg.calib_samples} x "
            f"{cfg.seqlen} calibration tokens; use fewer --eval-windows or a longer text")
    cut = ids.numel() - tail
    return ids[:cut], ids[cut:].reshape(cfg.eval_windows, cfg.seqlen)


def report_header(cfg: PruneConfig, structure: Structure, target: float,
                  method: Method | None = None) -> dict[str, Any]:
    """The first fields of every report: method, structure, target (resolved by the
    structure: :meth:`~llm_surgeon.structures.Structure.target_sparsity`), settings (with the
    method's own, which a plug-in's may add), environment."""
    return {
        "method": cfg.method,
        "structure": str(structure),
        "sparsity_target": target,
        "settings": {**asdict(cfg), **(method.settings.record() if method else {})},
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
    target = structure.target_sparsity(cfg.sparsity)
    refuse_unsupported(cfg)
    distributed.init_from_env(cfg.device)  # a no-op unless launched by torchrun
    budget = parse_memory(cfg.max_memory) if cfg.max_memory else None
    out_dir = Path(cfg.output) if cfg.output else None
    check_output_replaceable(out_dir, resuming=_resume is not None)
    torch.manual_seed(cfg.seed)
    timer = PhaseTimer()
    calib_text = load_text(cfg.calib_data, "train")
    eval_text = load_text(cfg.eval_data, "test") if cfg.eval and not cfg.validation else None
    work = run_work_folder(cfg)
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
        structure.check_widths(targets)
        windows = calibration_set(tokenizer, calib_text, cfg)
        run = Run(model, store, targets, cfg, method, structure, work, timer, progress,
                  on_event)

        def eval_set() -> torch.Tensor:
            if cfg.validation:
                ids = tokenize(tokenizer, calib_text, cache=cache_dir() / "tokens")
                return validation_split(ids, cfg)[1]
            return eval_windows_for(tokenizer, cfg.eval_data, cfg.seqlen, cfg.eval_windows,
                                    eval_text)

        report = run_passes(run, target, windows, eval_set, budget, need, dense_ppl, _resume,
                            out_dir)
        save_result(store, tokenizer, out_dir, report)
        report["_model"] = store.handle()  # in-memory handles for callers (not serialised)
        report["_tokenizer"] = tokenizer
        return report
    finally:
        remove_work_folder(work)


def run_work_folder(cfg: PruneConfig) -> Path:
    """This run's own work folder under ``--offload-dir`` (default: the cache's ``offload/``);
    stale run folders of killed runs are removed first."""
    return work_folder(Path(cfg.offload_dir) if cfg.offload_dir else cache_dir() / "offload")


def save_result(store: Layers, tokenizer: Any, out_dir: Path | None,
                report: dict[str, Any]) -> None:
    """Save the pruned model with its ``report.json`` to ``out_dir`` (if any); under torchrun
    only the main process writes."""
    if out_dir is not None and distributed.is_main():
        store.save(tokenizer, out_dir,
                   extra_files={"report.json": json.dumps(report, indent=2) + "\n"})


def prune_loaded(model: nn.Module, tokenizer: Any, windows: torch.Tensor, cfg: PruneConfig,
                 method: Method, structure: Structure,
                 eval_windows: torch.Tensor | None = None, progress: bool = False,
                 on_event: OnEvent | None = None) -> dict[str, Any]:
    """Prune ``model``, already in memory, in place on the calibration ``windows`` with the
    run :func:`prune` makes (no checkpoints); perplexity before and after on ``eval_windows``
    when given. Saves the model with its report to ``cfg.output`` when set. Returns the
    report (what ``llm_surgeon.prune_model`` wraps)."""
    target = structure.target_sparsity(cfg.sparsity)
    out_dir = Path(cfg.output) if cfg.output else None
    check_output_replaceable(out_dir, resuming=False)
    check_seqlen(model, int(windows.shape[1]))
    device = next(model.parameters()).device
    # seeded like prune's run, in a forked generator: the caller's random state does not move
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        work = run_work_folder(cfg)
        grads = [(p, p.requires_grad) for p in model.parameters()]
        training = model.training
        try:
            model.eval()
            for p, _ in grads:  # sweeps need activation gradients only
                p.requires_grad_(False)
            store = MemoryLayers(model, device)
            targets = decoder_linears(model)
            structure.check_widths(targets)
            run = Run(model, store, targets, cfg, method, structure, work, PhaseTimer(),
                      progress, on_event)

            def eval_set() -> torch.Tensor:
                assert eval_windows is not None
                return eval_windows

            report = run_passes(run, target, windows, eval_set, None,
                                budget_estimate(model, store, targets), None, None, None)
            save_result(store, tokenizer, out_dir, report)
            return report
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
            model.train(training)
            remove_work_folder(work)


def run_passes(run: Run, target: float, windows: torch.Tensor,
               eval_set: Callable[[], torch.Tensor], budget: int | None, need: int,
               dense_ppl: float | None, resumed: dict[str, Any] | None,
               out_dir: Path | None) -> dict[str, Any]:
    """The shots of ``run`` up to ``target`` sparsity on the calibration ``windows``, the
    structure's finishing step and the perplexities (``eval_set()``: the evaluation windows,
    made on first use); checkpoints to ``out_dir`` after every shot but the last. Returns the
    report."""
    cfg, store, timer, structure = run.cfg, run.store, run.timer, run.structure
    eval_windows: torch.Tensor | None = None

    def evaluate(desc: str) -> float | None:
        nonlocal eval_windows
        if not cfg.eval:
            return None
        with timer("eval"):
            if eval_windows is None:
                eval_windows = eval_set()
            return perplexity(run, eval_windows, desc)["ppl"]

    report = report_header(cfg, structure, target, run.method)
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
    # layer-wise methods (SparseGPT, Wanda, mAIHT) and Numerical pruning prune in one pass
    n_shots = run.method.shots(cfg.shots)
    lowrank = LowRankSettings.from_record(vars(cfg))
    start = time.perf_counter() - sum(s["time_s"] for s in shots)
    for shot in tqdm(range(len(shots) + 1, n_shots + 1), desc=f"{cfg.method} shots",
                     initial=len(shots), total=n_shots, disable=not run.progress):
        run.emit("shot", shot=shot)
        t0 = time.perf_counter()
        before = {k: dict(v) for k, v in timer.phases.items()}
        shot_target = threshold.linear_schedule(shot, n_shots, target)
        counts = run.method.prune_pass(PASSES, run, shot_target, windows, shot)
        sync_weights(run)  # torchrun: every rank continues from rank 0's weights
        if lowrank.active and shot < n_shots:
            from llm_surgeon.methods.lowrank import first_order_correction

            with timer("lowrank"):
                first_order_correction(run.model, run.targets, windows, rank=lowrank.rank,
                                       steps=lowrank.steps, lr=lowrank.lr,
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
    report.update(structure.finish(run, counts))  # e.g. the physical shrink
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
        unit_scoring_pass(_memory_run(model, targets, method, HeadsChannels(),
                                      batch_size, progress, Path(work), unit_shape),
                          sparsity, windows)
