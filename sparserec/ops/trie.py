"""The trie ops (SPEC §4), validated, on the compiled kernel for the inputs' device (C++ on CPU,
CUDA on GPU) or else the PyTorch reference beside them (sparserec.reference.trie):

  trie_build(paths)       the CSR arrays of the trie of item paths (layout: sparserec.generate.trie)
  trie_beam_step(...)     one trie-constrained beam-search step

Calls go one way: sparserec.generate (the Trie data structure, the beam-search loop) calls these
ops, which call the kernels; nothing here imports sparserec.generate. trie_beam_step takes any
object with the Trie's arrays and static facts (child_ptr, node_token, num_items, vocab_size,
max_fanout), which `sparserec.generate.Trie` has checked.

Result order, shared by every implementation: best score first; equal scores go to the lower
parent beam, then the lower token. Beams scoring -inf contribute nothing; candidates scoring -inf
(or NaN) are dropped; slots left without a candidate hold score -inf and parent/token/node -1.
"""
import torch

from .._ext import has_extension
from ..reference.trie import build_trie_csr as reference_trie_build
from ..reference.trie import trie_beam_step as reference_trie_beam_step
from . import validate

# The CUDA kernel keeps each batch row's input beams and its top-beam_size buffer in shared memory.
CUDA_MAX_BEAMS = 1024
# Beams beyond the trie's item count can never be filled (no level has more nodes than there are
# items), so beam_size may exceed num_items (and the K input beams) only up to this many padded
# slots; this bounds the outputs' memory (beam_size=10**9 would otherwise allocate B * 28 GB).
MAX_PADDED_BEAMS = 1024
_TRIE_ATTRIBUTES = ("child_ptr", "node_token", "num_items", "vocab_size", "max_fanout")


def _compiled_kernel_serves(op: str, device: torch.device) -> bool:
    if not has_extension():
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"sparserec::{op}",
                                                                                        dispatch_key)


def trie_build(paths: torch.Tensor):
    """(child_ptr, node_token, leaf_item, level_start) of the trie of `paths`, (num_items, depth)
    int64 on the CPU, non-negative, every row distinct (ValueError naming the first offence)."""
    if _compiled_kernel_serves("trie_build", paths.device):
        return torch.ops.sparserec.trie_build(paths)
    return reference_trie_build(paths)


def max_beam_size(trie, input_beams: int = 1) -> int:
    """The largest beam_size `trie_beam_step` accepts for `trie` and K = input_beams."""
    return max(trie.num_items, input_beams, MAX_PADDED_BEAMS)


def trie_beam_step(log_probs, beam_scores, nodes, trie, beam_size: int, normalize: bool = False):
    """One beam-search step over the trie's valid children -> (scores, parents, tokens, nodes).

    log_probs (B, K, V) float32 (V >= trie.vocab_size); beam_scores (B, K) float32 (start: 0 for
    beam 0, -inf for the rest); nodes (B, K) int64 trie nodes (0 is the root); trie: a
    sparserec.generate.Trie on the same device. Returns (B, beam_size) float32 scores (beam score
    plus the child's log-prob) and int64 parent beams, tokens and child nodes, best first.
    beam_size: at most max(trie.num_items, K, MAX_PADDED_BEAMS). normalize=True replaces each beam's
    log-probs by a log-softmax over its valid children.
    No host synchronisation; CUDA-graph capturable.
    """
    validate.check_tensor("log_probs", log_probs, ndim=3, dtypes=(torch.float32,))
    validate.check_tensor("beam_scores", beam_scores, ndim=2, dtypes=(torch.float32,))
    validate.check_tensor("nodes", nodes, ndim=2, dtypes=(torch.int64,))
    if not all(hasattr(trie, name) for name in _TRIE_ATTRIBUTES):
        raise TypeError(f"trie must be a sparserec.generate.Trie, got {type(trie).__name__}")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    batch, beams, vocab = log_probs.shape
    if beam_size > max_beam_size(trie, beams):
        raise ValueError(f"beam_size={beam_size} is larger than the trie's {trie.num_items} items, the K={beams} "
                         f"input beams and {MAX_PADDED_BEAMS}: no step can fill more beams than there are items")
    if tuple(beam_scores.shape) != (batch, beams) or tuple(nodes.shape) != (batch, beams):
        raise ValueError(f"beam_scores and nodes must be (B, K) = {(batch, beams)}, got "
                         f"{tuple(beam_scores.shape)} and {tuple(nodes.shape)}")
    if beams == 0:
        raise ValueError("log_probs must hold at least one beam per batch row (K >= 1)")
    if vocab < trie.vocab_size:
        raise ValueError(f"log_probs has V={vocab} columns, but the trie uses tokens up to {trie.vocab_size - 1}")
    if beams * vocab >= 1 << 31:
        raise ValueError(f"K * V = {beams * vocab} must be below 2^31")
    validate.check_same_device(log_probs=log_probs, beam_scores=beam_scores, nodes=nodes, trie=trie.child_ptr)
    if log_probs.is_cuda and max(beams, beam_size) > CUDA_MAX_BEAMS:
        raise ValueError(f"the CUDA kernel serves up to {CUDA_MAX_BEAMS} beams, got K={beams} input beams "
                         f"and beam_size={beam_size}")
    if _compiled_kernel_serves("trie_beam_step", log_probs.device):
        return torch.ops.sparserec.trie_beam_step(log_probs, beam_scores, nodes, trie.child_ptr,
                                                  trie.node_token, beam_size, normalize)
    return reference_trie_beam_step(log_probs, beam_scores, nodes, trie.child_ptr, trie.node_token,
                                     beam_size, normalize, max_fanout=max(trie.max_fanout))


if has_extension():
    @torch.library.register_fake("sparserec::trie_beam_step")
    def _trie_beam_step_fake(log_probs, beam_scores, nodes, child_ptr, node_token, beam_size, normalize):
        batch = log_probs.shape[0]
        return (beam_scores.new_empty(batch, beam_size),
                *(nodes.new_empty(batch, beam_size) for _ in range(3)))

    @torch.library.register_fake("sparserec::trie_build")
    def _trie_build_fake(paths):
        num_nodes = torch.library.get_ctx().new_dynamic_size()
        return (paths.new_empty(num_nodes + 1), paths.new_empty(num_nodes), paths.new_empty(paths.shape[0]),
                paths.new_empty(paths.shape[1] + 2))
