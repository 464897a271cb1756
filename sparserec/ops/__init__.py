"""Public operators: JSA functionals with a backend dispatcher, and the compiled custom ops."""
import importlib

# The built-in backends register with the dispatcher at import, so no call imports (or graph-breaks).
importlib.import_module(".backends", __name__)
from .dispatch import backends  # noqa: E402  (after: the public function, not the submodule of that name)
from .jsa import JSAPlan, jsa_attention, jsa_compress, jsa_plan
from .select import jsa_select
from .trie import trie_beam_step

__all__ = ["JSAPlan", "backends", "jsa_attention", "jsa_compress", "jsa_plan", "jsa_select", "trie_beam_step"]
