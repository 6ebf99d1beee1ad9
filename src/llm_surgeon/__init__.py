"""llm-surgeon: make large language models smaller after training.

LLM Surgeon (Kronecker-factored curvature), Numerical pruning, mAIHT and the baselines every
user compares against (magnitude, Wanda, SparseGPT, L-OBD, K-OBD), with evaluation the field
trusts.
"""

from llm_surgeon.api import PruneResult, prune_model
from llm_surgeon.errors import UserError

__version__ = "0.1.0"


def load(path: str, **kwargs):
    """Load a model saved by llm-surgeon (or any model spec ``--model`` accepts) as a
    ``transformers`` model object in eval mode, including physically shrunk models whose layers
    differ in size. Keyword arguments: ``dtype``, ``device``."""
    from llm_surgeon.models.load import load_model

    model, _ = load_model(str(path), with_tokenizer=False, **kwargs)
    return model


__all__ = ["PruneResult", "UserError", "__version__", "load", "prune_model"]
