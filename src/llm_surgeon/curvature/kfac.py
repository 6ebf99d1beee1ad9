"""Kronecker-factored curvature F ≈ G ⊗ A of every targeted linear, from full-model passes.

For a linear layer y = W a (+ b) seen on tokens n = 1..N of the calibration set,

    A = (1/N) Σ_n ā_n ā_nᵀ      ā = [a; 1] when the layer has a bias (bias pruned with its row)
    G = (1/N) Σ_n g_n g_nᵀ      g_n = ∂ℓ/∂y_n, the gradient of the loss at the layer output

where ℓ is the summed token cross-entropy of the whole model on the calibration windows, with
the true next tokens (empirical Fisher, the default) or with labels drawn from the model's own
softmax (sampled Fisher). Both factors are accumulated as running sums during ordinary forward
and backward passes; no activation is stored beyond one batch.

Plumbing notes (the math lives in :mod:`llm_surgeon.methods.surgeon`):

* Layers that read the same input tensor (q/k/v; gate/up; in Phi also fc1) share one A, which is
  accumulated once: inputs are matched by tensor identity during each forward pass.
* Parameters never need gradients: only the embedding output is made to require grad, so the
  backward computes activation gradients only (no weight-gradient products).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llm_surgeon import distributed
from llm_surgeon.config import FISHER_KINDS
from llm_surgeon.curvature.factors import Curvature
from llm_surgeon.models.layouts import TargetLinear

#: Column-panel width of :func:`add_gram_` (wide enough for efficient matrix products, narrow
#: enough that the skipped lower triangle is most of the lower half).
GRAM_PANEL = 128


def add_gram_(acc: torch.Tensor, x: torch.Tensor, panel: int | None = None) -> torch.Tensor:
    """acc += the upper block triangle of xᵀx (x: (n, d), acc: (d, d)), in place; returns acc.

    With the columns cut into panels P_i = [i, i + panel), only

        acc[P_i, i:] += x[:, P_i]ᵀ x[:, i:]

    is computed: about half the products of the full xᵀx (a symmetric rank-k update, as BLAS
    syrk). Entries below the diagonal panels are never written; :func:`symmetric_from_upper`
    turns the sum into the full Σ xᵀx. ``panel``: :data:`GRAM_PANEL` unless given."""
    panel = panel or GRAM_PANEL
    d = x.shape[-1]
    for i in range(0, d, panel):
        acc[i:i + panel, i:].addmm_(x[:, i:i + panel].T, x[:, i:])
    return acc


def symmetric_from_upper(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix S with S = acc on and above the diagonal: S = triu(acc) + triu(acc, 1)ᵀ
    (the full Σ xᵀx from the sums of :func:`add_gram_`)."""
    return torch.triu(acc) + torch.triu(acc, 1).T


class PackedGram:
    """A running Σ xᵀx (d × d, symmetric) kept as its upper block triangle only, in about half
    the memory of the square.

    With the columns cut into panels P_i = [i, i + panel), panel i keeps the rectangle

        R_i = Σ x[:, P_i]ᵀ x[:, i:]        (|P_i| × (d − i)),

    the rows P_i of the sum from the diagonal block rightwards: Σ_i |P_i|(d − i) ≈ d²/2 +
    panel·d/2 numbers instead of d², and the same products as :func:`add_gram_` (a symmetric
    rank-k update, as BLAS syrk). :meth:`full` mirrors them into the symmetric d × d sum, with
    each diagonal block's upper triangle mirrored too (so the result is exactly symmetric).
    ``panel``: :data:`GRAM_PANEL` unless given."""

    def __init__(self, d: int, dtype: torch.dtype, device: Any = "cpu",
                 panel: int | None = None) -> None:
        self.d = d
        self.panel = panel or GRAM_PANEL
        self.rects = [torch.zeros(min(self.panel, d - i), d - i, dtype=dtype, device=device)
                      for i in range(0, d, self.panel)]

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rects)

    def add_(self, x: torch.Tensor) -> PackedGram:
        """Add xᵀx of ``x`` (n × d) in place; returns self."""
        for k, rect in enumerate(self.rects):
            i = k * self.panel
            rect.addmm_(x[:, i:i + self.panel].T, x[:, i:])
        return self

    def full(self) -> torch.Tensor:
        """The symmetric d × d sum."""
        r0 = self.rects[0]
        out = r0.new_empty(self.d, self.d)
        for k, rect in enumerate(self.rects):
            i = k * self.panel
            p = rect.shape[0]
            block = rect[:, :p]
            out[i:i + p, i:i + p] = torch.triu(block) + torch.triu(block, 1).T
            out[i:i + p, i + p:] = rect[:, p:]
            out[i + p:, i:i + p] = rect[:, p:].T
        return out

    def all_reduce_(self) -> None:
        """Under torchrun: sum over ranks, in place (the same order on every rank)."""
        for rect in self.rects:
            distributed.all_reduce_sum_(rect)


