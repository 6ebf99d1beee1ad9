"""The ``llm-surgeon`` command line: parse, validate, call; no math here.

Every bad input ends as one line ``llm-surgeon: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

perplexity follows the SparseGPT protocol: the text is tokenized at once without special tokens,
cut into non-overlapping windows of --seqlen tokens, and ppl = exp(mean token NLL).
"""


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


def build_parser() -> argparse.ArgumentParser:
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
    ev.set_defaults(func=cmd_eval)
    return parser


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_eval(args: argparse.Namespace) -> int:
    from llm_surgeon.evaluate.runner import evaluate_model

    result = evaluate_model(
        model_spec=args.model,
        data=args.data,
        seqlen=args.seqlen,
        eval_windows=args.eval_windows,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
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
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


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
    try:
        code = int(args.func(args) or 0)
    except UserError as exc:
        print(f"llm-surgeon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-surgeon: interrupted", file=sys.stderr)
        return 130
    logging.getLogger(__name__).info("done in %.1fs", time.time() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
