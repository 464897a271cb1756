"""Constrained generation (SPEC §4): the trie of valid item paths and a model-agnostic beam search."""
from .beam_search import beam_search
from .trie import Trie

__all__ = ["Trie", "beam_search"]
