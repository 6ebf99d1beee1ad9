"""Speed and memory measurement: fresh processes, side by side with a baseline."""

from __future__ import annotations

import json

import torch

from llm_surgeon.cli import main
from llm_surgeon.evaluate.speed import SPEED_KEYS, decode_tokens_per_s
from tests.conftest import tiny_model


def test_decode_loop_matches_generate():
    """The timed greedy loop is real decoding: its tokens equal transformers' generate."""
    import llm_surgeon.evaluate.speed as speed

    model = tiny_model("llama")
    seen = []
    orig = model.forward

    def spy(*a, **kw):
        out = orig(*a, **kw)
        seen.append(out.logits[:, -1].argmax(-1))
        return out

    model.forward = spy
    decode_tokens_per_s(model, 2, 5, 6, seed=3)
    model.forward = orig
    greedy = torch.stack(seen[:6], 1)  # prefill's next token, then 5 decode steps
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=gen)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, 5:]
    assert torch.equal(greedy, ref)
    assert speed.prefill_tokens_per_s(model, 16) > 0


def test_eval_speed_reports_model_and_baseline(tiny_model_dirs, sample_text_file, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["-q", "eval", "--model", str(tiny_model_dirs["opt"]), "--data",
               str(sample_text_file), "--seqlen", "32", "--eval-windows", "2", "--speed",
               "--baseline", str(tiny_model_dirs["llama"]), "--speed-rounds", "1",
               "--threads", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in (*SPEED_KEYS, "size_on_disk_mb"):
        assert res[key] > 0 and res["baseline"][key] > 0
    assert res["baseline"]["model"] == str(tiny_model_dirs["llama"])
    assert res["vs_baseline"]["decode_tok_s_b1"] == res["decode_tok_s_b1"] / res["baseline"][
        "decode_tok_s_b1"]
    assert res["threads"] == 1
