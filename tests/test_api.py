"""``llm_surgeon.prune_model``: the library entry point, on a tiny model already in memory."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import llm_surgeon
from llm_surgeon.methods.nm import check_nm
from llm_surgeon.models.layouts import decoder_linears
from tests.conftest import SAMPLE_TEXT, tiny_model


def _zeros(model) -> tuple[int, int]:
    z = n = 0
    for t in decoder_linears(model):
        for p in (t.module.weight, t.module.bias):
            if p is not None:
                z += int((p == 0).sum())
                n += p.numel()
    return z, n


def test_prune_model_on_a_model_in_memory(tiny_tok):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="surgeon",
                                     sparsity=0.5, shots=2, calib_samples=4, seqlen=32,
                                     eval_data=SAMPLE_TEXT, eval_windows=3, max_correlate=64)
    assert isinstance(result, llm_surgeon.PruneResult)
    assert result.model is model and result.output is None
    z, n = _zeros(model)
    # the sparsity reached is real (counted on the model) and on target
    assert result.sparsity == pytest.approx(z / n)
    assert z / n == pytest.approx(0.5, abs=2e-3)
    assert result.report["sparsity_target"] == 0.5
    # perplexity measured before and after, and it moved
    assert math.isfinite(result.ppl_dense) and math.isfinite(result.ppl)
    assert result.ppl != pytest.approx(result.ppl_dense, rel=1e-6)
    # the surgeon updates the weights it keeps: some kept weights differ from the dense ones
    kept_changed = 0
    for t, d in zip(decoder_linears(model), decoder_linears(dense), strict=True):
        w, w0 = t.module.weight.detach(), d.module.weight.detach()
        kept_changed += int(((w != 0) & (w != w0)).sum())
    assert kept_changed > 0
    # the method setting went to the method and into the recorded settings
    assert result.report["settings"]["max_correlate"] == 64
    assert len(result.report["shots"]) == 2
    # the caller's model is left as it came: eval mode, no gradients turned on by the run
    assert not model.training


def test_prune_model_takes_windows_and_a_layerwise_method(tiny_tok):
    model = tiny_model("opt")
    windows = torch.randint(0, 280, (4, 16), generator=torch.Generator().manual_seed(0))
    result = llm_surgeon.prune_model(model, tiny_tok, windows, method="sparsegpt",
                                     structure="2:4", blocksize=8)
    assert result.report["sparsity_target"] == 0.5 and result.ppl is None
    assert result.report["settings"]["blocksize"] == 8
    assert result.report["settings"]["calib_samples"] == 4
    assert len(result.report["shots"]) == 1  # one pass, whatever shots says
    for t in decoder_linears(model):
        assert check_nm(t.module.weight.detach(), 2, 4)


def test_prune_model_equals_the_command_line_run(tiny_model_dirs, tiny_tok, sample_text_file):
    """The CLI's run (model loaded by name) and prune_model (model in memory) are one core:
    the same windows and settings give the same weights."""
    from transformers import AutoModelForCausalLM

    from llm_surgeon.config import PruneConfig
    from llm_surgeon.data.corpora import load_text
    from llm_surgeon.driver import calibration_set, prune

    cfg = PruneConfig(model=str(tiny_model_dirs["llama"]), calib_data=str(sample_text_file),
                      calib_samples=4, seqlen=32, shots=2, sparsity=0.4, eval=False,
                      method="k-obd")
    via_cli = prune(cfg, progress=False)["_model"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    windows = calibration_set(tiny_tok, load_text(str(sample_text_file), "train"), cfg)
    llm_surgeon.prune_model(model, tiny_tok, windows, method="k-obd", sparsity=0.4, shots=2)
    for a, b in zip(decoder_linears(via_cli), decoder_linears(model), strict=True):
        torch.testing.assert_close(a.module.weight, b.module.weight, rtol=0, atol=0)


def test_prune_model_refuses_bad_input_in_one_line(tiny_tok):
    model = tiny_model("llama")
    with pytest.raises(llm_surgeon.UserError, match="unknown setting 'blocksize'"):
        llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="surgeon", blocksize=8)
    with pytest.raises(llm_surgeon.UserError, match="does not support --structure"):
        llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="wanda",
                                structure="rows-columns")
    with pytest.raises(llm_surgeon.UserError, match="must be in"):
        llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="maiht", step=2.0)
    assert _zeros(model)[0] == 0  # nothing was pruned by a refused call


def test_help_documents_the_entry_point():
    doc = llm_surgeon.prune_model.__doc__
    for word in ("model", "tokenizer", "text_or_windows", "method", "structure", "sparsity",
                 "shots", "eval_data", "output", "method_settings", "Example", "PruneResult"):
        assert word in doc


def test_readme_example_calls_the_real_signature():
    """The README's Python example uses only arguments prune_model takes and attributes its
    result has (it cannot run here: it loads a model by path)."""
    import ast
    import inspect
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S))
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "prune_model"]
    assert calls, "the README shows prune_model"
    params = inspect.signature(llm_surgeon.prune_model).parameters
    settings_ok = {"max_correlate", "damp_g", "damp_a", "blocksize", "percdamp", "seed"}
    for call in calls:
        assert len(call.args) <= 3
        for kw in call.keywords:
            assert kw.arg in params or kw.arg in settings_ok, kw.arg
    used = set(re.findall(r"result\.(\w+)", code))
    assert used <= {"model", "report", "output", "sparsity", "ppl", "ppl_dense"}, used


def test_prune_model_refuses_what_it_cannot_run_in_one_line():
    """An unregistered structure object, eval windows of the wrong rank or longer than the
    model's context: one-line UserErrors before any weight changes; the caller's global random
    state and gradients are left as they were."""
    import llm_surgeon
    from llm_surgeon.errors import UserError
    from llm_surgeon.structures import Unstructured
    from tests.conftest import tiny_model

    class Mine(Unstructured):
        name = syntax = "mine-unregistered"

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, model.config.vocab_size, (2, 16),
                            generator=torch.Generator().manual_seed(0))
    bad = [dict(structure=Mine()), dict(eval_data=windows[0]),
           dict(eval_data=torch.zeros(1, model.config.max_position_embeddings + 1,
                                      dtype=torch.long))]
    for kw in bad:
        with pytest.raises(UserError) as err:
            llm_surgeon.prune_model(model, None, windows, method="magnitude", shots=1, **kw)
        assert "\n" not in str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    llm_surgeon.prune_model(model, None, windows, method="magnitude", shots=1, seed=7,
                            time_plain_pass=True)
    assert torch.equal(torch.rand(3), expected)  # the global generator did not move
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
