"""hooklens: the classic TransformerLens API for GPT-2-style models, made fast.

Public names only; importing hooklens has no side effects (no kernels compiled, no environment read).
"""
from hooklens.config import HookedTransformerConfig
from hooklens.factored_matrix import FactoredMatrix
from hooklens.hook_points import HookedRootModule, HookPoint
from hooklens.model import HookedTransformer

__all__ = ["FactoredMatrix", "HookedTransformer", "HookedTransformerConfig", "HookPoint", "HookedRootModule"]
__version__ = "0.1.0"
