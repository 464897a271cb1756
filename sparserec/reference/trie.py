"""The executable spec of the trie-constrained beam-search step (SPEC §4), in plain PyTorch.

Vectorised like STATIC's decode loop: each beam's children are a CSR run, gathered into a
(B, K, max_fanout) table padded with invalid slots, then one masked top-k over the K * max_fanout
candidates of each batch row. Runs on any device, with no host synchronisation; it is the
reference of the compiled kernels and the fallback when they are missing.

Order of the results (shared with the kernels): best score first; equal scores go to the lower
parent beam, then the lower token; scores compare by their bits (so -0.0 ranks below +0.0).
Candidates whose score is -inf or NaN are dropped; so are beams scoring -inf, beams whose node is
outside the trie or whose child run (cut at V children) leaves [0, num_nodes], and children whose
token is outside [0, V). Missing results: -inf / -1.

Inputs are trusted here; `sparserec.ops.trie_beam_step` validates them.
"""
from typing import Optional

import torch

# Offset that makes a candidate's flat position the low 32 bits of its order key (larger = better).
_POSITION_RANGE = 1 << 32


def build_trie_csr(paths: torch.Tensor):
    """CSR trie of item paths (N, depth) int64 -> (child_ptr, node_token, leaf_item, level_start).

    Node 0 is the root; the nodes holding column l's tokens are level_start[l+1]:level_start[l+2],
    numbered in the sorted order of their paths, so each node's children form one token-sorted
    run child_ptr[n]:child_ptr[n+1]. Leaves are the last N nodes; leaf_item[i] is the item id of
    node level_start[depth] + i. Raises ValueError for a negative token or two equal paths.
    """
    num_items, depth = paths.shape
    negative = (paths < 0).nonzero()
    if len(negative):
        item, level = negative[0].tolist()
        raise ValueError(f"paths must hold non-negative token ids, got {int(paths[item, level])} "
                         f"at item {item}, level {level}")
    order = torch.arange(num_items)
    for level in reversed(range(depth)):  # least significant column first; each sort is stable
        order = order[torch.sort(paths[order, level], stable=True).indices]
    rows = paths[order]
    # starts[r, l]: sorted row r starts a new node at level l (it differs from row r-1 in columns <= l).
    starts = torch.ones(num_items, depth, dtype=torch.bool)
    starts[1:] = (rows[1:] != rows[:-1]).cummax(dim=1).values
    duplicate = (~starts[:, -1]).nonzero()
    if len(duplicate):
        row = int(duplicate[0])
        raise ValueError(f"items {int(order[row - 1])} and {int(order[row])} have the same path; every item "
                         "needs a unique path (add a collision token)")
    counts = starts.sum(dim=0)
    level_start = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.cat([counts.new_zeros(1), counts.cumsum(0)])])
    num_nodes = int(level_start[-1])
    node_ids = level_start[1:-1] + starts.long().cumsum(dim=0) - 1  # (N, depth): row r's node at each level
    child_ptr = torch.full((num_nodes + 1,), num_nodes, dtype=torch.long)
    child_ptr[0] = 1
    node_token = torch.full((num_nodes,), -1, dtype=torch.long)
    for level in range(depth):
        new = starts[:, level]
        node_token[node_ids[new, level]] = rows[new, level]
        if level + 1 < depth:  # a new node's first child starts at the same row
            child_ptr[node_ids[new, level]] = node_ids[new, level + 1]
    return child_ptr, node_token, order, level_start


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """float32 scores -> int64 keys in the same order as the scores' bits (the kernels' order)."""
    bits = scores.contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


def trie_beam_step(log_probs: torch.Tensor, beam_scores: torch.Tensor, nodes: torch.Tensor,
                   child_ptr: torch.Tensor, node_token: torch.Tensor, beam_size: int,
                   normalize: bool = False, max_fanout: Optional[int] = None):
    """One step: (B, beam_size) scores, parent beams, tokens, child nodes; best first.

    log_probs (B, K, V) float32; beam_scores (B, K) float32; nodes (B, K) int64 trie nodes;
    child_ptr, node_token: the trie's CSR arrays. normalize: re-normalise each beam's log-probs
    with a log-softmax over its valid children. max_fanout: a bound on the children of any live
    beam's node (the trie's fan-out at this depth); None reads the trie's largest fan-out, one
    host synchronisation.
    """
    batch, beams, vocab = log_probs.shape
    num_nodes = node_token.numel()
    if max_fanout is None:
        max_fanout = int((child_ptr[1:] - child_ptr[:-1]).max())
    in_trie = (nodes >= 0) & (nodes < num_nodes)
    safe_nodes = torch.where(in_trie, nodes, 0)
    first_child = child_ptr[safe_nodes]
    # A valid node has at most V children inside the node array; other runs (arrays not from a
    # checked Trie) are cut at V, then dropped if still outside, as in the kernels.
    run_length = (child_ptr[safe_nodes + 1] - first_child).clamp(max=vocab)
    run_in_trie = (first_child >= 0) & (run_length >= 0) & (first_child <= num_nodes - run_length)
    live = in_trie & run_in_trie & (beam_scores > float("-inf"))
    num_children = torch.where(live, run_length, 0)

    slot = torch.arange(max_fanout, device=nodes.device)
    valid = slot < num_children.unsqueeze(-1)  # (B, K, F)
    child = torch.where(valid, first_child.unsqueeze(-1) + slot, 0)
    token = node_token[child]
    valid &= (token >= 0) & (token < vocab)
    token = torch.where(valid, token, 0)
    child_log_probs = log_probs.gather(2, token)
    if normalize:
        masked = child_log_probs.masked_fill(~valid, float("-inf"))
        child_log_probs = child_log_probs - torch.logsumexp(masked, dim=2, keepdim=True)
    scores = beam_scores.unsqueeze(-1) + child_log_probs
    valid &= scores > float("-inf")  # also drops NaN
    scores = scores.masked_fill(~valid, float("-inf")).reshape(batch, beams * max_fanout)

    # Positions are numbered parent-major then token order, so the lower position wins a tie.
    position = torch.arange(beams * max_fanout, device=nodes.device)
    keys = order_key(scores) * _POSITION_RANGE + (_POSITION_RANGE - 1 - position)
    num_kept = min(beam_size, beams * max_fanout)
    best = keys.topk(num_kept, dim=1).indices
    kept = valid.reshape(batch, -1).gather(1, best)
    out_scores = scores.gather(1, best).masked_fill(~kept, float("-inf"))
    out_parents = torch.where(kept, best // max_fanout, -1)
    out_tokens = torch.where(kept, token.reshape(batch, -1).gather(1, best), -1)
    out_nodes = torch.where(kept, child.reshape(batch, -1).gather(1, best), -1)
    if num_kept < beam_size:
        pad = beam_size - num_kept
        out_scores = torch.nn.functional.pad(out_scores, (0, pad), value=float("-inf"))
        out_parents, out_tokens, out_nodes = (torch.nn.functional.pad(t, (0, pad), value=-1)
                                              for t in (out_parents, out_tokens, out_nodes))
    return out_scores, out_parents, out_tokens, out_nodes
