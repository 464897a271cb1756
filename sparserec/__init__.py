"""sparserec: Journey-aware Sparse Attention kernels and a GRACE-style generative recommender."""
from ._ext import EXTENSION_ERROR, has_extension
from .config import JSAConfig
from .ops.dispatch import backends

__version__ = "0.1.0"
__all__ = ["JSAConfig", "backends", "has_extension", "EXTENSION_ERROR", "__version__"]
