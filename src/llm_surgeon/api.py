"""What a Python user calls: :func:`prune_model` on a model already in memory.

The command line's ``prune`` loads a model by name and runs the same driver
(:func:`llm_surgeon.driver.prune`); this entry point takes the model object instead, and needs
no output folder. No heavy import at module level (``import llm_surgeon`` stays quick).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llm_surgeon.errors import UserError

# run settings prune_model fixes itself (from the model in memory and its arguments)
_FIXED = {"model", "method", "structure", "sparsity", "shots", "output", "eval", "eval_data",
          "dtype", "device", "max_memory", "calib_data", "seqlen", "calib_samples",
          "validation"}


@dataclass
class PruneResult:
    """What :func:`prune_model` returns.

    ``model``: the pruned model (the object passed in, changed in place; for heads-channels
    its modules are physically smaller). ``report``: the run's report, the same fields as a
    ``prune --output`` folder's ``report.json`` (``sparsity_target``, ``sparsity_achieved``,
    ``ppl_dense``, ``ppl``, ``shots``, ``layers``, ``settings``, ``phases``, ...).
    ``output``: where it was saved, or None."""

    model: Any
    report: dict[str, Any] = field(repr=False)
    output: Path | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of the decoder-linear weights (and biases) that are zero."""
        return float(self.report["sparsity_achieved"])

    @property
    def ppl(self) -> float | None:
        """Perplexity after pruning (None without ``eval_data``)."""
        return self.report.get("ppl")

    @property
    def ppl_dense(self) -> float | None:
        """Perplexity before pruning (None without ``eval_data``)."""
        return self.report.get("ppl_dense")


