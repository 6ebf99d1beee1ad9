"""A few checks on the real bundled SmolLM2-135M (little data, so seconds, not minutes)."""

from __future__ import annotations

import json

import pytest

from llm_surgeon.cli import main
from llm_surgeon.models.layouts import count_parameters, decoder_linears, layout_for
from llm_surgeon.models.load import ensure_bundled_cache, load_model


@pytest.fixture(scope="module")
def bundled():
    return load_model("smollm2-135m")


def test_bundled_cache_is_a_complete_folder(bundled):
    folder = ensure_bundled_cache()
    assert (folder / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in folder.iterdir())
    assert not any(
        p.name.startswith(".")
        for p in folder.parent.iterdir()
        if p.name.startswith(f".{folder.name}.tmp")
    )


def test_bundled_layout(bundled):
    model, _tokenizer = bundled
    assert layout_for(model).family == "llama"
    assert len(decoder_linears(model)) == 30 * 7
    counts = count_parameters(model)
    assert counts["params_decoder_linear"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


def test_bundled_eval_json(capsys, tmp_path):
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "-q",
                "eval",
                "--model",
                "smollm2-135m",
                "--data",
                "sotu",
                "--seqlen",
                "128",
                "--eval-windows",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert isinstance(result["ppl"], float) and isinstance(result["params_total"], int)
    assert isinstance(result["params_decoder_linear"], int)
    # A trained model is far better than uniform over 49152 tokens, and not perfect.
    assert 5 < result["ppl"] < 200
