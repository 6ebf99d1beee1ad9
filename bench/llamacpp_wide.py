"""Decode speed-up against the bytes ratio on a wider model (issue 15's 0.95 target).

On the bundled 135M model a decode step has a large part that does not shrink with the weights
(``bench/llamacpp.py``: 25-37 % of the dense step), which caps the speed-up / bytes ratio near
0.91-0.94 however well the pruned tensors run. This checks the other side of that arithmetic: a
random-initialised Llama as wide as a 1B model (hidden 2048, MLP 5632, 32 heads, 4 KV groups,
8 layers, the bundled vocabulary, tied head), 30 % of its heads and channels removed by the
global magnitude threshold (uneven per-layer sizes: exported as ``deci``), dense and pruned f16
decoded step by step in turn, rounds of fresh processes at 1 and 2 threads (the protocol of
``bench/llamacpp.py``: :func:`llamacpp.measure_speed`). Random weights: speed only.

    .venv/bin/python bench/llamacpp_wide.py     # ~2 minutes, ~4 GB of temporary files

Writes ``bench/llamacpp/wide.json`` and ``bench/llamacpp/wide.md``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import NEW_TOKENS, PROMPT, ROUNDS, THREADS, measure_speed

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "llamacpp"
def make_models(folder: Path) -> tuple[dict[str, Path], str]:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import llm_surgeon
    from llm_surgeon.export.gguf import export_gguf
    from llm_surgeon.models.load import load_model

    torch.manual_seed(0)
    _, tok = load_model("smollm2-135m")
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, num_hidden_layers=8, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder / "dense")
    tok.save_pretrained(folder / "dense")
    windows = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    llm_surgeon.prune_model(model, tok, windows, method="magnitude", structure="heads-channels",
                            sparsity=0.3, shots=1, output=folder / "hc30")
    files = {}
    for name in ("dense", "hc30"):
        files[name] = folder / f"{name}.f16.gguf"
        export_gguf(str(folder / name), files[name], "f16")
    arch = gguf.GGUFReader(str(files["hc30"])).fields["general.architecture"]
    return files, bytes(arch.parts[arch.data[0]]).decode()


def main() -> None:
    from llm_surgeon.export.llamacpp import bytes_read_per_token

    with tempfile.TemporaryDirectory() as tmp:
        files, arch = make_models(Path(tmp))
        bytes_ = {n: bytes_read_per_token(files[n]) for n in files}
        speed = measure_speed({n: {"f16": p} for n, p in files.items()}, list(files),
                              types=("f16",))
    ratio = bytes_["dense"] / bytes_["hc30"]
    result = {"pruned_architecture": arch, "bytes_per_token": bytes_, "bytes_ratio": ratio,
              "load_average": os.getloadavg(), "speed": speed}
    lines = [
        "Decode speed-up against the bytes ratio on a 1B-wide random Llama (hidden 2048, MLP 5632,"
        " 32 heads, 4 KV groups, 8 layers, vocabulary 49152, tied head), 30 % of heads and "
        f"channels removed by the global magnitude threshold (exported as `{arch}`, per-layer "
        f"sizes), f16, {PROMPT}-token prompt then {NEW_TOKENS} steps, models decoded step by "
        f"step in turn, medians of {ROUNDS} rounds (`bench/llamacpp_wide.py`). Bytes read per "
        f"token: dense {bytes_['dense'] / 1e6:.0f} MB, pruned {bytes_['hc30'] / 1e6:.0f} MB "
        f"(ratio {ratio:.3f}).", "",
        "| threads | dense tok/s | pruned tok/s | speed-up | speed-up / bytes ratio |",
        "|---|---|---|---|---|"]
    for th in THREADS:
        d, p = (speed[f"f16|{th}|{n}"]["median"] for n in ("dense", "hc30"))
        lines.append(f"| {th} | {d:.1f} | {p:.1f} | {p / d:.3f} | {p / d / ratio:.3f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "wide.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "wide.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
