"""Exact FLOP accounting for JSA (SPEC §1): useful FLOPs per branch against dense attention.

Attention FLOPs are 4·D per visible (query, key) pair and query head (2·D for QKᵀ, 2·D for PV);
the linear compression costs 2·block·D·D per compressed block, kv head and tensor (K and V).
The slc count needs the selection, which depends on the data: pass `selection` (from
`sparserec.reference.jsa_attention(..., return_selection=True)`) for the exact count; without it
the count is the largest any selection could give (`slc_exact=False`), so savings are never
overstated.

`triton_executed_flops` counts what the Triton kernels actually execute (every tile product of
every chunk their programs visit, padding included), so savings are measured, not only modelled;
tests/test_executed_flops.py checks it against the tl.dot calls of an interpreted run.
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
              anchor_mask=None, selection=None, value_dim=None) -> JSAFlops:
    """FLOPs of JSA over sequences of the given lengths.

    lengths: sequence lengths (ints or a 1-D tensor). anchor_mask: packed (sum(lengths),) bool,
    or None for no anchors. selection: packed (sum(lengths), Hkv, top_n) for an exact slc count.
    value_dim: the width of v (default head_dim): a query-key pair costs 2·D (score) + 2·Dv (P·V).
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
    value_dim = value_dim or head_dim
    per_pair = 2 * head_dim + 2 * value_dim
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
        result.compress += kv_heads * num_cmp * 2 * config.block * (head_dim * head_dim + value_dim * value_dim)
        dense_pairs = length * (length + 1) // 2 if config.causal else length * length
        result.dense += per_pair * heads * dense_pairs
    return result


# ---------------------------------------------------------------------------------------------
# FLOPs the Triton kernels execute
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _matmul(m: int, n: int, k: int) -> int:
    """FLOPs of one (m x k) @ (k x n) tile product: every executed count is a sum of these."""
    return 2 * m * n * k


def _steps(lo, hi, step: int):
    """Iterations of `range(lo, hi, step)`, elementwise over tensors."""
    return (torch.clamp(torch.as_tensor(hi - lo), min=0) + step - 1) // step


@dataclass
class KernelFlops:
    """Matmul FLOPs the Triton JSA kernels execute per kernel, whole tiles (padding included)."""

    forward: dict
    backward: dict

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        return sum(self.backward.values())


def _triton_tiles(config: JSAConfig, head_dim: int, group: int) -> dict:
    """The tile sizes the Triton kernels launch with, from each kernel module's launch_geometry.
    sparse_m: rows of a query-major tile (`group` query heads packed), sparse_tokens its tokens."""
    from .triton_kernels import jsa_cmp, jsa_compress, jsa_sparse

    compress = jsa_compress.launch_geometry(head_dim)
    cmp = jsa_cmp.launch_geometry(config, head_dim)
    sparse = jsa_sparse.launch_geometry(config, head_dim, group=group)
    return dict(
        cmp_d=cmp["block_d"], sparse_d=sparse["block_d"],
        compress_fwd_c=compress["fwd_block_c"], compress_dw_c=compress["dw_block_c"],
        compress_dx_c=compress["dx_block_c"], dw_splits=compress["dw_splits"],
        select_m=cmp["select_block_m"], select_n=cmp["select_block_n"], select_j=cmp["select_block_j"],
        sparse_m=sparse["block_m"], sparse_tokens=sparse["tile_tokens"], sparse_n=sparse["block_n"],
        sparse_dkv_m=sparse["dkv_block_m"],
        sparse_dkv_n=sparse["dkv_block_n"], compact_m=sparse["compact_block_m"],
    )


