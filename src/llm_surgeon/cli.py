"""The ``llm-surgeon`` command line: parse, validate, call; no math here.

Every bad input ends as one line ``llm-surgeon: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from llm_surgeon.errors import UserError

EPILOG_EVAL = """\
examples:
  llm-surgeon eval                                   # bundled SmolLM2-135M on bundled text
  llm-surgeon eval --model smollm2-135m --data sotu --seqlen 512 --eval-windows 64 --json out.json
  llm-surgeon eval --model ./pruned --data my_text.txt
  llm-surgeon eval --model facebook/opt-125m --data wikitext2 --seqlen 2048   # online
  llm-surgeon eval --model out/hc30 --speed --json speed.json   # + tokens/s, memory vs dense

perplexity follows the SparseGPT protocol: the text is tokenized at once without special tokens,
cut into non-overlapping windows of --seqlen tokens, and ppl = exp(mean token NLL).
"""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


EPILOG_PRUNE = """\
examples:
  llm-surgeon prune --method surgeon --structure unstructured --sparsity 0.5 --output out/s50
  llm-surgeon prune --method surgeon --structure 2:4 --shots 5 --output out/s24
  llm-surgeon prune --method surgeon --structure rows-columns --sparsity 0.2 --output out/rc20
  llm-surgeon prune --method surgeon --structure heads-channels --sparsity 0.3 --output out/hc30
  llm-surgeon eval --model out/hc30 --speed        # smaller and faster: side by side with dense
  llm-surgeon prune --method k-obd --structure unstructured --sparsity 0.5 --output out/kobd
  llm-surgeon prune --model facebook/opt-125m --calib-data c4 --eval-data wikitext2 --paper \\
      --device cuda --output out/opt                                  # the paper's settings

LLM Surgeon: curvature F = G (x) A per linear (A = E[a a^T] of inputs, G = E[g g^T] of output
gradients), closed-form removal costs and correlated updates, one global threshold over all
layers, T shots on a linear schedule with curvature re-estimated before each shot.
K-OBD / L-OBD / magnitude rank by the cost of zeroing under G (x) A, I (x) A, I (x) I and never
update the remaining weights.
"""


def _number(text: str) -> float:
    """A finite float (NaN and ±inf are refused here; each setting's range in config.py)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with status 2 (its default) and our prefix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"llm-surgeon: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="bundled default 'smollm2-135m', a local HF folder, a .gguf file, or a "
        "Hugging Face id (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", default="float32", help="weights dtype for computation (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="sotu",
        help="evaluation text: 'sotu' (bundled), a text file, or wikitext2/ptb/c4 "
        "(online); its test split is used (default: %(default)s)",
    )
    p.add_argument(
        "--seqlen",
        type=_positive_int,
        default=512,
        help="tokens per window (default: %(default)s; the papers use 2048)",
    )
    p.add_argument(
        "--eval-windows",
        type=_positive_int,
        default=64,
        help="cap on the number of non-overlapping evaluation windows (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1,
        help="windows per forward pass (default: %(default)s)",
    )


_FLAG_TYPES = {"positive-int": _positive_int, "integer": _integer, "number": _number}


def add_method_flags(pr: argparse.ArgumentParser) -> None:
    """One flag per method setting, generated from the settings classes of ``settings.py``
    (name, type, default, help; a key two methods share, ``--percdamp``, once); each class
    with a ``title`` gets its own group. Ranges are checked in ``config.py``."""
    from llm_surgeon.settings import BUILTIN_SETTINGS

    groups: dict[str | None, Any] = {None: pr}
    seen: set[str] = set()
    for cls in BUILTIN_SETTINGS:
        for key, f in cls.declared():
            if key in seen:
                continue
            seen.add(key)
            if cls.title not in groups:
                groups[cls.title] = pr.add_argument_group(cls.title)
            meta = f.metadata
            extra: dict[str, Any] = {"choices": meta["choices"]} if meta["choices"] else {}
            if meta["metavar"]:
                extra["metavar"] = meta["metavar"]
            groups[cls.title].add_argument(
                "--" + key.replace("_", "-"), dest=key, default=f.default,
                type=_FLAG_TYPES.get(meta["kind"]), help=meta["help"], **extra)


