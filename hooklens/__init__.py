"""hooklens: the classic TransformerLens API for GPT-2-style models, made fast.

Public names only; importing hooklens has no side effects (no kernels compiled, no environment read).
"""
from hooklens.ablation import head_ablation
from hooklens.attention import attention_backend
from hooklens.attribution import attribution_patching, neuron_integrated_gradients
from hooklens.config import HookedTransformerConfig
from hooklens.factored_matrix import FactoredMatrix
from hooklens.hook_points import HookedRootModule, HookPoint
from hooklens.head_scores import head_scores
from hooklens.model import HookedTransformer
from hooklens.path_patching import path_patch

__all__ = [
    "FactoredMatrix", "HookedTransformer", "HookedTransformerConfig", "HookPoint", "HookedRootModule",
    "attention_backend", "attribution_patching", "head_ablation", "head_scores", "neuron_integrated_gradients",
    "path_patch",
]
__version__ = "0.1.0"
