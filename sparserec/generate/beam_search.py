"""Trie-constrained beam search for any autoregressive model (SPEC §4).

The loop owns the beams (scores, trie nodes) and calls the model once per generated token through
`step_fn`; the model owns its state (e.g. the decoder's KV cache) and reorders it by the parent
rows it is given. One `trie_beam_step` per token: no Python loop over beams, no host sync.

Forced steps (S²GR's thinking steps, arXiv 2601.18664): fixed tokens fed to the model before it
scores a given depth of the item path. They do not branch (every beam takes them) and add no
score, so the beams, their scores and the exactness of the search are those of the model whose
context holds them; they ride along with the previous step's token in the same `step_fn` call.
"""
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ..ops.trie import MAX_PADDED_BEAMS, max_beam_size, trie_beam_step
from .trie import Trie

# step_fn(tokens, parent_rows) -> log_probs; see beam_search.
StepFn = Callable[[Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


def beam_search(step_fn: StepFn, trie: Trie, batch_size: int, beam_size: int, *,
                prefix_tokens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
                normalize: bool = False, forced_tokens: Optional[Mapping[int, Sequence[int]]] = None):
    """Decode the beam_size best items of each batch row -> (items, scores), both (B, K), best first.

    The model keeps B*K rows of state, row b*K + k for beam k of batch row b, and is called once
    per token as step_fn(tokens, parent_rows):
      tokens       (B*K, 1 + f) int64, the token each beam chose at the previous step, then the f
                   forced tokens of this step (f = 0 without forced_tokens). On the first call the
                   model starts from its own start token(s), followed by tokens: None, or the
                   (B*K, f) forced tokens of depth 0.
      parent_rows  (B*K,) int64, the row of the previous state each beam continues; None on the
                   first call. Reorder the state first, e.g. cache = cache.index_select(0, parent_rows).
      returns      log-probs of the next token for every row, (B*K, V) or (B, K, V), V >= trie.vocab_size.
    Beams without a valid continuation score -inf; they are fed token 0 and the parent row of
    beam 0 of their batch row, and what the model returns for them is ignored.

    prefix_tokens: optional distinct token ids of a free first step, outside the trie (e.g. the
    behavior token): the first token is chosen among them, then the item path follows. An item
    reached under several prefixes is returned once, with its best score.
    normalize: re-normalise each step's log-probs over the allowed tokens (see trie_beam_step).
    forced_tokens: {depth d of the item path: token ids} fed, in order, before the model scores the
    path's token d (after the prefix token, if any, for d = 0): non-branching steps with no score.

    Returns items (B, K) int64 item ids, -1 where fewer than K items were found, and scores
    (B, K) float32, the summed log-probs of each item's tokens (-inf where missing).
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    if not isinstance(trie, Trie):
        raise TypeError(f"trie must be a sparserec.generate.Trie, got {type(trie).__name__}")
    for name, value in (("batch_size", batch_size), ("beam_size", beam_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if beam_size > max_beam_size(trie):
        raise ValueError(f"beam_size={beam_size} is larger than the trie's {trie.num_items} items and than "
                         f"{MAX_PADDED_BEAMS}: a beam search cannot find more items than the trie holds")
    device = trie.device
    forced = _checked_forced_tokens(forced_tokens, trie.depth, batch_size * beam_size, device)
    steps = [trie] * trie.depth
    if prefix_tokens is not None:
        steps.insert(0, _prefix_trie(prefix_tokens, device))

    scores = torch.full((batch_size, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    nodes = torch.zeros(batch_size, beam_size, dtype=torch.long, device=device)
    first_row = torch.arange(batch_size, device=device).unsqueeze(1) * beam_size
    tokens = parent_rows = None
    for index, step_trie in enumerate(steps):
        depth = index - (prefix_tokens is not None)  # of the item path; -1: the prefix step
        if depth in forced:
            tokens = forced[depth] if tokens is None else torch.cat([tokens, forced[depth]], dim=1)
        log_probs = step_fn(tokens, parent_rows)
        if not isinstance(log_probs, torch.Tensor) or log_probs.dim() not in (2, 3) \
                or log_probs.shape[:-1].numel() != batch_size * beam_size:
            shape = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
            raise ValueError(f"step_fn must return log-probs of shape (B*K, V) or (B, K, V) with "
                             f"B*K = {batch_size * beam_size}, got {shape}")
        log_probs = log_probs.reshape(batch_size, beam_size, -1).float()
        scores, parents, chosen, nodes = trie_beam_step(log_probs, scores, nodes, step_trie, beam_size,
                                                        normalize=normalize)
        parent_rows = (first_row + parents.clamp(min=0)).reshape(-1)
        tokens = chosen.clamp(min=0).reshape(-1, 1)
        if step_trie is not trie:  # the prefix is chosen; every beam enters the item trie at its root
            nodes = torch.zeros_like(nodes)

    items = trie.item_of(nodes)
    if prefix_tokens is None:
        return items, scores  # distinct trie leaves are distinct items
    return _keep_first_occurrences(items, scores)


def _checked_forced_tokens(forced_tokens, depth: int, rows: int, device) -> dict:
    """{depth: (rows, f) int64 tokens on device} of a {depth: token ids} mapping, checked."""
    if forced_tokens is None:
        return {}
    if not isinstance(forced_tokens, Mapping):
        raise TypeError(f"forced_tokens must be a mapping {{path depth: token ids}}, "
                        f"got {type(forced_tokens).__name__}")
    forced = {}
    for at, tokens in forced_tokens.items():
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < depth:
            raise ValueError(f"forced_tokens keys must be path depths in [0, {depth}), got {at!r}")
        try:
            tokens = torch.as_tensor(tokens)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"forced_tokens[{at}] must be a 1-D sequence of token ids: {error}") from None
        if tokens.dim() != 1 or tokens.numel() == 0 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool \
                or bool((tokens < 0).any()):
            raise ValueError(f"forced_tokens[{at}] must be a non-empty 1-D sequence of non-negative integer token "
                             f"ids, got {tokens.tolist()}")
        forced[at] = tokens.to(device=device, dtype=torch.int64).expand(rows, -1)
    return forced


def _prefix_trie(prefix_tokens, device) -> Trie:
    try:
        prefix_tokens = torch.as_tensor(prefix_tokens)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"prefix_tokens must be a 1-D sequence of token ids: {error}") from None
    if prefix_tokens.dim() != 1 or prefix_tokens.numel() == 0:
        raise ValueError(f"prefix_tokens must be a non-empty 1-D sequence of token ids, got shape "
                         f"{tuple(prefix_tokens.shape)}")
    if prefix_tokens.dtype.is_floating_point or prefix_tokens.dtype.is_complex or prefix_tokens.dtype == torch.bool:
        raise TypeError(f"prefix_tokens must be integer token ids, got {prefix_tokens.dtype}")
    if (prefix_tokens < 0).any():
        raise ValueError(f"prefix_tokens must be non-negative token ids, got {prefix_tokens.tolist()}")
    if prefix_tokens.unique().numel() != prefix_tokens.numel():
        raise ValueError(f"prefix_tokens must be distinct, got {prefix_tokens.tolist()}")
    return Trie(prefix_tokens.unsqueeze(1), device=device)


def _keep_first_occurrences(items, scores):
    """Each row best first: drop repeated items (and -1) to the end, as -1 / -inf."""
    beam_size = items.shape[1]
    earlier = torch.ones(beam_size, beam_size, dtype=torch.bool, device=items.device).tril(-1)
    repeated = ((items.unsqueeze(2) == items.unsqueeze(1)) & earlier).any(dim=2) | (items < 0)
    order = torch.sort(repeated.to(torch.uint8), dim=1, stable=True).indices
    dropped = repeated.gather(1, order)
    return (items.gather(1, order).masked_fill(dropped, -1),
            scores.gather(1, order).masked_fill(dropped, float("-inf")))