def prune_model(model: Any, tokenizer: Any, text_or_windows: Any, method: str = "surgeon",
                structure: Any = "unstructured", sparsity: float | None = None,
                shots: int = 5, *, calib_samples: int = 32, seqlen: int = 512,
                eval_data: Any = None, eval_windows: int = 64, output: str | Path | None = None,
                progress: bool = False, **method_settings: Any) -> PruneResult:
    """Prune a causal LM already in memory; return the pruned model and the report.

    Arguments:
        model: a ``transformers`` causal LM (any family ``llm-surgeon prune`` supports),
            pruned in place, on whatever device and dtype it is.
        tokenizer: its tokenizer (used to tokenize text, and saved with ``output``).
        text_or_windows: calibration data: a string (``calib_samples`` windows of ``seqlen``
            tokens are cut from it at seeded random offsets), or a LongTensor of token ids of
            shape (windows, tokens), used as is.
        method: "surgeon" (default) | "k-obd" | "l-obd" | "magnitude" (global, multi-shot) |
            "sparsegpt" | "wanda" | "maiht" (layer-wise, one pass) | "numerical"
            (heads-channels only) | the name of a method registered with
            :func:`llm_surgeon.methods.registry.register_method`.
        structure: "unstructured" (default) | "N:M" such as "2:4" | "rows-columns" |
            "heads-channels" | a registered structure's name (or a
            :class:`llm_surgeon.structures.Structure` object).
        sparsity: fraction of the decoder-linear weights to remove, in [0, 1); None: 0.5, or
            1 - N/M for N:M.
        shots: pruning shots of a global method, on the linear schedule (default 5; layer-wise
            methods run one pass).
        calib_samples, seqlen: windows and tokens per window cut from calibration text
            (defaults 32 and 512; ignored for a tensor of windows).
        eval_data: None (default: no perplexity), a string (its non-overlapping windows of
            ``seqlen`` tokens, at most ``eval_windows``) or a LongTensor of windows: the
            report's ``ppl_dense`` and ``ppl`` are measured on it before and after.
        output: optional folder to save the pruned model and ``report.json`` in (atomically;
            one of our own outputs or a new path).
        progress: show progress bars.
        **method_settings: the method's settings by name (surgeon: ``damp_g``, ``damp_a``,
            ``max_correlate``; sparsegpt: ``blocksize``, ``percdamp``; maiht: ``mu``,
            ``iht_iters``, ``refine_iters``, ``step`` (or ``maiht_mu``, ...); numerical:
            ``percdamp``; ``lowrank_rank``, ``lowrank_steps``, ``lowrank_lr``), and the run's
            other settings under their command-line names: ``seed``, ``batch_size``,
            ``fisher``, ``nearest_kronecker``, ``curvature_pass``, ``channel_multiple``,
            ``layer_sizes``, ``unit_coupling``, ``unit_ranking``, ``kind_allocation``,
            ``eval_every_shot``, ``time_plain_pass``, ``offload_dir``.

    Returns:
        :class:`PruneResult` with ``model``, ``report``, ``output`` (and ``sparsity``,
        ``ppl``, ``ppl_dense`` read from the report).

    Raises:
        llm_surgeon.UserError: a bad setting, an unknown method or structure, a method that
        does not support the structure, a model it cannot cut (one-line message).

    Example::

        import llm_surgeon
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        text = open("calibration.txt").read()
        result = llm_surgeon.prune_model(model, tokenizer, text, method="surgeon",
                                         structure="2:4", shots=3, eval_data=text)
        print(result.sparsity, result.ppl_dense, "->", result.ppl)
        pruned = result.model   # the same object, pruned in place
    """
    import torch

    from llm_surgeon.config import PruneConfig, RunConfig
    from llm_surgeon.data.windows import calibration_windows, evaluation_windows, tokenize
    from llm_surgeon.driver import prune_loaded
    from llm_surgeon.evaluate.runner import check_seqlen
    from llm_surgeon.io import check_output_path_usable
    from llm_surgeon.methods.registry import method_class
    from llm_surgeon.settings import LowRankSettings
    from llm_surgeon.structures import parse_structure

    shape = parse_structure(structure)
    try:  # the run's record names the structure; that name must give back the same one
        named = parse_structure(str(shape))
    except UserError:
        named = None
    if named != shape:
        raise UserError(f"prune_model: structure {shape!r} is not registered under {str(shape)!r}"
                        ": register its class with llm_surgeon.structures.register_structure")
    plugin = method_class(method)
    # the run's own settings, and the low-rank correction between shots (any global method)
    run_keys = ({f.name for f in fields(RunConfig)} - _FIXED) | {
        key for key, _ in LowRankSettings.declared()}
    run_settings: dict[str, Any] = {}
    knobs: dict[str, Any] = {}
    for key, value in method_settings.items():
        name = plugin.Settings.accepts(key)
        if name is not None:
            knobs[name] = value
        elif key in run_keys:
            run_settings[key] = value
        else:
            raise UserError(f"prune_model: unknown setting {key!r} for method {method!r} "
                            f"(its settings: {', '.join(k for k, _ in plugin.Settings.declared())}"
                            "; or a run setting such as seed, batch_size, fisher)")
    settings = plugin.Settings(**knobs)
    settings.check()
    given = isinstance(text_or_windows, torch.Tensor) and text_or_windows.ndim == 2
    if not (given or isinstance(text_or_windows, str)):
        raise UserError("prune_model: text_or_windows must be a string or a 2-D tensor of "
                        "token ids (windows, tokens)")
    if given:
        calib_samples, seqlen = int(text_or_windows.shape[0]), int(text_or_windows.shape[1])
    given_eval = eval_data is not None and not isinstance(eval_data, str)
    ev = torch.as_tensor(eval_data).long() if given_eval else None
    if ev is not None and (ev.ndim != 2 or ev.shape[0] == 0 or ev.shape[1] < 2):
        raise UserError("prune_model: eval_data must be a string or a 2-D tensor of token ids "
                        f"(windows, tokens), at least 2 tokens each; got shape {tuple(ev.shape)}")
    param = next(model.parameters())
    record = {**settings.record(), **run_settings}
    cfg = PruneConfig(
        model=str(getattr(model.config, "_name_or_path", "") or "in-memory"), method=method,
        structure=str(shape), sparsity=sparsity, shots=shots, calib_data="in-memory",
        calib_samples=calib_samples, seqlen=seqlen, eval=eval_data is not None,
        eval_data="in-memory", eval_windows=int(ev.shape[0]) if ev is not None else eval_windows,
        dtype=str(param.dtype).removeprefix("torch."), device=str(param.device),
        output=None if output is None else str(output),
        **{k: v for k, v in record.items() if k in {f.name for f in fields(PruneConfig)}})
    cfg.validate()  # every number in range; the method supports the structure
    if given:
        windows = text_or_windows.long()
    else:
        windows = calibration_windows(tokenize(tokenizer, text_or_windows), calib_samples,
                                      seqlen, seed=cfg.seed)
    if isinstance(eval_data, str):
        ev = evaluation_windows(tokenize(tokenizer, eval_data), seqlen, eval_windows)
    if output is not None:
        check_output_path_usable(str(output))
    if ev is not None:
        check_seqlen(model, int(ev.shape[1]))
    report = prune_loaded(model, tokenizer, windows, cfg, plugin(settings), shape,
                          eval_windows=ev, progress=progress)
    return PruneResult(model, report, None if output is None else Path(output))
