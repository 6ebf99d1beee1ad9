"""The low-rank first-order correction on tiny random Llama and OPT models (float32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from llm_surgeon.methods.lowrank import calibration_loss, first_order_correction
from llm_surgeon.models.layouts import decoder_linears
from tests.conftest import tiny_model

FAMILIES = ("llama", "opt")
RANK = 2
STEPS = 8
LR = 1e-2



def _windows(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, length), generator=g, dtype=torch.int64)


def _pruned_model(family: str):
    """Tiny model with half of every target weight zeroed, plus one whole row and column."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in decoder_linears(model):
            W = t.module.weight
            W.mul_(torch.rand(W.shape, generator=g) >= 0.5)
            W[1, :] = 0
            W[:, 2] = 0
    return model


def _run(model, **kw):
    args = dict(rank=RANK, steps=STEPS, lr=LR, seed=0, progress=False)
    args.update(kw)
    return first_order_correction(model, decoder_linears(model), _windows(), **args)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeros_stay_exactly_zero_and_loss_decreases(family):
    model = _pruned_model(family)
    targets = decoder_linears(model)
    before = {t.name: t.module.weight.detach().clone() for t in targets}
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if n not in {f"{t.name}.weight" for t in targets}}
    out = _run(model)
    assert out["steps"] == STEPS
    assert out["loss_after"] < out["loss_before"] - 1e-3, out
    assert out["loss_before"] == pytest.approx(
        calibration_loss(_pruned_model(family), _windows()), rel=1e-6)
    assert out["loss_after"] == pytest.approx(calibration_loss(model, _windows()), rel=1e-6)
    changed = 0
    for t in targets:
        W, W0 = t.module.weight.detach(), before[t.name]
        zero = W0 == 0
        assert torch.equal(W[zero], torch.zeros_like(W[zero])), t.name
        assert not torch.signbit(W[zero]).any(), t.name  # +0.0, not -0.0
        assert torch.all(W[1] == 0) and torch.all(W[:, 2] == 0), t.name
        assert torch.equal(W == 0, zero), t.name  # no surviving weight became zero
        changed += int(not torch.equal(W, W0))
    assert changed == len(targets)  # every adapter was trained and merged
    for n, p in model.named_parameters():  # nothing else moved (embeddings, norms, biases)
        if n in others:
            assert torch.equal(p.detach(), others[n]), n


def _hook_state(model: nn.Module):
    return {
        name: (type(m), len(m._forward_hooks), len(m._forward_pre_hooks),
               len(m._backward_hooks), len(getattr(m, "_backward_pre_hooks", {})),
               parametrize.is_parametrized(m))
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_model_afterwards(family):
    model = _pruned_model(family)
    # a mixed starting state: embeddings frozen, the rest trainable, training mode on
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    shapes = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    hooks = _hook_state(model)
    ids = {n: id(p) for n, p in model.named_parameters()}
    _run(model, steps=3, batch_size=2)
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == shapes
    assert _hook_state(model) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: id(p) for n, p in model.named_parameters()} == ids  # merged in place
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    for t in decoder_linears(model):
        assert type(t.module) is nn.Linear
        assert isinstance(t.module.weight, nn.Parameter)
    # still an ordinary transformers model
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_windows(1)).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_runs_are_bit_identical(family):
    a, b, c = _pruned_model(family), _pruned_model(family), _pruned_model(family)
    ra, rb = _run(a, seed=5), _run(b, seed=5)
    _run(c, seed=6)
    assert ra == rb
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_zero_steps_changes_nothing():
    model = _pruned_model("llama")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = _run(model, steps=0)
    assert out["steps"] == 0 and out["loss_after"] == out["loss_before"]
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="rank"):
        _run(model, rank=0)
    with pytest.raises(ValueError, match="steps"):
        _run(model, steps=-1)
    with pytest.raises(ValueError, match="windows"):
        first_order_correction(model, decoder_linears(model), torch.zeros(3, 1, dtype=torch.long),
                               rank=1, steps=1, lr=1e-3, progress=False)
