"""Shared fixtures: tiny random models of three families, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE_TEXT = (
    "It is a pleasure to report that the state of the union is strong. "
    "We have worked together to build roads, schools and a better future for our children. "
) * 40


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, OPTConfig, PhiConfig

    if family == "llama":
        cfg = dict(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
        cls = LlamaConfig
    elif family == "opt":
        cfg = dict(
            vocab_size=300,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=True,
        )
        cls = OPTConfig
    elif family == "phi":
        cfg = dict(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            partial_rotary_factor=0.5,
        )
        cls = PhiConfig
    else:
        raise ValueError(family)
    cfg.update(overrides)
    return cls(**cfg)


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    # Random biases (transformers initialises them to zero) so that bias handling is exercised.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
    model.eval()
    return model


FAMILIES = ("llama", "opt", "phi")


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, offline, vocab < 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tok) -> dict[str, Path]:
    """A saved tiny model folder (with tokenizer) for every family."""
    dirs = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_model(family).save_pretrained(d)
        tiny_tok.save_pretrained(d)
        dirs[family] = d
    return dirs


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(SAMPLE_TEXT)
    return p


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory, tiny_tok) -> Path:
    """A tiny Llama briefly trained on the sample text, so that pruning visibly hurts it."""
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=48, intermediate_size=96, head_dim=12)
    ids = torch.tensor(tiny_tok(SAMPLE_TEXT)["input_ids"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        starts = torch.randint(0, ids.numel() - 33, (8,), generator=gen)
        batch = torch.stack([ids[s : s + 32] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    d = tmp_path_factory.mktemp("trained-llama")
    model.save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP contention on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