@dataclass
class _InputStats:
    """Running sums of a shared layer input: Σ a aᵀ (packed upper block triangle,
    :class:`PackedGram`), Σ a and the token count."""

    xtx: PackedGram
    xsum: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xsum.dtype)
        self.xtx.add_(x)
        self.xsum.add_(x.sum(0))
        self.count += x.shape[0]

    def second_moment(self, with_bias: bool) -> torch.Tensor:
        """A = E[ā āᵀ], with ā = [a; 1] when ``with_bias``."""
        n = max(self.count, 1)
        xtx = self.xtx.full()
        if not with_bias:
            return xtx.div_(n)
        d = xtx.shape[0]
        out = xtx.new_empty(d + 1, d + 1)
        out[:d, :d] = xtx
        del xtx
        out[:d, d] = self.xsum
        out[d, :d] = self.xsum
        out[d, d] = self.count
        return out.div_(n)


@dataclass
class FactorCollector:
    """Running sums of A (forward hooks on the targets' inputs) and G (tensor hooks on their
    outputs' gradients), packed upper block triangles (:class:`PackedGram`); :meth:`factors`
    turns them into symmetric means (and may release the sums it has turned)."""

    targets: list[TargetLinear]
    dtype: torch.dtype
    want_A: bool = True
    want_G: bool = True
    inputs: list[_InputStats] = field(default_factory=list)
    input_of: dict[str, int] = field(default_factory=dict)
    gsum: dict[str, PackedGram] = field(default_factory=dict)
    gcount: dict[str, int] = field(default_factory=dict)
    # Inputs seen in the current batch, kept alive so that no other tensor can reuse the address.
    _seen: dict[tuple[int, tuple[int, ...]], tuple[int, torch.Tensor]] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _turned: set[str] = field(default_factory=set)  # targets whose sums were released

    def new_batch(self) -> None:
        self._seen.clear()

    def _forward_hook(self, target: TargetLinear):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.want_A:
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape))
                seen = self._seen.get(key)
                idx = seen[0] if seen is not None and seen[1] is x else None
                if idx is None:
                    idx = self.input_of.get(target.name)
                    if idx is None:
                        d = x.shape[-1]
                        self.inputs.append(
                            _InputStats(
                                PackedGram(d, self.dtype, x.device),
                                torch.zeros(d, dtype=self.dtype, device=x.device),
                            )
                        )
                        idx = len(self.inputs) - 1
                    self.inputs[idx].add(x.detach())
                    self._seen[key] = (idx, x)
                self.input_of[target.name] = idx
            if self.want_G and output.requires_grad:
                output.register_hook(self._grad_hook(target))

        return hook

    def _grad_hook(self, target: TargetLinear):
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).to(self.dtype)
            acc = self.gsum.get(target.name)
            if acc is None:
                acc = self.gsum[target.name] = PackedGram(g.shape[1], self.dtype, g.device)
                self.gcount[target.name] = 0
            acc.add_(g)  # upper block triangle of Σ g gᵀ
            self.gcount[target.name] += g.shape[0]

        return hook

    def all_reduce(self) -> None:
        """Under torchrun: sum every running sum over ranks (same order on every rank)."""
        if not distributed.active():
            return
        for stats in self.inputs:
            stats.xtx.all_reduce_()
            distributed.all_reduce_sum_(stats.xsum)
            stats.count = distributed.all_reduce_int(stats.count)
        for t in self.targets:
            if t.name in self.gsum:
                self.gsum[t.name].all_reduce_()
                self.gcount[t.name] = distributed.all_reduce_int(self.gcount[t.name])

    def factors(self, targets: list[TargetLinear] | None = None, release: bool = False
                ) -> dict[str, Curvature]:
        """The means A and G of ``targets`` (default: every target) from the running sums.
        ``release``: drop the sums once turned (an input's when none of the collector's
        targets that read it is left), so that turning one layer at a time holds every
        layer's sums plus one layer's factors, never every layer's factors."""
        out: dict[str, Curvature] = {}
        for t in self.targets if targets is None else targets:
            idx = self.input_of[t.name]
            stats = self.inputs[idx]
            A = stats.second_moment(with_bias=t.has_bias)
            gsum = self.gsum.pop(t.name, None) if release else self.gsum.get(t.name)
            if gsum is not None:
                G = gsum.full().div_(max(self.gcount[t.name], 1))
            else:  # the output never received a gradient (unused layer): no information
                G = torch.zeros(t.module.out_features, t.module.out_features, dtype=self.dtype)
            del gsum
            out[t.name] = Curvature(A=A, G=G, count=stats.count)
            if release:
                self._turned.add(t.name)
                readers = [n for n, i in self.input_of.items() if i == idx]
                if all(n in self._turned for n in readers):
                    stats.xtx = PackedGram(0, self.dtype)  # the sums are no longer needed
        return out

    def attach(self) -> None:
        for t in self.targets:
            self._handles.append(t.module.register_forward_hook(self._forward_hook(t)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        # The inputs kept for sharing detection carry autograd graphs whose nodes hold the
        # gradient hooks, which hold this collector: a reference cycle through C++ objects
        # that Python's collector cannot break. Dropping them frees the running sums.
        self._seen.clear()


def _embedding_requires_grad(model: nn.Module):
    """Make the input embeddings' output require grad so activations get gradients."""
    emb = model.get_input_embeddings()

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    return emb.register_forward_hook(hook)


def next_token_loss(
    logits: torch.Tensor, ids: torch.Tensor, fisher: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy; labels are the true tokens (empirical Fisher) or drawn
    from the model's own predictive distribution (sampled Fisher)."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # upcast low precision, keep fp64 as is
        logits = logits.float()
    if fisher == "empirical":
        labels = ids[:, 1:]
    elif fisher == "sampled":
        probs = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])
    else:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )


