"""The nearest-Kronecker-product Fisher estimate against an exact SVD of the rearranged Fisher."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon.curvature.kfac import collect_kfac, nearest_kronecker
from llm_surgeon.models.layouts import decoder_linears
from tests.conftest import tiny_model


def _per_window_gradients(model, target, windows):
    """D_n: the gradient of window n's summed next-token loss w.r.t. [W | b], by autograd."""
    grads = []
    for n in range(windows.shape[0]):
        model.zero_grad(set_to_none=True)
        ids = windows[n : n + 1]
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        loss.backward()
        D = target.module.weight.grad.clone()
        if target.module.bias is not None:
            D = torch.cat([D, target.module.bias.grad[:, None]], dim=1)
        grads.append(D)
    model.zero_grad(set_to_none=True)
    return torch.stack(grads)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_power_iterations_reach_the_nearest_kronecker_product(family):
    model = tiny_model(family, num_hidden_layers=1).double()
    windows = torch.randint(0, 300, (6, 10), generator=torch.Generator().manual_seed(0))
    targets = decoder_linears(model)
    init = collect_kfac(model, targets, windows, dtype=torch.float64, progress=False)
    nkp = nearest_kronecker(model, targets, windows, init, iters=200, dtype=torch.float64,
                            progress=False)
    for t in (targets[0], targets[-1]):  # q (or fc... ) and the MLP output
        D = _per_window_gradients(model, t, windows)  # (N, out, in)
        N, out, inp = D.shape
        # Rearranged Fisher R[(i,k),(j,l)] = (1/N) Σ_n D[i,j] D[k,l]; F ≈ G⊗A ⇔ R ≈ vec G vec Aᵀ
        R = torch.einsum("nij,nkl->ikjl", D, D).reshape(out * out, inp * inp) / N
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        best = S[0] * torch.outer(U[:, 0], Vh[0])
        ours = torch.outer(nkp[t.name].G.reshape(-1), nkp[t.name].A.reshape(-1))
        rel = float(torch.linalg.norm(ours - best) / torch.linalg.norm(best))
        assert rel < 1e-5
        # and it is no worse a fit than K-FAC's independence assumption
        kfac = torch.outer(init[t.name].G.reshape(-1), init[t.name].A.reshape(-1))
        assert torch.linalg.norm(R - ours) <= torch.linalg.norm(R - kfac) + 1e-12
