"""The per-batch plans: every index map the JSA launches derive from a batch's lengths and anchors.

A layer's launches (compression forward and backward, the cmp + selection forward, the sparse
forward and backward) map programs to jagged work through small tensors built on the device from
cu_seqlens, cu_cmp and the anchor mask. They depend on the batch and the tile sizes only, so a model
builds them once per batch and hands them to every layer, forward and backward, instead of each
launch rebuilding them (on a GPU, a few dozen tiny kernels a layer). Sizes come from shapes alone
(`max_tiles` bounds), so building a plan reads nothing on the host.

    compress = compress_plan(cu_seqlens, cu_cmp, num_blocks, block, stride)
    attention = attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, num_cmp_rows, tile_tokens, block_n)

tile_tokens, block_n: the tokens per query tile of jsa_sparse's walk and the keys per program of its
key-major work (`jsa_sparse.launch_geometry`: "tile_tokens", "dkv_block_n"); the kernels check that a
plan's maps have the sizes their own geometry gives.
"""
from typing import NamedTuple

import torch

from .common import enumerate_jagged, jagged_tiles, max_tiles


class CompressPlan(NamedTuple):
    """jsa_compress's maps for num_blocks compressed rows (a static bound on cu_cmp[-1])."""
    starts: torch.Tensor         # (num_blocks,) int32: each block's first token, -1 past cu_cmp[-1]
    dx_row_seq: torch.Tensor     # (num_blocks + B*(shifts-1),) int32: the dx program rows' sequence
    dx_row_index: torch.Tensor   #   and the row's index within it (shifts = ceil(block / stride))


class AttentionPlan(NamedTuple):
    """jsa_cmp's and jsa_sparse's maps. "(seq, start)" pairs are `jagged_tiles` maps."""
    select_tile_seq: torch.Tensor    # tiles of select_q_block queries: the cmp + selection programs
    select_tile_start: torch.Tensor  #   and the inverse selection map of the backward
    token_tile: torch.Tensor         # (T_total,) int64: each token's select tile
    query_tile_seq: torch.Tensor     # tiles of tile_tokens queries: the query-major walk
    query_tile_start: torch.Tensor
    anchor_list: torch.Tensor        # (T_total,) int32: the anchors' token indices, packed, ascending
    cu_anchor: torch.Tensor          # (B+1,) int32: sequence b's anchors are anchor_list[cu_anchor[b]:cu_anchor[b+1]]
    anchor_prefix: torch.Tensor      # (T_total+1,) int32: anchors before each token (an anchor's rank)
    anchor_chunk_seq: torch.Tensor   # chunks of block_n anchors (over cu_anchor): jrn dk/dv programs
    anchor_chunk_start: torch.Tensor
    cmp_chunk_seq: torch.Tensor      # chunks of block_n compressed rows (over cu_cmp): dk_cmp/dv_cmp programs
    cmp_chunk_start: torch.Tensor
    key_block_seq: torch.Tensor      # selection blocks of select_block keys: the local dk/dv programs
    key_block_start: torch.Tensor


def block_starts(cu_seqlens, cu_cmp, num_blocks: int, stride: int) -> torch.Tensor:
    """Global token index (int32, (num_blocks,)) of each compressed block's first token; -1 for the
    padding rows past cu_cmp[-1] (num_blocks may be a static bound on the block count)."""
    seq, index = enumerate_jagged(cu_cmp[1:] - cu_cmp[:-1], num_blocks)
    return torch.where(seq >= 0, cu_seqlens[seq.long()] + index * stride, -1).to(torch.int32)


def compress_plan(cu_seqlens, cu_cmp, num_blocks: int, block: int, stride: int) -> CompressPlan:
    # The dx launch walks rows of stride tokens: a sequence with c blocks has c + shifts - 1 rows
    # that some block covers.
    shifts = -(-block // stride)
    counts = torch.where(cu_cmp[1:] > cu_cmp[:-1], cu_cmp[1:] - cu_cmp[:-1] + shifts - 1, 0)
    num_rows = num_blocks + (cu_seqlens.shape[0] - 1) * (shifts - 1)
    return CompressPlan(block_starts(cu_seqlens, cu_cmp, num_blocks, stride), *enumerate_jagged(counts, num_rows))


def anchor_index(anchor_mask: torch.Tensor, cu_seqlens: torch.Tensor):
    """(anchor_list, cu_anchor, anchor_prefix) without a host sync: a cumsum ranks the anchors, a
    scatter packs them."""
    total = anchor_mask.numel()
    prefix = torch.zeros(total + 1, dtype=torch.int32, device=anchor_mask.device)
    prefix[1:] = torch.cumsum(anchor_mask.to(torch.int32), 0)
    slot = torch.where(anchor_mask, prefix[1:] - 1, total).long()
    packed = torch.full((total + 1,), -1, dtype=torch.int32, device=anchor_mask.device)
    packed.scatter_(0, slot, torch.arange(total, dtype=torch.int32, device=anchor_mask.device))
    return packed[:total], prefix[cu_seqlens.long()], prefix


def token_tiles(cu_seqlens, block: int, total: int) -> torch.Tensor:
    """Index (int64, (total,)) of each token's tile in `jagged_tiles(cu_seqlens, block, ...)`."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tiles = (lengths + block - 1) // block
    tiles_before = torch.cumsum(tiles, 0) - tiles
    token = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], token, right=True)
    return tiles_before[seq] + (token - cu_seqlens[seq]) // block


def attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, num_cmp_rows: int, tile_tokens: int,
                   block_n: int) -> AttentionPlan:
    """cu_cmp may be None when there is no cmp branch (its chunk maps are then empty)."""
    total, batch = anchor_mask.shape[0], cu_seqlens.shape[0] - 1
    anchor_list, cu_anchor, anchor_prefix = anchor_index(anchor_mask, cu_seqlens)
    if cu_cmp is None:
        cmp_chunks = (cu_seqlens.new_empty(0, dtype=torch.int32),) * 2
    else:
        cmp_chunks = jagged_tiles(cu_cmp, block_n, max_tiles(num_cmp_rows, batch, block_n))
    return AttentionPlan(
        *jagged_tiles(cu_seqlens, config.select_q_block, max_tiles(total, batch, config.select_q_block)),
        token_tiles(cu_seqlens, config.select_q_block, total),
        *jagged_tiles(cu_seqlens, tile_tokens, max_tiles(total, batch, tile_tokens)),
        anchor_list, cu_anchor, anchor_prefix,
        *jagged_tiles(cu_anchor, block_n, max_tiles(total, batch, block_n)),
        *cmp_chunks,
        *jagged_tiles(cu_seqlens, config.select_block, max_tiles(total, batch, config.select_block)),
    )


def check_tiles(tile_seq: torch.Tensor, total: int, num_seqs: int, block: int, what: str):
    """A plan's map must have the size this launch's own tile size gives."""
    if tile_seq.shape[0] != max_tiles(total, num_seqs, block):
        raise ValueError(f"the plan's {what} map has {tile_seq.shape[0]} entries, this launch needs "
                         f"{max_tiles(total, num_seqs, block)} (tiles of {block}): a plan built for other tile sizes")
