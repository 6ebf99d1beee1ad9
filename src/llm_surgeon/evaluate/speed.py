"""What a smaller model buys: prefill and decode throughput and peak memory, measured fairly.

Every measurement runs in a **fresh Python process** (``python -m llm_surgeon.evaluate.speed``)
so that its peak resident memory (``VmHWM``) belongs to that model alone and no allocator state
carries over. Models compared side by side are measured in alternating rounds (A B A B …) and
each figure is the median over rounds, so that drift of a busy machine hits both alike.

Per process:

* ``prefill_tok_s``: tokens/s of one forward pass over a batch-1 prompt of ``prefill_len``
  tokens (no cache);
* ``decode_tok_s_b1`` / ``decode_tok_s_b8``: greedy decoding with the KV cache, batch 1 and 8:
  after a ``prompt_len``-token prefill (not timed), ``new_tokens`` single-token steps;
  tokens/s counts every sequence of the batch;
* ``peak_mem_mb``: the process's peak resident set (weights, activations, KV cache and the
  Python / torch runtime, which is the same for every model).

Inputs are random token ids (seeded): throughput does not depend on the text.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.size import peak_rss_mb

SPEED_KEYS = ("decode_tok_s_b1", "decode_tok_s_b8", "prefill_tok_s", "peak_mem_mb")


@torch.inference_mode()
def decode_tokens_per_s(model: Any, batch: int, prompt_len: int, new_tokens: int,
                        seed: int = 0) -> float:
    """Greedy decoding throughput with the KV cache (tokens/s over all sequences)."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    elapsed = time.perf_counter() - start
    return batch * new_tokens / elapsed


@torch.inference_mode()
def prefill_tokens_per_s(model: Any, prefill_len: int, seed: int = 0) -> float:
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prefill_len), generator=gen).to(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return prefill_len / (time.perf_counter() - start)


def measure_in_process(spec: str, prefill_len: int, prompt_len: int, new_tokens: int,
                       threads: int | None, dtype: str = "float32") -> dict[str, float]:
    """One measurement of one model in the current process (the child's job)."""
    from llm_surgeon.models.load import load_model

    if threads:
        torch.set_num_threads(threads)
    from llm_surgeon.models.layouts import layout_for

    model, _ = load_model(spec, dtype=dtype, with_tokenizer=False)
    limit = layout_for(model).max_positions(model.config)
    if limit is not None:  # short-context models: shorten the prompts, never overflow
        prefill_len = min(prefill_len, limit)
        prompt_len = min(prompt_len, max(1, limit - new_tokens))
        new_tokens = min(new_tokens, limit - prompt_len)
    decode_tokens_per_s(model, 1, 8, 4)  # warm-up: first calls allocate and pick kernels
    prefill_tokens_per_s(model, min(prefill_len, 32))
    return {
        "prefill_tok_s": prefill_tokens_per_s(model, prefill_len),
        "decode_tok_s_b1": decode_tokens_per_s(model, 1, prompt_len, new_tokens),
        "decode_tok_s_b8": decode_tokens_per_s(model, 8, prompt_len, new_tokens),
        "peak_mem_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "prefill_len": prefill_len,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
    }


def _run_child(spec: str, settings: dict[str, Any]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "llm_surgeon.evaluate.speed", spec, json.dumps(settings)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"speed measurement of {spec} failed: {tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_speed(
    specs: list[str],
    rounds: int = 3,
    prefill_len: int = 512,
    prompt_len: int = 64,
    new_tokens: int = 64,
    threads: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Speed and peak memory of every model in ``specs``, measured in alternating rounds of
    fresh processes; returns per spec the median of each key over rounds (and ``rounds``)."""
    if rounds < 1:
        raise UserError("--speed-rounds must be positive")
    settings = {"prefill_len": prefill_len, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "threads": threads, "dtype": dtype}
    samples: list[list[dict[str, float]]] = [[] for _ in specs]
    from tqdm.auto import tqdm

    steps = [(r, i) for r in range(rounds) for i in range(len(specs))]
    for _, i in tqdm(steps, desc="speed", disable=not progress):
        samples[i].append(_run_child(specs[i], settings))
    results = []
    for runs in samples:
        med = {k: statistics.median(r[k] for r in runs) for k in SPEED_KEYS}
        med["rounds"] = len(runs)
        for k in ("threads", "prefill_len", "prompt_len", "new_tokens"):
            med[k] = runs[0][k]
        results.append(med)
    return results


if __name__ == "__main__":  # the child process of measure_speed
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _settings = json.loads(sys.argv[2])
    print(json.dumps(measure_in_process(sys.argv[1], **_settings)))
