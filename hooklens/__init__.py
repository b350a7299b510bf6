"""hooklens: the classic TransformerLens API for GPT-2-style models, made fast.

Public names only; importing hooklens has no side effects (no kernels compiled, no environment read).
The classes are imported through TransformerLens's module paths (`hooklens.HookedTransformer`, ...), so that both
`from hooklens import HookedTransformer` and `from hooklens.HookedTransformer import HookedTransformer` work: the
name bound last, here, is the class.
"""
from hooklens.ablation import head_ablation
from hooklens.ActivationCache import ActivationCache
from hooklens.attention import attention_backend
from hooklens.attribution import attribution_patching, neuron_integrated_gradients
from hooklens.config import HookedTransformerConfig
from hooklens.FactoredMatrix import FactoredMatrix
from hooklens.head_scores import head_scores
from hooklens.hook_points import HookPoint
from hooklens.HookedRootModule import HookedRootModule
from hooklens.HookedTransformer import HookedTransformer
from hooklens.kv_cache import HookedTransformerKeyValueCache, HookedTransformerKeyValueCacheEntry
from hooklens.path_patching import path_patch

# TransformerLens 3.9's names for the key/value cache classes.
TransformerLensKeyValueCache = HookedTransformerKeyValueCache
TransformerLensKeyValueCacheEntry = HookedTransformerKeyValueCacheEntry

__all__ = [
    "ActivationCache", "FactoredMatrix", "HookedTransformer", "HookedTransformerConfig", "HookPoint",
    "HookedRootModule",
    "HookedTransformerKeyValueCache", "HookedTransformerKeyValueCacheEntry", "TransformerLensKeyValueCache",
    "TransformerLensKeyValueCacheEntry",
    "attention_backend", "attribution_patching", "head_ablation", "head_scores", "neuron_integrated_gradients",
    "path_patch",
]
__version__ = "0.1.0"
