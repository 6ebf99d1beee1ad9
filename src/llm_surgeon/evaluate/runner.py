"""``llm-surgeon eval``: load, cut windows, measure; returns a flat, stable result dict.

Stable JSON keys (other tools script against them): ``ppl``, ``nll``, ``tokens``, ``windows``,
``seqlen``, ``model``, ``data``, ``params_total``, ``params_decoder_linear``,
``params_decoder_linear_nonzero``, ``size_on_disk_mb``, ``eval_time_s``; with ``speed=True``
also ``decode_tok_s_b1``, ``decode_tok_s_b8``, ``prefill_tok_s``, ``peak_mem_mb``, and, when a
baseline (the dense model) is known, ``baseline`` (the same keys for it, measured in the same
run) and ``vs_baseline`` (ratios model / baseline); with ``tasks`` also ``tasks``:
``{name: {"acc": float, ...}}`` from lm-evaluation-harness.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from llm_surgeon.data.corpora import load_text
from llm_surgeon.data.windows import evaluation_windows, tokenize
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.perplexity import evaluate_perplexity
from llm_surgeon.evaluate.size import folder_weight_bytes, state_bytes
from llm_surgeon.models.layouts import count_parameters, layout_for
from llm_surgeon.models.load import cache_dir, ensure_bundled_cache, load_model, resolve_model


def check_seqlen(model: Any, seqlen: int) -> None:
    """A window longer than the model's context is an error, not a silent truncation."""
    limit = layout_for(model).max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context ({limit} tokens)")


def eval_windows_for(
    tokenizer: Any, data: str, seqlen: int, max_windows: int | None, text: str | None = None
) -> torch.Tensor:
    text = load_text(data, "test") if text is None else text
    ids = tokenize(tokenizer, text, cache=cache_dir() / "tokens")
    return evaluation_windows(ids, seqlen, max_windows)


def model_size(model: Any, model_spec: str | None) -> dict[str, Any]:
    """Size on disk of a model: its weight files when it came from a folder, else estimated."""
    folder = None
    if model_spec is not None:
        kind, path = resolve_model(model_spec)
        folder = ensure_bundled_cache(model_spec) if kind == "bundled" else path
        if kind == "gguf":
            folder = None
    if folder is not None:
        return {
            "size_on_disk_mb": folder_weight_bytes(folder) / 2**20,
            "size_on_disk_estimated": False,
        }
    return {"size_on_disk_mb": state_bytes(model) / 2**20, "size_on_disk_estimated": True}


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    data: str,
    seqlen: int,
    eval_windows: int | None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    text: str | None = None,
) -> dict[str, Any]:
    check_seqlen(model, seqlen)
    windows = eval_windows_for(tokenizer, data, seqlen, eval_windows, text)
    start = time.time()
    ppl = evaluate_perplexity(model, windows, batch_size=batch_size, progress=progress, desc=desc)
    return {**ppl, "seqlen": seqlen, "eval_time_s": time.time() - start}


def recorded_source(model_spec: str) -> str | None:
    """The model a pruned folder came from (its ``report.json``), if any."""
    import json
    from pathlib import Path

    report = Path(model_spec) / "report.json"
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text())["settings"]["model"]
    except (ValueError, KeyError, TypeError):
        return None


def size_and_params(model_spec: str) -> dict[str, Any]:
    model, _ = load_model(model_spec, with_tokenizer=False)
    return {"model": model_spec, **count_parameters(model), **model_size(model, model_spec)}


def speed_report(
    model_spec: str, baseline: str | None, rounds: int = 3, threads: int | None = None,
    progress: bool = True, new_tokens: int = 64, counts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Speed keys of the model and, side by side in the same run, of its baseline.

    ``counts``: the model's parameter counts and size on disk when the caller has them already
    (otherwise the model is loaded once more to count them)."""
    from llm_surgeon.evaluate.speed import SPEED_KEYS, measure_speed

    specs = [model_spec] + ([baseline] if baseline else [])
    measured = measure_speed(specs, rounds=rounds, threads=threads, progress=progress,
                             new_tokens=new_tokens)
    out: dict[str, Any] = dict(measured[0])
    if baseline:
        base = {**size_and_params(baseline), **measured[1]}
        mine = counts if counts is not None else size_and_params(model_spec)
        out["baseline"] = base
        ratio_keys = (*SPEED_KEYS, "size_on_disk_mb", "params_total", "params_decoder_linear")
        merged = {**mine, **measured[0]}
        out["vs_baseline"] = {k: merged[k] / base[k] for k in ratio_keys if base.get(k)}
    return out


def evaluate_model(
    model_spec: str,
    data: str = "sotu",
    seqlen: int = 512,
    eval_windows: int | None = 64,
    batch_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    speed: bool = False,
    baseline: str | None = None,
    speed_rounds: int = 3,
    threads: int | None = None,
    tasks: str | None = None,
    tasks_limit: int | None = None,
) -> dict[str, Any]:
    if eval_windows is not None and eval_windows <= 0:
        raise UserError(f"--eval-windows must be positive (got {eval_windows})")
    text = load_text(data, "test")  # fail on a missing file before loading a model
    model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    result: dict[str, Any] = {"model": model_spec, "data": data}
    result.update(
        evaluate_loaded(
            model, tokenizer, data, seqlen, eval_windows, batch_size, progress, text=text
        )
    )
    result.update(count_parameters(model))
    result.update(model_size(model, model_spec))
    if tasks:
        from llm_surgeon.evaluate.zeroshot import expand_tasks, zero_shot

        result["tasks"] = zero_shot(model, tokenizer, expand_tasks(tasks), batch_size=8,
                                    limit=tasks_limit)
    if speed:
        del model
        baseline = baseline or recorded_source(model_spec)
        result.update(speed_report(model_spec, baseline, speed_rounds, threads, progress,
                                   counts=result))
    return result