def build_parser() -> argparse.ArgumentParser:
    from llm_surgeon.config import PruneConfig
    from llm_surgeon.unit_options import KIND_ALLOCATIONS, UNIT_COUPLINGS, UNIT_RANKINGS

    _D = PruneConfig()
    parser = _Parser(
        prog="llm-surgeon",
        description="Make large language models smaller after training: LLM Surgeon, "
        "Numerical pruning, mAIHT and the standard baselines, with evaluation.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    ev = sub.add_parser(
        "eval",
        help="perplexity, parameters and size of a model",
        description="Evaluate a model: perplexity (SparseGPT protocol), "
        "parameter counts and size on disk.",
        epilog=EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(ev)
    _add_eval_data_args(ev)
    ev.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ev.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="zero-shot accuracy with lm-evaluation-harness: 'offline' (the bundled tasks "
        "sotu_lastword, sotu_cloze) or harness task names such as boolq,piqa,hellaswag,"
        "winogrande,arc_easy,arc_challenge,openbookqa,rte (these need the hub)",
    )
    ev.add_argument(
        "--tasks-limit",
        type=_positive_int,
        metavar="N",
        help="evaluate at most N examples per task (default: all)",
    )
    ev.add_argument(
        "--speed",
        action="store_true",
        help="also measure prefill and decode tokens/s (batch 1 and 8) and peak memory, each "
        "in a fresh process, next to the baseline model in the same run",
    )
    ev.add_argument(
        "--baseline",
        metavar="MODEL",
        help="the dense model to compare with under --speed (default: the model a pruned "
        "folder's report.json names)",
    )
    ev.add_argument(
        "--speed-rounds",
        type=_positive_int,
        default=3,
        help="alternating measurement rounds, medians reported (default: %(default)s)",
    )
    ev.add_argument(
        "--threads", type=_positive_int, help="torch threads for --speed (default: torch's)"
    )
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser(
        "prune",
        help="prune a model and save it with a report",
        description="Prune the decoder linears of a causal LM to a target sparsity in several "
        "shots, then save the model (Hugging Face format, safetensors) and "
        "DIR/report.json.",
        epilog=EPILOG_PRUNE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(pr)
    pr.add_argument(
        "--method",
        default=_D.method,
        help="global, multi-shot: surgeon | k-obd | l-obd | magnitude; layer-wise, one pass: "
        "sparsegpt | wanda | maiht (default: %(default)s)",
    )
    pr.add_argument(
        "--structure",
        default=_D.structure,
        help="unstructured | N:M (e.g. 2:4, 4:8) | rows-columns | heads-channels (attention "
        "heads in whole KV groups and MLP channels, physically removed) (default: %(default)s)",
    )
    pr.add_argument(
        "--sparsity",
        type=_fraction,
        default=None,
        help="fraction of decoder-linear weights (and biases) to remove, in [0, 1) "
        "(default: 0.5; N:M fixes it at 1-N/M)",
    )
    pr.add_argument(
        "--shots",
        type=_positive_int,
        default=_D.shots,
        help="pruning shots on the linear schedule t*sparsity/T; curvature is "
        "re-estimated before each (default: %(default)s; the paper uses 40)",
    )
    pr.add_argument(
        "--calib-data",
        default=_D.calib_data,
        help="calibration text (its train split): sotu, a text file, or "
        "wikitext2/ptb/c4 (default: %(default)s)",
    )
    pr.add_argument(
        "--calib-samples",
        type=_positive_int,
        default=_D.calib_samples,
        help="calibration windows (default: %(default)s; the paper uses 128)",
    )
    pr.add_argument(
        "--seqlen",
        type=_positive_int,
        default=_D.seqlen,
        help="tokens per calibration and evaluation window (default: %(default)s; "
        "the paper uses 2048)",
    )
    pr.add_argument(
        "--nearest-kronecker",
        type=_integer,
        default=_D.nearest_kronecker,
        metavar="ITERS",
        help="estimate G⊗A as the Kronecker product nearest to the per-window Fisher, by ITERS "
        "power iterations from the K-FAC factors (one extra pass each; 0 = K-FAC, the default)",
    )
    pr.add_argument("--seed", type=_integer, default=_D.seed,
                    help="seed of calibration windows etc., in [0, 2**32) (default: %(default)s)")
    pr.add_argument(
        "--fisher",
        choices=("empirical", "sampled"),
        default=_D.fisher,
        help="gradients from true next tokens (empirical) or labels sampled from "
        "the model (sampled) (default: %(default)s)",
    )
    add_method_flags(pr)
    hc = pr.add_argument_group("heads-channels shapes")
    hc.add_argument(
        "--channel-multiple", type=_positive_int, default=None, metavar="K",
        help="every layer keeps a multiple of K MLP channels, at least K (default: 32, the "
        "quantization block of llama.cpp's Q8_0/Q4_0; 256 for K-quants; 1: any width)",
    )
    hc.add_argument(
        "--layer-sizes", choices=("global", "uniform"), default=_D.layer_sizes,
        help="global: one threshold over all layers, per-layer sizes (load with llm_surgeon."
        "load or export to GGUF); uniform: every layer loses the same number of KV groups and "
        "channels, so plain transformers and any standard runtime load it (default: "
        "%(default)s)",
    )
    hc.add_argument(
        "--unit-coupling", choices=UNIT_COUPLINGS, default=_D.unit_coupling,
        help="consumer: only the o/down columns are costed and updated (the surgeon's column "
        "update reads only A: Numerical pruning's compensation after the surgeon's selection), "
        "the q/k/v/gate/up rows are zeroed without an update; layers: a unit's cost is the sum "
        "of every linear's share (q/k/v/o, gate/up/down), each linear updated on its own, which "
        "counts one decision twice (20%% on the bundled model: validation perplexity 33.9 "
        "against 43.4, bench/ablation) (default: %(default)s)",
    )
    hc.add_argument(
        "--unit-ranking", choices=UNIT_RANKINGS, default=_D.unit_ranking,
        help="how units of different sizes meet in the threshold: per-parameter (cost / "
        "parameters), cost (raw cost), standardized (z-score of the cost per parameter within "
        "each layer and kind, as Numerical pruning and FLAP rank) (default: %(default)s)",
    )
    hc.add_argument(
        "--kind-allocation", choices=KIND_ALLOCATIONS, default=_D.kind_allocation,
        help="global: KV groups and MLP channels in one threshold; proportional: each kind "
        "loses the target fraction of its own parameters (one threshold per kind, over all "
        "layers) (default: %(default)s)",
    )
    st = pr.add_argument_group("large models")
    st.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget such as 2GB or 512MiB: decoder layers stay on disk and are "
        "streamed one at a time (forward, then a backward that recomputes each layer), hidden "
        "states between layers go to disk; the interpreter itself (~0.4 GB) comes on top. The "
        "output is a sharded safetensors checkpoint (default: everything in memory)",
    )
    st.add_argument(
        "--offload-dir",
        metavar="DIR",
        help="where streamed layers and hidden states are kept during the run, removed after "
        "(default: the llm-surgeon cache folder)",
    )
    pr.add_argument(
        "--batch-size",
        type=_positive_int,
        default=_D.batch_size,
        help="windows per forward/backward pass (default: %(default)s)",
    )
    pr.add_argument(
        "--eval-data",
        default=None,  # None: PruneConfig's default; told apart so --validation can refuse it
        help=f"evaluation text (its test split) (default: {_D.eval_data})",
    )
    pr.add_argument(
        "--eval-windows",
        type=_positive_int,
        default=_D.eval_windows,
        help="evaluation windows (default: %(default)s)",
    )
    pr.add_argument(
        "--eval-every-shot", action="store_true", help="also measure perplexity after every shot"
    )
    pr.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluations")
    pr.add_argument("--validation", action="store_true",
                    help="measure perplexity on a validation split instead of the test text: "
                         "the last --eval-windows x --seqlen tokens of the calibration text "
                         "(its train split), which calibration then never draws from; for "
                         "choosing settings without tuning on the test text")
    pr.add_argument("--curvature-pass", choices=("sweep", "hooks"), default="sweep",
                    help="K-FAC statistics by a layer-by-layer sweep (one layer's factors in "
                         "memory at a time; the default, any store) or by hooks over one "
                         "whole-model backward per batch (faster: no recomputed forward; "
                         "holds every layer's factor sums; not with --max-memory)")
    pr.add_argument("--time-plain-pass", action="store_true",
                    help="also time one plain forward+backward pass over the calibration set "
                         "and report the first shot's cost as a ratio of it")
    pr.add_argument(
        "--paper",
        action="store_true",
        help="the paper's settings: 128 x 2048 calibration tokens, 40 shots, "
        "seqlen 2048 (for GPU users)",
    )
    pr.add_argument(
        "--output",
        metavar="DIR",
        help="folder for the pruned model and report.json (written atomically); while the run "
        "lasts it holds DIR/checkpoint/, rewritten after every shot",
    )
    pr.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the killed run whose --output was DIR, with the settings it recorded "
        "(every other option is ignored)",
    )
    pr.set_defaults(func=cmd_prune)

    be = sub.add_parser(
        "bench",
        help="run a matrix of prune runs (resumable) and tabulate them",
        description="Run every prune job of a YAML config on one model and data set. Finished "
        "runs are kept in DIR/runs/ and skipped when the command is run again, so "
        "an interrupted matrix resumes. Writes DIR/results.csv, .json and .md.",
    )
    be.add_argument("--config", metavar="FILE",
                    help="YAML matrix (see bench/); or give the matrix with the flags below")
    be.add_argument("--output", required=True, metavar="DIR", help="results folder")
    be.add_argument("--methods", metavar="M1,M2", help="methods of the matrix")
    be.add_argument("--structures", metavar="S1,S2", default="unstructured",
                    help="structures of the matrix, e.g. unstructured,2:4,rows-columns "
                    "(default: %(default)s)")
    be.add_argument("--sparsities", metavar="X1,X2", default="0.5",
                    help="sparsity levels (ignored for N:M) (default: %(default)s)")
    be.add_argument("--shots", type=_positive_int, default=5,
                    help="shots of the global methods (default: %(default)s)")
    be.add_argument("--model", default=None, help="model (default: the bundled default)")
    be.add_argument("--calib-data", default=None, help="calibration text (default: sotu)")
    be.add_argument("--eval-data", default=None, help="evaluation text (default: sotu)")
    be.add_argument("--calib-samples", type=_positive_int, default=None)
    be.add_argument("--seqlen", type=_positive_int, default=None)
    be.add_argument("--eval-windows", type=_positive_int, default=None)
    be.add_argument("--tabulate-only", action="store_true",
                    help="only tabulate the runs finished so far; run nothing")
    be.set_defaults(func=cmd_bench)

    rp = sub.add_parser(
        "report",
        help="markdown summary with plots of a prune or bench folder",
        description="Turn a run's JSON into RUN_DIR/summary.md with figures in RUN_DIR/plots/: "
        "for a pruned model, sparsity by layer and module type and perplexity per shot; for a "
        "bench folder, perplexity against sparsity per method.",
    )
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a prune --output or bench --output")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser(
        "export",
        help="write a (pruned) Llama-family model as GGUF for llama.cpp",
        description="Export a model folder (dense, sparse, or physically shrunk with per-layer "
        "sizes) or the bundled default to one GGUF file for llama.cpp. Layers of different "
        "sizes are written as llama.cpp's 'deci' architecture. Quantized types use llama.cpp's "
        "quantizer (pip install 'llm-surgeon[llamacpp]', which compiles llama.cpp).",
    )
    ex.add_argument("model", metavar="DIR", help="a prune --output folder, a Hugging Face "
                    "folder, or the bundled default (smollm2-135m)")
    ex.add_argument("--gguf", required=True, metavar="OUT.gguf", help="file to write")
    ex.add_argument("--type", default="f16", metavar="TYPE",
                    help="f32 | f16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k_m | q6_k | ... "
                    "(default: %(default)s)")
    ex.set_defaults(func=cmd_export)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from llm_surgeon.export.gguf import export_gguf

    info = export_gguf(args.model, args.gguf, args.type)
    print(f"wrote {args.gguf} ({info['architecture']}, {info['type']}, "
          f"{info['bytes'] / 1e6:.1f} MB, {len(info['layers'])} layers)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llm_surgeon.report.summary import write_summary

    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir} is not a folder (a prune --output or bench --output)")

    path = write_summary(args.run_dir)
    print(f"wrote {path}")
    return 0


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (exclusive temporary file, fsync, rename)."""
    from llm_surgeon.io import atomic_write

    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _print_speed(result: dict[str, Any]) -> None:
    rows = [("prefill tok/s (b1)", "prefill_tok_s", ".1f"),
            ("decode tok/s (b1)", "decode_tok_s_b1", ".1f"),
            ("decode tok/s (b8)", "decode_tok_s_b8", ".1f"),
            ("peak memory MB", "peak_mem_mb", ".0f"),
            ("size on disk MB", "size_on_disk_mb", ".1f"),
            ("params total", "params_total", ",")]
    base = result.get("baseline")
    print(f"{'':22}{'this model':>14}" + (f"{'baseline':>14}{'ratio':>8}" if base else ""))
    for label, key, fmt in rows:
        line = f"{label:22}{format(result[key], fmt):>14}"
        if base:
            line += f"{format(base[key], fmt):>14}{result[key] / base[key]:>8.2f}"
        print(line)
    if base:
        print(f"baseline: {base['model']} (measured in the same run, "
              f"{result['rounds']} alternating rounds, medians)")


EVAL_BOUNDS = {"seqlen": (2, 1_048_576), "eval_windows": (1, 1_000_000),
               "batch_size": (1, 65_536), "tasks_limit": (1, 10**9), "speed_rounds": (1, 1000),
               "threads": (1, 4096)}


def check_eval_args(args: argparse.Namespace) -> None:
    """Everything ``eval`` can check before loading a model: numbers, device, dtype, the JSON
    path, the task names."""
    from llm_surgeon.io import check_output_file
    from llm_surgeon.models.load import check_device, parse_dtype

    for name, (lo, hi) in EVAL_BOUNDS.items():
        value = getattr(args, name)
        if value is not None and not lo <= value <= hi:
            raise UserError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {value}")
    check_device(args.device)
    parse_dtype(args.dtype)
    if args.json:
        check_output_file(args.json, "--json")
    if args.tasks:
        from llm_surgeon.evaluate.zeroshot import check_tasks, expand_tasks

        check_tasks(expand_tasks(args.tasks))


def check_prune_args(args: argparse.Namespace, cfg: Any) -> None:
    """Everything ``prune`` can check before loading a model (a few seconds at most): the
    settings, the device and dtype, the output folder, the offload folder."""
    from llm_surgeon.io import check_creatable, check_output_path_usable
    from llm_surgeon.models.load import check_device, parse_dtype

    cfg.validate()
    check_device(cfg.device)
    parse_dtype(cfg.dtype)
    check_output_path_usable(args.output)
    if cfg.offload_dir:
        off = check_creatable(cfg.offload_dir, "--offload-dir").resolve()
        out = Path(args.output).expanduser().resolve()
        if off == out or out in off.parents or off in out.parents:
            raise UserError(f"--offload-dir {cfg.offload_dir} is, holds or lies inside --output "
                            f"{args.output}; keep the two apart")


SHORTFALL = 0.01  # how far below the target a run may end without a warning


def warn_shortfall(report: dict[str, Any]) -> None:
    """A target the structure could not reach (e.g. heads-channels at 0.9999: every layer keeps
    one KV group and one channel) is said on stderr, with the sparsity reached."""
    target, got = report.get("sparsity_target"), report.get("sparsity_achieved")
    if target is None or got is None or got >= target - SHORTFALL:
        return
    print(f"llm-surgeon: warning: --structure {report.get('structure')} could not reach the "
          f"target sparsity {target:.4f}; reached {got:.4f}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from llm_surgeon.evaluate.runner import evaluate_model

    check_eval_args(args)
    result = evaluate_model(
        model_spec=args.model,
        data=args.data,
        seqlen=args.seqlen,
        eval_windows=args.eval_windows,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
        speed=args.speed,
        baseline=args.baseline,
        speed_rounds=args.speed_rounds,
        threads=args.threads,
        tasks=args.tasks,
        tasks_limit=args.tasks_limit,
    )
    print(f"model                 {result['model']}")
    print(
        f"data                  {result['data']} ({result['windows']} windows x "
        f"{result['seqlen']} tokens)"
    )
    print(f"perplexity            {result['ppl']:.4f}")
    print(f"params total          {result['params_total']:,}")
    print(
        f"params decoder-linear {result['params_decoder_linear']:,} "
        f"({result['params_decoder_linear_nonzero']:,} nonzero)"
    )
    print(
        f"size on disk          {result['size_on_disk_mb']:.1f} MB"
        + (" (estimated from tensors)" if result.get("size_on_disk_estimated") else "")
    )
    for name, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
        print(f"zero-shot {name:12}{shown} ({int(metrics.get('n', 0))} examples)")
    if args.speed:
        _print_speed(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def config_from_args(args: argparse.Namespace) -> Any:
    """The PruneConfig of ``prune``'s parsed flags: every flag's ``dest`` is its setting's name
    (``--no-eval`` is ``eval=False``)."""
    from dataclasses import fields

    from llm_surgeon.config import PruneConfig

    given = vars(args)
    values = {f.name: given[f.name] for f in fields(PruneConfig) if f.name in given}
    values["eval"] = not args.no_eval
    if values.get("eval_data") is None:
        values.pop("eval_data", None)
    elif values.get("validation"):
        raise UserError("--validation measures perplexity on the calibration text's held-out "
                        "tail, so --eval-data would not be read; drop one of the two")
    return PruneConfig(**values)


def cmd_prune(args: argparse.Namespace) -> int:
    from llm_surgeon.driver import prune, strip_private

    if args.resume:
        from llm_surgeon.driver import resume
        from llm_surgeon.io import check_output_path_usable

        check_output_path_usable(args.resume, "--resume")
        report = strip_private(resume(args.resume, progress=not args.quiet))
        args.output = args.resume
        _print_prune(report, args.output)
        return 0
    if not args.output:
        raise UserError("prune needs --output DIR (or --resume DIR)")
    if args.paper:
        args.calib_samples, args.seqlen, args.shots = 128, 2048, 40
    cfg = config_from_args(args)
    check_prune_args(args, cfg)
    from llm_surgeon.driver import check_output_replaceable

    check_output_replaceable(Path(args.output), resuming=False)
    report = strip_private(prune(cfg, progress=not args.quiet))
    _print_prune(report, args.output)
    return 0


def _print_prune(report: dict[str, Any], output: str) -> None:
    print(f"method            {report['method']} ({report['structure']}, "
          f"{len(report['shots'])} shots)")
    print(
        f"sparsity          target {report['sparsity_target']:.4f}, achieved "
        f"{report['sparsity_achieved']:.4f}"
    )
    if report.get("ppl_dense") is not None:
        print(f"perplexity        dense {report['ppl_dense']:.3f} -> pruned {report['ppl']:.3f}")
    print(f"prune time        {report['prune_time_s']:.1f} s")
    if "shot_cost_ratio" in report:
        print(f"first shot        {report['shot_time_s']:.1f} s = {report['shot_cost_ratio']:.2f}"
              f" x one plain forward+backward ({report['plain_fwd_bwd_s']:.1f} s)")
    print(f"saved             {output} (report.json inside)")
    warn_shortfall(report)


def cmd_bench(args: argparse.Namespace) -> int:
    from llm_surgeon.bench import (
        bench,
        load_config,
        markdown_table,
        matrix_from_flags,
        summary_row,
    )
    from llm_surgeon.io import check_bench_folder

    check_bench_folder(args.output)
    if args.config and args.methods:
        raise UserError("bench takes --config FILE or --methods ..., not both")
    if args.config:
        config = load_config(args.config)
    elif args.methods:
        config = matrix_from_flags(args.methods, args.structures, args.sparsities, args.shots,
                                   model=args.model, calib_data=args.calib_data,
                                   eval_data=args.eval_data, calib_samples=args.calib_samples,
                                   seqlen=args.seqlen, eval_windows=args.eval_windows)
    else:
        raise UserError("bench needs --config FILE or --methods M1,M2 (see --help)")
    rows = bench(config, args.output, progress=not args.quiet,
                 run_missing=not args.tabulate_only)
    print(markdown_table([summary_row(r) for r in rows],
                         named=any(r.get("name") is not None for r in rows)), end="")
    return 0


def _on_sigterm() -> Any:
    """SIGTERM (``kill``, a scheduler's stop) ends a run like Ctrl-C: temporaries are removed
    and the last checkpoint stays. Returns the previous handler (None off the main thread)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    start = time.time()
    previous = _on_sigterm()
    try:
        code = int(args.func(args) or 0)
    except UserError as exc:
        from llm_surgeon.models.load import one_line

        print(f"llm-surgeon: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-surgeon: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    logging.getLogger(__name__).info("done in %.1fs", time.time() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
