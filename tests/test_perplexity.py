import math

import torch
from torch import nn

from llm_surgeon.evaluate.perplexity import evaluate_perplexity, token_nll


class FixedLogits(nn.Module):
    """A toy 'language model' whose next-token logits depend only on the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        class Out:
            pass

        out = Out()
        out.logits = self.table[input_ids]
        return out


def test_uniform_model_has_perplexity_vocab_size():
    model = FixedLogits(torch.zeros(7, 7, dtype=torch.float64))
    windows = torch.randint(0, 7, (3, 9))
    assert math.isclose(
        evaluate_perplexity(model, windows, progress=False)["ppl"], 7.0, rel_tol=1e-9
    )


def test_perplexity_equals_hand_computed_value():
    # Vocabulary {0,1}; after token 0 the model predicts p(1)=e^1/(1+e^1); after 1, uniform.
    table = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    model = FixedLogits(table)
    windows = torch.tensor([[0, 1, 1], [0, 0, 1]])
    p1_after_0 = math.e / (1 + math.e)
    # predicted tokens: (0->1), (1->1), (0->0), (0->1)
    nll = [-math.log(p1_after_0), math.log(2), -math.log(1 - p1_after_0), -math.log(p1_after_0)]
    expected = math.exp(sum(nll) / 4)
    result = evaluate_perplexity(model, windows, batch_size=2, progress=False)
    assert result["tokens"] == 4
    assert math.isclose(result["ppl"], expected, rel_tol=1e-12)
    # batch size must not change the answer
    assert math.isclose(
        evaluate_perplexity(model, windows, batch_size=1, progress=False)["ppl"],
        expected,
        rel_tol=1e-12,
    )


def test_token_nll_shape_and_values():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]))
    ids = torch.tensor([[0, 1, 1]])
    nll = token_nll(logits, ids)
    assert nll.shape == (1, 2)
    assert torch.allclose(nll, torch.tensor([[math.log(2), -math.log(0.75)]]))
