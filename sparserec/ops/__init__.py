"""Public operators: JSA functionals with a backend dispatcher, and the compiled custom ops."""
from .dispatch import backends
from .jsa import jsa_attention, jsa_compress
from .select import jsa_select
from .trie import trie_beam_step

__all__ = ["backends", "jsa_attention", "jsa_compress", "jsa_select", "trie_beam_step"]
