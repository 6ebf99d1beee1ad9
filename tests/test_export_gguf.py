"""GGUF export: conventions checked in closed form, and llama.cpp's logits against PyTorch."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon import load
from llm_surgeon.cli import main
from llm_surgeon.errors import UserError
from llm_surgeon.export.gguf import (
    LayerShape,
    architecture,
    export_gguf,
    permute_rope,
    validate_shapes,
)
from llm_surgeon.models.shrink import shrink_model
from llm_surgeon.models.units import unit_groups
from tests.conftest import tiny_model, tiny_tokenizer


def test_permute_rope_turns_rotate_half_into_interleaved_pairs():
    """Rotating q with HF's rotate-half equals rotating the permuted q with interleaved pairs,
    rows permuted the same way (so q·k scores are unchanged)."""
    d, heads, pos = 8, 3, 5
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(heads * d, generator=gen, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos * inv  # (d/2,)
    cos, sin = torch.cos(ang), torch.sin(ang)
    h = q.view(heads, d)
    x1, x2 = h[:, : d // 2], h[:, d // 2:]
    hf = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=1)  # rotate-half
    p = permute_rope(q, d).view(heads, d // 2, 2)
    a, b = p[..., 0], p[..., 1]
    inter = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(heads, d)
    assert torch.allclose(inter.reshape(-1), permute_rope(hf.reshape(-1), d))
    w = torch.randn(heads * d, 4, generator=gen)
    assert torch.equal(permute_rope(w, d)[:, 1], permute_rope(w[:, 1].contiguous(), d))


def test_validate_shapes_refuses_what_llama_cpp_aborts_on():
    validate_shapes([LayerShape(9, 3, 1024), LayerShape(6, 2, 32)])
    with pytest.raises(UserError, match="multiple"):
        validate_shapes([LayerShape(9, 3, 1024), LayerShape(5, 2, 64)])
    with pytest.raises(UserError, match="MLP width of 0"):
        validate_shapes([LayerShape(9, 3, 0)])
    assert architecture([LayerShape(9, 3, 64)] * 2) == "llama"
    assert architecture([LayerShape(9, 3, 64), LayerShape(6, 2, 64)]) == "deci"


def test_export_refuses_other_families(tiny_model_dirs, tmp_path, capsys):
    code = main(["export", str(tiny_model_dirs["opt"]), "--gguf", str(tmp_path / "o.gguf"),
                 "--type", "f32"])
    err = capsys.readouterr().err
    assert code == 2 and "Llama family" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.gguf").exists()


def _uneven_llama(folder, family="llama", **overrides):
    """A tiny random model with KV groups and MLP channels removed differently per layer."""
    cfg = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96,
               num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    cfg.update(overrides)
    model = tiny_model(family, **cfg)
    groups = {(g.layer, g.kind): g for g in unit_groups(model)}
    groups[(0, "heads")].zero(torch.tensor([1]))  # layer 0: 3 of 4 KV groups
    groups[(1, "heads")].zero(torch.tensor([0, 2, 3]))  # layer 1: 1 KV group
    groups[(0, "channels")].zero(torch.arange(0, 96, 3))  # layer 0: 64 channels
    groups[(2, "channels")].zero(torch.arange(40))  # layer 2: 56 channels
    shrink_model(model)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def _compare_with_llamacpp(gguf_path, model, ids, tol):
    """llama.cpp's logits against PyTorch's on the same weights, computed in float64: the
    exact reference (on the shrunk 135M model PyTorch's own float32 logits are ~1e-3 from it,
    llama.cpp's f32 ones closer)."""
    from llm_surgeon.export.llamacpp import gguf_logits, open_gguf

    llm = open_gguf(gguf_path, n_ctx=64, threads=1, logits_all=True, f32_cache=True)
    try:
        got = torch.from_numpy(gguf_logits(llm, ids)).double()
    finally:
        llm.close()
    with torch.no_grad():
        want = model.double()(input_ids=torch.tensor([ids])).logits[0]
    model.float()
    diff = (got - want).abs().max().item()
    assert diff <= tol, diff
    return diff


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uneven_model_runs_in_llama_cpp_with_pytorch_logits(tmp_path, family):
    pytest.importorskip("llama_cpp")
    import gguf

    over = {} if family == "llama" else {"vocab_size": 300, "max_position_embeddings": 128,
                                         "tie_word_embeddings": False}
    if family == "qwen2":
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, **over))
        with torch.no_grad():  # random attention biases: their permutation is tested too
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                            layer.self_attn.v_proj):
                    lin.bias.normal_(0.0, 0.5)
        groups = {(g.layer, g.kind): g for g in unit_groups(model)}
        groups[(0, "heads")].zero(torch.tensor([1]))
        groups[(2, "channels")].zero(torch.arange(40))
        shrink_model(model)
        model.save_pretrained(tmp_path / "m")
        tiny_tokenizer().save_pretrained(tmp_path / "m")
    else:
        _uneven_llama(tmp_path / "m")
    model = load(tmp_path / "m")  # as a user would: the saved folder
    out = tmp_path / "m.gguf"
    info = export_gguf(str(tmp_path / "m"), out, "f32")
    assert info["architecture"] == "deci"
    reader = gguf.GGUFReader(str(out))
    sizes = [int(v) for v in reader.fields["deci.feed_forward_length"].contents()]
    kv = [int(v) for v in reader.fields["deci.attention.head_count_kv"].contents()]
    assert sizes == [m.mlp.down_proj.in_features for m in model.model.layers]
    assert kv == [m.self_attn.k_proj.out_features // 16 for m in model.model.layers]
    assert len(set(sizes)) > 1 or len(set(kv)) > 1
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    _compare_with_llamacpp(out, model, ids, 1e-3)
    # quantized through llama.cpp's own quantizer: a smaller file, logits still close
    q = tmp_path / "m.q8.gguf"
    export_gguf(str(tmp_path / "m"), q, "q8_0")
    assert q.stat().st_size < out.stat().st_size
    with torch.no_grad():
        scale = model(input_ids=torch.tensor([ids])).logits.abs().max().item()
    _compare_with_llamacpp(q, model, ids, 0.1 * scale)


def test_uniform_model_exports_as_llama(tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    for g in unit_groups(model):
        g.zero(torch.tensor([0, 2]) if g.kind == "heads" else torch.arange(32))
    shrink_model(model)
    model.save_pretrained(tmp_path / "u")
    tiny_tokenizer().save_pretrained(tmp_path / "u")
    code = main(["export", str(tmp_path / "u"), "--gguf", str(tmp_path / "u.gguf"),
                 "--type", "f32"])
    assert code == 0
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "u.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    ids = list(range(5, 45))
    _compare_with_llamacpp(tmp_path / "u.gguf", load(tmp_path / "u"), ids, 1e-3)


BUNDLED_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from llm_surgeon.config import PruneConfig
from llm_surgeon.export.gguf import export_gguf
from llm_surgeon.driver import prune
from tests.test_export_gguf import _compare_with_llamacpp
out = sys.argv[1] + "/hc"
report = prune(PruneConfig(structure="heads-channels", sparsity=0.3, shots=1, calib_samples=4,
                           seqlen=128, eval=False, output=out), progress=False)
sizes = report["shrink"]["layer_sizes"]
assert len({(s["kv_heads"], s["channels"]) for s in sizes}) > 1  # really uneven
assert all(s["channels"] % 32 == 0 for s in sizes)  # the default channel multiple
info = export_gguf(out, sys.argv[1] + "/hc.gguf", "f32")
assert info["architecture"] == "deci"
ids = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(0)).tolist()
print(_compare_with_llamacpp(sys.argv[1] + "/hc.gguf", report["_model"], ids, 1e-3))
"""


@pytest.mark.slow
def test_bundled_default_shrunk_runs_in_llama_cpp(tmp_path):
    """The bundled SmolLM2-135M, heads-channels 30 % (1 shot, 4 x 128 calibration tokens),
    exported with per-layer sizes: llama.cpp's logits match PyTorch's (f32 file, max abs
    difference <= 1e-3). In a child process: later tests measure this process's peak memory."""
    pytest.importorskip("llama_cpp")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", BUNDLED_CHECK, str(tmp_path), str(root)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-3
