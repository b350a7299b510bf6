"""`hooklens.cache`: the import path of `ActivationCache` before it moved to `hooklens/ActivationCache.py` (TL's
module path, which `type(cache)` prints); kept so that `from hooklens.cache import ActivationCache` keeps working."""
from hooklens.ActivationCache import ActivationCache

__all__ = ["ActivationCache"]