def _batches(
    windows: torch.Tensor, batch_size: int, desc: str, progress: bool, device: torch.device
) -> Iterable[torch.Tensor]:
    """The windows in batches, on ``device``, with a progress bar."""
    bar = tqdm(
        total=windows.shape[0],
        desc=desc,
        unit="seq",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        yield batch
        bar.update(batch.shape[0])
    bar.close()


@contextlib.contextmanager
def _eval_mode(model: nn.Module, activation_grads: bool = False) -> Iterator[None]:
    """Eval mode (no dropout) for calibration statistics; with ``activation_grads``, parameters
    frozen and the embedding output made to require grad, so a backward computes activation
    gradients only. Everything is restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    hook = None
    if activation_grads:
        for p, _ in flags:
            p.requires_grad_(False)
        hook = _embedding_requires_grad(model)
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def kfac_sums(
    model: nn.Module,
    targets: list[TargetLinear],
    windows: torch.Tensor,
    fisher: str = "empirical",
    batch_size: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "curvature G⊗A",
) -> FactorCollector:
    """The running sums of A and G of every target over all calibration windows (one forward
    and backward of the whole model per batch; all-reduced under torchrun): a detached
    collector, whose :meth:`FactorCollector.factors` turns them into means."""
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    col = FactorCollector(targets, dtype)
    device = next(model.parameters()).device
    windows = distributed.shard(windows)  # torchrun: this rank's share; else all
    seed = seed + 7919 * distributed.rank()
    gen = torch.Generator(device=device).manual_seed(seed) if fisher == "sampled" else None
    col.attach()
    try:
        with _eval_mode(model, activation_grads=True):
            for batch in _batches(windows, batch_size, desc, progress, device):
                col.new_batch()
                with torch.enable_grad():
                    logits = model(input_ids=batch, use_cache=False).logits
                    loss = next_token_loss(logits, batch, fisher, gen)
                    del logits
                    loss.backward()
    finally:
        col.detach()
    col.all_reduce()
    return col


def collect_kfac(model: nn.Module, targets: list[TargetLinear], windows: torch.Tensor,
                 **options: Any) -> dict[str, Curvature]:
    """Accumulate A and G for every target over all calibration windows (forward + backward):
    the means of :func:`kfac_sums` (same ``options``: fisher, batch_size, seed, dtype,
    progress, desc)."""
    return kfac_sums(model, targets, windows, **options).factors()


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    targets: list[TargetLinear],
    windows: torch.Tensor,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "activations A",
) -> dict[str, torch.Tensor]:
    """A = E[ā āᵀ] only (forward passes, no gradients): what L-OBD needs."""
    col = FactorCollector(targets, dtype, want_G=False)
    device = next(model.parameters()).device
    windows = distributed.shard(windows)
    col.attach()
    try:
        with _eval_mode(model):  # calibration statistics without dropout, as in collect_kfac
            for batch in _batches(windows, batch_size, desc, progress, device):
                col.new_batch()
                model(input_ids=batch, use_cache=False)
    finally:
        col.detach()
    col.all_reduce()
    return {
        t.name: col.inputs[col.input_of[t.name]].second_moment(with_bias=t.has_bias)
        for t in targets
    }


def nearest_kronecker(
    model: nn.Module,
    targets: list[TargetLinear],
    windows: torch.Tensor,
    init: dict[str, Curvature],
    iters: int = 1,
    fisher: str = "empirical",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, Curvature]:
    """The paper's nearest-Kronecker-product estimate of the Fisher, instead of assuming a and g
    independent.

    With per-example (per calibration window n) weight gradients D_n = Σ_t g_t ā_tᵀ (out×in),
    the Fisher is F = (1/N) Σ_n vec(D_n) vec(D_n)ᵀ, and the Kronecker product G ⊗ A nearest to it
    in Frobenius norm is the top singular pair of F rearranged (Van Loan and Pitsianis). Power
    iterations, starting from the K-FAC factors ``init``, alternate

        G ← (1/N) Σ_n D_n A D_nᵀ,      A ← (1/N) Σ_n D_nᵀ G D_n,

    one full forward+backward pass each (both from the previous iterate). The product's scale is
    σ = ⟨F, Ĝ ⊗ Â⟩ = (1/N) Σ_n tr(D_nᵀ Ĝ D_n Â) for unit-norm directions; it is given to G while A
    keeps the Frobenius norm of the K-FAC A, so that relative damping behaves the same.
    """
    if iters < 1:
        return init
    G_dir = {k: f.G / torch.linalg.matrix_norm(f.G).clamp_min(1e-30) for k, f in init.items()}
    A_dir = {k: f.A / torch.linalg.matrix_norm(f.A).clamp_min(1e-30) for k, f in init.items()}
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if fisher == "sampled" else None
    scale: dict[str, float] = {}
    for it in range(iters):
        g_acc, a_acc, sigma = _nkp_pass(
            model,
            targets,
            windows,
            G_dir,
            A_dir,
            fisher,
            gen,
            dtype,
            progress,
            f"nearest Kronecker {it + 1}/{iters}",
        )
        scale = {k: v / windows.shape[0] for k, v in sigma.items()}
        G_dir = {k: v / torch.linalg.matrix_norm(v).clamp_min(1e-30) for k, v in g_acc.items()}
        A_dir = {k: v / torch.linalg.matrix_norm(v).clamp_min(1e-30) for k, v in a_acc.items()}
    out = {}
    for k, f in init.items():
        a_norm = float(torch.linalg.matrix_norm(f.A))
        out[k] = Curvature(
            A=A_dir[k] * a_norm, G=G_dir[k] * (scale[k] / a_norm), count=f.count
        )
    return out


def nkp_window_sums(D: torch.Tensor, A: torch.Tensor, G: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For per-window weight gradients D_n (shape (B, out, in)) and the current directions A, G:
    (Σ_n D_n A D_nᵀ, Σ_n D_nᵀ G D_n, Σ_n tr(D_nᵀ G D_n A)), the sums of one power iteration
    towards the Kronecker product nearest to Σ_n vec(D_n) vec(D_n)ᵀ."""
    DA = D @ A
    GD = G @ D
    return (DA @ D.transpose(1, 2)).sum(0), (D.transpose(1, 2) @ GD).sum(0), (GD * DA).sum()


def _nkp_pass(
    model: nn.Module,
    targets: list[TargetLinear],
    windows: torch.Tensor,
    G_dir: dict[str, torch.Tensor],
    A_dir: dict[str, torch.Tensor],
    fisher: str,
    gen: torch.Generator | None,
    dtype: torch.dtype,
    progress: bool,
    desc: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """One power-iteration pass: Σ_n D_n A D_nᵀ, Σ_n D_nᵀ G D_n and Σ_n tr(D_nᵀ G D_n A)."""
    g_acc = {k: torch.zeros_like(v) for k, v in G_dir.items()}
    a_acc = {k: torch.zeros_like(v) for k, v in A_dir.items()}
    sigma = dict.fromkeys(G_dir, 0.0)
    inputs: dict[str, torch.Tensor] = {}

    def make_hook(t: TargetLinear):
        def grad(g: torch.Tensor) -> None:
            a = inputs.pop(t.name)
            # one window per pass (some models, e.g. OPT's MLP, fold batch and time together)
            g2 = g.detach().to(dtype).reshape(-1, g.shape[-1])
            D = (g2.T @ a.reshape(-1, a.shape[-1]))[None]  # the window's weight gradient
            g_sum, a_sum, tr = nkp_window_sums(D, A_dir[t.name], G_dir[t.name])
            g_acc[t.name] += g_sum
            a_acc[t.name] += a_sum
            sigma[t.name] += float(tr)

        def fwd(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            a = args[0].detach().to(dtype)
            if t.has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            inputs[t.name] = a
            if out.requires_grad:
                out.register_hook(grad)

        return fwd

    handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
    device = next(model.parameters()).device
    try:
        with _eval_mode(model, activation_grads=True):
            for batch in _batches(windows, 1, desc, progress, device):
                with torch.enable_grad():
                    logits = model(input_ids=batch, use_cache=False).logits
                    next_token_loss(logits, batch, fisher, gen).backward()
    finally:
        for h in handles:
            h.remove()
    return g_acc, a_acc, sigma


def nearest_kronecker_layer(
    layer: nn.Module,
    targets: list[TargetLinear],
    init: dict[str, tuple[torch.Tensor, torch.Tensor]],
    iters: int,
    n_windows: int,
    recompute: Callable[[], Iterable[Any]],
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`nearest_kronecker` for the linears of one decoder layer, from that layer alone.

    The same power iterations (G ← (1/N) Σ_n D_n A D_nᵀ, A ← (1/N) Σ_n D_nᵀ G D_n, scale
    σ = (1/N) Σ_n tr(D_nᵀ G D_n A)) over the per-window weight gradients D_n = Σ_t g_t ā_tᵀ,
    where ``recompute()`` runs the layer forward and backward over every batch of windows from
    its stored input and output gradient (hooks here see ā and g). Under torchrun the sums are
    all-reduced and N (``n_windows``) counts every rank's windows. ``init``: name → (A, G) of
    K-FAC. The labels are those of the K-FAC pass in every iteration.
    """
    if iters < 1:
        return init

    def unit(M: torch.Tensor) -> torch.Tensor:
        return M / torch.linalg.matrix_norm(M).clamp_min(1e-30)

    names = [t.name for t in targets]
    A_dir = {k: unit(init[k][0]) for k in names}
    G_dir = {k: unit(init[k][1]) for k in names}
    scale: dict[str, float] = {}
    n_batch = [1]

    def windows_of(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        n_batch[0] = h.shape[0]

    for _ in range(iters):
        g_acc = {k: torch.zeros_like(v) for k, v in G_dir.items()}
        a_acc = {k: torch.zeros_like(v) for k, v in A_dir.items()}
        sigma = {k: torch.zeros((), dtype=torch.float64, device=init[k][0].device)
                 for k in names}
        inputs: dict[str, torch.Tensor] = {}

        def make_hook(t: TargetLinear, g_acc=g_acc, a_acc=a_acc, sigma=sigma, inputs=inputs,
                      A_dir=A_dir, G_dir=G_dir):
            def grad(g: torch.Tensor) -> None:
                a = inputs.pop(t.name)
                B = n_batch[0]
                g2 = g.detach().to(dtype).reshape(B, -1, g.shape[-1])
                D = g2.transpose(1, 2) @ a.reshape(B, -1, a.shape[-1])  # (B, out, in)
                g_sum, a_sum, tr = nkp_window_sums(D, A_dir[t.name], G_dir[t.name])
                g_acc[t.name] += g_sum
                a_acc[t.name] += a_sum
                sigma[t.name] += tr.double()

            def fwd(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                a = args[0].detach().to(dtype)
                if t.has_bias:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                inputs[t.name] = a
                if out.requires_grad:
                    out.register_hook(grad)

            return fwd

        handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
        handles.append(layer.register_forward_pre_hook(windows_of, with_kwargs=True))
        try:
            for _step in recompute():
                pass
        finally:
            for h in handles:
                h.remove()
        for k in names:
            distributed.all_reduce_sum_(g_acc[k])
            distributed.all_reduce_sum_(a_acc[k])
            distributed.all_reduce_sum_(sigma[k])
            scale[k] = float(sigma[k]) / n_windows
        G_dir = {k: unit(v) for k, v in g_acc.items()}
        A_dir = {k: unit(v) for k, v in a_acc.items()}
    out = {}
    for k in names:
        a_norm = float(torch.linalg.matrix_norm(init[k][0]))
        out[k] = (A_dir[k] * a_norm, G_dir[k] * (scale[k] / a_norm))
    return out