def _visible_cmp(last_row, num_cmp: int, config: JSAConfig):
    """Compressed blocks visible to a query at `last_row` (jsa_cmp._visible_blocks)."""
    if not config.causal:
        return torch.full_like(last_row, num_cmp)
    reach = torch.where(last_row >= config.block - 1, (last_row - config.block + 1) // config.stride + 1, 0)
    return torch.clamp(reach, max=num_cmp)


def _cmp_flops(n: int, num_cmp: int, config: JSAConfig, heads: int, t: dict):
    """The cmp branch: per selection tile, its row chunks x chunks of their visible compressed blocks
    (forward, jsa_cmp); in jsa_sparse's backward, its compact-key chunks of compressed blocks x the
    query rows that may see them (dk, dv and dq: five tile products)."""
    dim = t["cmp_d"]
    tile, rows = config.select_q_block, t["select_m"]
    chunk_end = torch.arange(0, n, tile)[:, None] + torch.clamp(torch.arange(0, tile, rows) + rows, max=tile)
    chunk_visible = _visible_cmp(torch.clamp(chunk_end, max=n) - 1, num_cmp, config)
    forward = int(_steps(0, chunk_visible, t["select_n"]).sum()) * 2 * _matmul(rows, t["select_n"], dim)
    key_m, key_n = t["compact_m"], t["sparse_dkv_n"]
    first_row = torch.arange(0, num_cmp, key_n)
    first_row = first_row * config.stride + config.block - 1 if config.causal else torch.zeros_like(first_row)
    dkv = int(_steps(first_row, n, key_m).sum()) * 5 * _matmul(key_n, key_m, t["sparse_d"])
    return heads * forward, heads * dkv


def _select_flops(n: int, num_cmp: int, config: JSAConfig, heads: int, kv_heads: int, t: dict) -> int:
    """jsa_cmp._cmp_fwd_select's selection step: per (selection tile, kv head), chunks of its
    eligible selection blocks, each re-scoring the compressed blocks overlapping them for every head of the group."""
    last = torch.clamp(torch.arange(0, n, config.select_q_block) + config.select_q_block, max=n) - 1
    num_sel = _cdiv(n, config.select_block)
    eligible = torch.full_like(last, num_sel)
    if config.causal:
        eligible = torch.clamp(last // config.select_block + 1, max=num_sel)
    visible = _visible_cmp(last, num_cmp, config)
    cmp_chunks = 0
    for j0 in range(0, num_sel, t["select_j"]):
        span_start = j0 * config.select_block
        i_lo = (span_start - config.block) // config.stride + 1 if span_start >= config.block else 0
        i_hi = torch.clamp(visible, max=(j0 + t["select_j"]) * (config.select_block // config.stride))
        cmp_chunks += int(torch.where(eligible > j0, _steps(i_lo, i_hi, t["select_n"]), 0).sum())
    row_chunks = _cdiv(config.select_q_block, t["select_m"])
    return kv_heads * cmp_chunks * (heads // kv_heads) * row_chunks * _matmul(t["select_m"], t["select_n"], t["cmp_d"])


def _sparse_flops(n: int, config: JSAConfig, heads: int, kv_heads: int, anchors, selection, t: dict):
    """jsa_sparse, one sequence: anchors (A,) local positions; selection (n, Hkv, top_n)."""
    m, chunk, q_tile, sel_block = t["sparse_tokens"], t["sparse_n"], config.select_q_block, config.select_block
    key_m, key_n = t["sparse_dkv_m"], t["sparse_dkv_n"]
    group, window, causal = heads // kv_heads, config.window, config.causal
    tile_product = _matmul(t["sparse_m"], chunk, t["sparse_d"])

    # Query-major (forward; dq): per query tile of m tokens and kv head (its group's heads packed into
    # the tile's rows), key chunks of its window, anchors and selected blocks.
    start = torch.arange(0, n, m)
    last = torch.clamp(start + m, max=n) - 1
    win_hi = last + 1 if causal else torch.clamp(last + window, max=n)
    per_tile = _steps(torch.clamp(start - window + 1, min=0), win_hi, chunk)
    per_tile += _steps(0, torch.searchsorted(anchors, last, right=True) if causal else len(anchors), chunk)
    per_kv_head = 0
    for step in range(_cdiv(m, q_tile) + 1):  # the selection tiles a query tile overlaps
        tile = start // q_tile + step
        picked = selection[torch.clamp(torch.maximum(tile * q_tile, start), max=n - 1)]  # (tiles, Hkv, top_n)
        lo = picked * sel_block
        hi = torch.clamp(lo + sel_block, max=n)
        if causal:
            hi = torch.minimum(hi, last[:, None, None] + 1)
        used = (tile <= last // q_tile)[:, None, None] & (picked >= 0)
        per_kv_head += int(torch.where(used, _steps(lo, hi, chunk), 0).sum())
    query_chunks = kv_heads * int(per_tile.sum()) + per_kv_head

    # Key-major (dk, dv, dq), key_n keys a program: anchor chunks x the query rows that may see them,
    # compact_m rows a step; per key chunk of each selection block, the rows of its window (slc and
    # win merged there) and those of the query tiles that selected the block outside the window's
    # rows, key_m rows a step.
    anchor_first = anchors[::key_n] if causal else torch.zeros_like(anchors[::key_n])
    anchor_rows = heads * int(_steps(anchor_first, n, t["compact_m"]).sum())
    key_lo = torch.arange(0, n, sel_block)[:, None] + torch.arange(0, sel_block, key_n)
    key_hi = torch.minimum(torch.clamp(key_lo + key_n, max=n), (key_lo // sel_block + 1) * sel_block)
    win_lo = key_lo if causal else torch.clamp(key_lo - window + 1, min=0)
    win_rows = _steps(win_lo, torch.clamp(key_hi - 1 + window, max=n), key_m)
    key_rows = heads * int(torch.where(key_lo < key_hi, win_rows, 0).sum())
    tiles = torch.arange(0, n, q_tile)
    picked = selection[tiles][..., None]  # (tiles, Hkv, top_n, 1)
    key_lo = picked * sel_block + torch.arange(0, sel_block, key_n)
    key_hi = torch.minimum(torch.clamp(key_lo + key_n, max=n), (picked + 1) * sel_block)
    first = tiles[:, None, None, None]
    q_lo, q_hi = torch.maximum(first, key_lo) if causal else first, torch.clamp(first + q_tile, max=n)
    win_lo = key_lo if causal else torch.clamp(key_lo - window + 1, min=0)
    win_hi = torch.clamp(key_hi - 1 + window, max=n)
    slc_rows = _steps(q_lo, torch.minimum(q_hi, win_lo), key_m) + _steps(torch.maximum(q_lo, win_hi), q_hi, key_m)
    key_rows += group * int(torch.where((picked >= 0) & (key_lo < key_hi), slc_rows, 0).sum())
    key_product = _matmul(key_m, key_n, t["sparse_d"])
    anchor_product = _matmul(t["compact_m"], key_n, t["sparse_d"])
    return query_chunks * 2 * tile_product, key_rows * 5 * key_product + anchor_rows * 5 * anchor_product


def _compress_flops(lengths, config: JSAConfig, kv_heads: int, t: dict):
    """jsa_compress for K and V: BLOCK_C compressed blocks per program, one tile product per row r
    of the block (forward, dx); dW in splits over the blocks."""
    num_blocks = sum(num_compressed_blocks(n, config.block, config.stride) for n in lengths)
    if not num_blocks:
        return 0, 0
    dim, block = t["cmp_d"], config.block
    c_fwd, c_dw, c_dx = t["compress_fwd_c"], t["compress_dw_c"], t["compress_dx_c"]
    forward = kv_heads * _cdiv(num_blocks, c_fwd) * block * _matmul(c_fwd, dim, dim)
    splits = t["dw_splits"](num_blocks, block * kv_heads)
    per_split = _cdiv(num_blocks, splits)
    dw = block * kv_heads * splits * _cdiv(per_split, c_dw) * _matmul(dim, dim, c_dw)
    num_rows = num_blocks + len(lengths) * (_cdiv(block, config.stride) - 1)
    dx = kv_heads * _cdiv(num_rows, c_dx) * block * _matmul(c_dx, dim, dim)
    return 2 * forward, 2 * (dw + dx)


def triton_executed_flops(lengths, config: JSAConfig, heads: int, head_dim: int, kv_heads: int,
                          anchor_mask: torch.Tensor, selection: torch.Tensor) -> KernelFlops:
    """Matmul FLOPs the Triton backend executes for compress(K), compress(V) and one attention
    call (forward), and for their backward: the key/query chunks each program visits, counted with
    the kernels' own loop bounds and tile sizes (`_triton_tiles`), each chunk costing its full tile
    products. Elementwise work is not counted. Forward: compress, cmp (attention) and select
    (re-scoring for the top-N; not part of the useful count), both in jsa_cmp's one launch, sparse (slc + jrn + win). Backward:
    compress (dW, dx), cmp (dk, dv, dq), sparse (anchor and block dk, dv, dq).

    anchor_mask (T,) bool and selection (T, Hkv, top_n) packed as for `jsa_flops`, selection as the
    kernels picked it (`sparserec.ops.triton_backend.attention(..., return_selection=True)`).
    """
    tiles = _triton_tiles(config, head_dim, heads // kv_heads)
    lengths = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    anchor_mask, selection = anchor_mask.cpu(), selection.cpu().long()
    result = KernelFlops(dict.fromkeys(("compress", "cmp", "select", "sparse"), 0),
                         dict.fromkeys(("compress", "cmp", "sparse"), 0))
    result.forward["compress"], result.backward["compress"] = _compress_flops(lengths, config, kv_heads, tiles)
    offset = 0
    for n in lengths:
        rows = slice(offset, offset + n)
        offset += n
        if n == 0:
            continue
        num_cmp = num_compressed_blocks(n, config.block, config.stride)
        forward, backward = _cmp_flops(n, num_cmp, config, heads, tiles)
        result.forward["cmp"] += forward
        result.backward["cmp"] += backward
        result.forward["select"] += _select_flops(n, num_cmp, config, heads, kv_heads, tiles)
        anchors = anchor_mask[rows].nonzero().flatten()
        forward, backward = _sparse_flops(n, config, heads, kv_heads, anchors, selection[rows], tiles)
        result.forward["sparse"] += forward
        result.backward["sparse"] += backward
    return result
