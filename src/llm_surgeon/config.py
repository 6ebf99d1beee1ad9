"""Every setting of a prune run, in one light dataclass (no torch import), so that the command
line takes its defaults from here and the report records them verbatim."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llm_surgeon.errors import UserError

FISHER_KINDS = ("empirical", "sampled")
LAYER_SIZES = ("global", "uniform")


@dataclass
class PruneConfig:
    """Every setting of a prune run; recorded verbatim in the report."""

    model: str = "smollm2-135m"
    method: str = "surgeon"
    structure: str = "unstructured"
    sparsity: float | None = None  # None: 0.5, or 1 - N/M for N:M
    shots: int = 5
    calib_data: str = "sotu"
    calib_samples: int = 32
    seqlen: int = 512
    seed: int = 0
    eval_data: str = "sotu"
    eval_windows: int = 64
    eval: bool = True
    eval_every_shot: bool = False
    fisher: str = "empirical"
    nearest_kronecker: int = 0  # power iterations of the nearest-Kronecker estimate (0: K-FAC)
    damp_g: float = 0.1
    damp_a: float = 0.01
    max_correlate: int = 256
    batch_size: int = 1
    lowrank_rank: int = 0
    lowrank_steps: int = 0
    lowrank_lr: float = 1e-4
    blocksize: int = 128  # SparseGPT lazy-update block
    percdamp: float = 0.01  # SparseGPT relative damping of H = XᵀX
    maiht_mu: float = 0.1
    maiht_iht_iters: int = 50
    maiht_refine_iters: int = 30
    maiht_step: float = 0.95
    dtype: str = "float32"
    device: str = "cpu"
    output: str | None = None
    time_plain_pass: bool = False
    max_memory: str | None = None  # e.g. "2GB": stream decoder layers from disk under it
    offload_dir: str | None = None  # where streamed layers and hidden states go (a cache)
    # heads-channels: every layer keeps a multiple of this many MLP channels (None: 32, the
    # quantization block of llama.cpp's Q8_0/Q4_0, where layers have >= 512 channels; else 1)
    channel_multiple: int | None = None
    layer_sizes: str = "global"  # heads-channels: "global" (per-layer sizes) | "uniform"

    def unit_shape(self) -> tuple[int | None, bool]:
        """(channel multiple or None for the default, uniform layer sizes) of a heads-channels
        prune; see :func:`llm_surgeon.methods.threshold.default_channel_multiple`."""
        return self.channel_multiple, self.layer_sizes == "uniform"

    def validate(self):
        from llm_surgeon.methods.base import parse_structure
        from llm_surgeon.methods.registry import get_method

        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.shots < 1:
            raise UserError(f"--shots must be a positive integer, got {self.shots}")
        if self.calib_samples < 1:
            raise UserError(f"--calib-samples must be positive, got {self.calib_samples}")
        if self.nearest_kronecker < 0:
            raise UserError("--nearest-kronecker must be a non-negative number of iterations")
        if self.fisher not in FISHER_KINDS:
            raise UserError(f"--fisher must be one of {', '.join(FISHER_KINDS)}")
        for name in ("damp_g", "damp_a"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be non-negative")
        if self.blocksize < 1 or self.percdamp < 0:
            raise UserError("--blocksize must be positive and --percdamp non-negative")
        if self.maiht_iht_iters < 0 or self.maiht_refine_iters < 0 or self.maiht_mu < 0:
            raise UserError("mAIHT iterations and --maiht-mu must be non-negative")
        if not 0 < self.maiht_step <= 1:
            raise UserError("--maiht-step must be in (0, 1]")
        if self.max_memory is not None:
            from llm_surgeon.models.offload import parse_memory

            parse_memory(self.max_memory)
        method = get_method(self.method)
        structure = parse_structure(self.structure)
        if self.layer_sizes not in LAYER_SIZES:
            raise UserError(f"--layer-sizes must be one of {', '.join(LAYER_SIZES)}")
        if self.channel_multiple is not None and self.channel_multiple < 1:
            raise UserError(f"--channel-multiple must be >= 1, got {self.channel_multiple}")
        if structure.kind != "heads-channels" and (
                self.layer_sizes != "global" or self.channel_multiple is not None):
            raise UserError("--layer-sizes and --channel-multiple apply to --structure "
                            "heads-channels only")
        if (
            structure.kind == "nm"
            and self.sparsity is not None
            and not math.isclose(self.sparsity, structure.nm_sparsity)
        ):
            raise UserError(
                f"--structure {structure} fixes the sparsity at {structure.nm_sparsity:g}; "
                f"omit --sparsity or pass {structure.nm_sparsity:g}"
            )
        if structure.kind not in method.structures:
            raise UserError(
                f"method {self.method!r} does not support --structure {structure} "
                f"(supports: {', '.join(method.structures)})"
            )
        return structure
