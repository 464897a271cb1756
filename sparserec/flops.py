"""Exact FLOP accounting for JSA (SPEC §1): useful FLOPs per branch against dense attention.

Attention FLOPs are 4·D per visible (query, key) pair and query head (2·D for QKᵀ, 2·D for PV);
the linear compression costs 2·block·D·D per compressed block, kv head and tensor (K and V).
The slc count needs the selection, which depends on the data: pass `selection` (from
`sparserec.reference.jsa_attention(..., return_selection=True)`) for the exact count; without it
the count is the largest any selection could give (`slc_exact=False`), so savings are never
overstated.
"""
from dataclasses import dataclass, field

import torch

from .config import JSAConfig
from .reference.jsa import BRANCHES, num_compressed_blocks


@dataclass
class JSAFlops:
    branches: dict = field(default_factory=lambda: dict.fromkeys(BRANCHES, 0))
    compress: int = 0
    dense: int = 0
    slc_exact: bool = True

    @property
    def useful(self) -> int:
        return sum(self.branches.values()) + self.compress

    @property
    def savings(self) -> float:
        """Dense FLOPs per useful FLOP (how many times less work JSA needs)."""
        return self.dense / self.useful if self.useful else float("inf")


def _window_pairs(length: int, window: int, causal: bool) -> int:
    t = torch.arange(length)
    if causal:
        return int(torch.clamp(t + 1, max=window).sum())
    return int((torch.clamp(t + window - 1, max=length - 1) - torch.clamp(t - window + 1, min=0) + 1).sum())


def _cmp_pairs(length: int, config: JSAConfig) -> int:
    num_cmp = num_compressed_blocks(length, config.block, config.stride)
    if not config.causal:
        return length * num_cmp
    first_query = torch.arange(num_cmp) * config.stride + config.block - 1
    return int((length - first_query).sum())


def _anchor_pairs(length: int, anchors: torch.Tensor, causal: bool) -> int:
    positions = anchors.nonzero().flatten()
    return int((length - positions).sum()) if causal else length * len(positions)


def _block_pairs(length: int, config: JSAConfig) -> torch.Tensor:
    """(T, num_sel): keys of selection block j that query t may see if j is selected."""
    num_sel = -(-length // config.select_block)
    start = torch.arange(num_sel) * config.select_block
    end = torch.clamp(start + config.select_block, max=length)
    if not config.causal:
        return (end - start).expand(length, num_sel)
    t = torch.arange(length)[:, None]
    return torch.clamp(torch.minimum(end[None, :], t + 1) - start[None, :], min=0)


def _selection_pairs(length: int, config: JSAConfig, selection: torch.Tensor) -> int:
    """Exact slc pairs summed over kv heads, given selection (T, Hkv, top_n)."""
    pairs = _block_pairs(length, config)
    picked = selection.clamp(min=0)
    per_token = torch.gather(pairs[:, None, :].expand(-1, selection.shape[1], -1), 2, picked)
    return int((per_token * (selection >= 0)).sum())


def _max_selection_pairs(length: int, config: JSAConfig) -> int:
    """Largest slc pairs of one kv head any selection could give (top-N per query tile)."""
    pairs = _block_pairs(length, config)
    num_sel = pairs.shape[1]
    tile_of = torch.arange(length) // config.select_q_block
    num_tiles = int(tile_of[-1]) + 1
    per_tile = torch.zeros(num_tiles, num_sel, dtype=pairs.dtype).index_add_(0, tile_of, pairs)
    # Causally ineligible blocks give 0 pairs, so the N blocks with most pairs bound any selection.
    best = torch.topk(per_tile, min(config.top_n, num_sel), dim=1).values
    return int(best.sum())


def jsa_flops(lengths, config: JSAConfig, heads: int, head_dim: int, kv_heads=None,
              anchor_mask=None, selection=None) -> JSAFlops:
    """FLOPs of JSA over sequences of the given lengths.

    lengths: sequence lengths (ints or a 1-D tensor). anchor_mask: packed (sum(lengths),) bool,
    or None for no anchors. selection: packed (sum(lengths), Hkv, top_n) for an exact slc count.
    """
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    lengths = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be non-negative, got {lengths}")
    total = sum(lengths)
    for name, tensor in (("anchor_mask", anchor_mask), ("selection", selection)):
        if tensor is not None and tensor.shape[0] != total:
            raise ValueError(f"{name} must have one row per token ({total}), got {tensor.shape[0]}")
    group = heads // kv_heads
    per_pair = 4 * head_dim
    result = JSAFlops(slc_exact=selection is not None)
    offset = 0
    for length in lengths:
        if length == 0:
            continue
        rows = slice(offset, offset + length)
        offset += length
        pairs = {
            "cmp": heads * _cmp_pairs(length, config),
            "win": heads * _window_pairs(length, config.window, config.causal),
            "jrn": heads * (0 if anchor_mask is None else _anchor_pairs(length, anchor_mask[rows].cpu(), config.causal)),
            "slc": group * (_selection_pairs(length, config, selection[rows].cpu()) if selection is not None
                            else kv_heads * _max_selection_pairs(length, config)),
        }
        for branch, count in pairs.items():
            result.branches[branch] += per_pair * count
        num_cmp = num_compressed_blocks(length, config.block, config.stride)
        result.compress += 2 * kv_heads * num_cmp * 2 * config.block * head_dim * head_dim
        dense_pairs = length * (length + 1) // 2 if config.causal else length * length
        result.dense += per_pair * heads * dense_pairs
    return result
