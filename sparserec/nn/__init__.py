"""Drop-in modules."""
from .jsa import JourneySparseAttention

__all__ = ["JourneySparseAttention"]
