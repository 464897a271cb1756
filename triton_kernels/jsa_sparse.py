"""Fused slc + jrn + win attention with the gated sum (SPEC §1), forward and backward, in Triton.

The three token-level JSA branches share one kernel: a program owns a tile of queries of one kv
head's group of query heads, packed into its BLOCK_M rows as (token, head) pairs, and walks, one
branch after the other, its tile's selected blocks (slc: the group shares them), the sequence's
anchors (jrn, through a compact anchor list) and its window (win). Each branch runs its own online
softmax; the gated sum g_slc*o_slc + g_jrn*o_jrn + g_win*o_win is written once.

Interface (called by sparserec.ops.triton_backend):

    out, lse, branches = sparse_attention_fwd(q, k, v, gates, selection, anchor_mask, cu_seqlens,
                                              config, store_branches=False, o_cmp=None)
    dq, dk, dv, dgates, dk_cmp, dv_cmp = sparse_attention_bwd(dout, q, k, v, gates, selection, anchor_mask,
                                                              cu_seqlens, config, branches, lse, cmp=None)
    (cmp = (k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp) from jsa_cmp's forward adds the cmp branch.)

  q (T_total, H, D); k (T_total, Hkv, D), v (T_total, Hkv, Dv) with H % Hkv == 0; gates (T_total, H, 4), of which
  channels 1, 2, 3 = (slc, jrn, win) are used (channel 0, cmp, only with o_cmp / cmp); selection
  (T_total, Hkv, top_n) integer: each token's selection tile's blocks, sequence-local, -1
  padded, shared by the config.select_q_block tokens of an aligned tile; anchor_mask (T_total,)
  bool; cu_seqlens (B+1,) integer offsets. Any strides; all on one device.
  out (T_total, H, Dv) in q's dtype (Dv may differ from D: extra value columns of the same P·V),
  plus g_cmp * o_cmp when the cmp branch's output o_cmp is passed (the op's whole gated sum).
  lse (3, H, T_total) fp32: per branch (slc, jrn, win) the natural-log logsumexp of the scaled
  scores, +inf where a query sees no key in that branch (its output is 0).
  branches (3, T_total, H, Dv) in q's dtype: o_slc, o_jrn, o_win, stored only when
  store_branches=True (the backward reads them), else None.
  dq, dk, dv like q, k, v; dgates in gates' dtype: (T_total, H, 3) d/d(g_slc, g_jrn, g_win), or
  with `cmp=` (T_total, H, 4) in the gates' channel order; dk_cmp, dv_cmp like k_cmp, v_cmp with
  `cmp=`, else None.
  Optional block_m / block_n override the tile sizes (tests use them to force many tiles).

Backward, two launches (four kinds of programs), FlashAttention-2 style: every score tile is
recomputed once, by the program that owns its keys, which computes dk, dv and adds the rows' dq
share atomically to an fp32 dq (five tile products per (rows, keys) pair; a separate query-major dq
walk would recompute the scores and dP, seven):
  1. query-major tiles, no keys: d(gate_b) = <dout, o_b> and delta_b = g_b * d(gate_b) per branch
     (and the cmp gate's gradient, from o_cmp, given `cmp=`);
  2. in the same launch, compact keys, which every query of their sequence may see: chunks of a
     sequence's anchors (the jrn part of dk/dv, in fp32, compact by anchor rank) and, given
     `cmp=`, chunks of its compressed blocks (dk_cmp, dv_cmp), with their branches' dq. They
     recompute delta from the branch output the forward stored (o_jrn, o_cmp), an extra read of
     one (rows, Dv) tile per step, so that they need nothing the tiles of 1 write; and overflow
     slices of heavily selected blocks: the slc part of a block's dk/dv from its selecting tiles
     past the first SLC_TILES, SLC_TILES a program, into per-slice fp32 partials (delta from o_slc);
  3. key-major over selection blocks (its own launch, after both): the slc (first SLC_TILES
     selecting tiles) and win parts of dk/dv and dq, one merged step where a row sees the keys
     through both, plus the jrn part of the anchors among its keys and the block's overflow
     partials, in slice order, written once. The slc part needs, per selection block, the query
     tiles that selected it: an inverse selection map built on the device by a sort. The split
     bounds every program's work: a block every tile picks (an attention sink) would otherwise
     hold one program for T / select_q_block tiles.
No T x T tensor and no host synchronisation: every grid is an upper bound computed from shapes
alone and idle programs exit, so the launches are safe under CUDA graphs and torch.compile. dk and
dv are deterministic; dq, summed by atomic adds, may differ in its last bits from run to run on a
GPU (as FlashAttention-2's does).
"""
import torch
import triton
import triton.language as tl

from .common import (LOG2E, dot_precision, empty, enumerate_jagged, next_power_of_2, online_softmax_step,
                     pipeline_configs, prune_narrow_warps, size_bucket, tile_bounds)
from .plan import attention_plan, check_tiles

NUM_BRANCHES = 3  # slc, jrn, win = gates channels 1, 2, 3
# In the backward a selection block's own program serves the slc rows of at most this many selecting
# query tiles; further tiles go to overflow programs, SLC_TILES each (_slc_overflow).
SLC_TILES = 8


def _pow2_divisor(n: int, cap: int, smallest: int = 16) -> int:
    """Largest power of two <= cap dividing n, but at least `smallest` (16: tl.dot's smallest tile)."""
    size = cap
    while size > smallest and n % size:
        size //= 2
    return size


def launch_geometry(config, head_dim: int, block_m=None, block_n=None, value_dim=None, group: int = 1) -> dict:
    """Tile sizes of this module's launches for a JSA config: block_m query rows per program of the
    query-major walk, which packs the `group` query heads of a kv head into its rows (group_pad,
    the group rounded up to a power of two, rows per token; the extra ones are masked), so a query
    tile holds tile_tokens = block_m // group_pad tokens; block_n keys per chunk of the walk;
    dkv_block_n keys per program and dkv_block_m query rows per step of the key-major (dk, dv)
    programs over selection blocks, compact_block_m those of the compact-key programs; block_d,
    block_dv padded head dims of q/k and of v (value_dim, default head_dim). sparserec.flops counts
    executed FLOPs from them.

    Query tiles divide select_q_block when they can, so a tile reads one selection; key chunks
    divide select_block when they can, so a chunk lies in one selection block. Packing the group
    (rather than one program per query head) loads each key chunk once for the group, which shares
    its selection, and narrows a tile's span of tokens, so its window and causal walks cover fewer
    keys a row. Warps and pipeline stages are autotuned (common.pipeline_configs, per size class of
    the token count).
    """
    value_dim = value_dim or head_dim
    width = max(head_dim, value_dim)  # register pressure follows the wider of the two
    group_pad = next_power_of_2(group)
    head_rows = block_m or _pow2_divisor(config.select_q_block, 64)  # one head's tile, unpacked
    if block_m is None:
        tile_tokens = _pow2_divisor(config.select_q_block, max(1, 64 // group_pad), max(1, 16 // group_pad))
    else:
        tile_tokens = max(1, block_m // group_pad)
    block_n = block_n or _pow2_divisor(config.select_block, 64 if width <= 64 else 32)
    # The key-major kernels also hold fp32 dk, dv: 64-key chunks spilled at head dim 64 (4 and 8
    # warps), 64-row query steps at head dim 128 (8 warps).
    dkv_block_n = block_n if width <= 32 else min(block_n, 32)
    # Unequal padded widths (extra value columns) put the scores and dP in different MMA layouts;
    # converting between them at 64 rows spilled too.
    dkv_block_m = head_rows if width <= 64 and next_power_of_2(head_dim) == next_power_of_2(value_dim) \
        else min(head_rows, 32)
    # The compact-key programs share a launch with the query-major walk, so one kernel holds both
    # paths' registers; they also load each step's branch output for delta. Halved query steps
    # kept every GQA build of that kernel free of spills (16 is tl.dot's smallest).
    compact_block_m = max(16, dkv_block_m // 2)
    return dict(block_m=tile_tokens * group_pad, tile_tokens=tile_tokens, group_pad=group_pad, block_n=block_n,
                dkv_block_m=dkv_block_m, dkv_block_n=dkv_block_n, compact_block_m=compact_block_m,
                block_d=next_power_of_2(head_dim), block_dv=next_power_of_2(value_dim))


def _inverse_selection(selection, cu_seqlens, config, num_blocks: int, tile_seq, tile_start):
    """Which selection tiles chose each (selection block, kv head), as CSR, on the device.

    Blocks are numbered sequence by sequence, as the plan's key_block map does; (tile_seq,
    tile_start) is the plan's map of selection tiles. Block b, kv head g: entries
    offsets[b*Hkv + g] : offsets[b*Hkv + g + 1] of tile_starts, the sequence-local first tokens of
    the selecting tiles, ascending; counts[b*Hkv + g] their number.
    """
    total, kv_heads, _ = selection.shape
    device = selection.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = tile_seq.clamp(min=0).long()
    token = (cu_seqlens[seq].long() + tile_start.long()).clamp(max=total - 1)
    picked = selection[token].long()  # (tiles, Hkv, top_n)
    blocks = (lengths + config.select_block - 1) // config.select_block
    first_block = torch.cumsum(blocks, 0) - blocks
    chosen = (tile_seq >= 0)[:, None, None] & (picked >= 0) & (picked < blocks[seq][:, None, None])
    heads = torch.arange(kv_heads, device=device)[None, :, None]
    sentinel = num_blocks * kv_heads
    key = torch.where(chosen, (first_block[seq][:, None, None] + picked) * kv_heads + heads, sentinel)
    key = key.flatten()
    order = torch.sort(key, stable=True).indices
    tile_starts = tile_start[:, None, None].expand(picked.shape).flatten()[order].contiguous()
    counts = torch.zeros(sentinel + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(sentinel + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts[:-1], 0)
    return tile_starts, offsets, counts[:-1]


def _overflow_slices(counts, num_entries: int, geometry, config) -> dict:
    """The overflow programs' map, on the device: owner o = block * Hkv + kv head with counts[o]
    selecting tiles gets max(0, ceil(counts[o] / SLC_TILES) - 1) slices, numbered from
    slice_start[o]; the grid is the static bound num_entries // SLC_TILES + 1 (num_entries: the
    inverse selection's entries, chosen or not), spare programs have owner -1."""
    slices = torch.clamp((counts + SLC_TILES - 1) // SLC_TILES - 1, min=0)
    owner, index = enumerate_jagged(slices, num_entries // SLC_TILES + 1)
    slots, device = owner.shape[0], counts.device
    return dict(slice_owner=owner, slice_index=index, slice_start=(torch.cumsum(slices, 0) - slices).to(torch.int32),
                dk_part=empty((slots, config.select_block, geometry["block_d"]), torch.float32, device),
                dv_part=empty((slots, config.select_block, geometry["block_dv"]), torch.float32, device))


# ----------------------------------------------------------------------------------------------
# Query-major walk: the forward; the gates' gradients and softmax deltas in the backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, row_ok, stride_t, offs_d, d_ok, stride_d):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _query_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION: tl.constexpr):
    """One key chunk for a query tile: an online-softmax step (log2 units), state (acc, m_i, l_i)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    return online_softmax_step(acc, m_i, l_i, tl.where(visible, s, float("-inf")), v, PRECISION)


@triton.jit
def _walk_branch(acc, m_i, l_i, q, K, V, Sel, AnchorList, AnchorPrefix,
                 stride_kt, stride_kd, stride_vt, stride_vd, stride_st, stride_sn,
                 seq_start, length, tile_start, tile_last, rows, row_ok, offs_d, d_ok, offs_dv, dv_ok, qk_scale,
                 BRANCH: tl.constexpr, CAUSAL: tl.constexpr, TOP_N: tl.constexpr, SELECT_BLOCK: tl.constexpr,
                 SELECT_Q_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Visit every key chunk a query tile sees in one branch (K, V, Sel at its kv head)."""
    if BRANCH == 0:  # slc: the selected blocks of each selection tile the query tile overlaps
        for sel_tile in range(tile_start // SELECT_Q_BLOCK, tile_last // SELECT_Q_BLOCK + 1):
            sel_row = seq_start + tl.maximum(sel_tile * SELECT_Q_BLOCK, tile_start)
            in_tile = row_ok & (rows // SELECT_Q_BLOCK == sel_tile)
            for slot in range(TOP_N):
                block = tl.load(Sel + sel_row.to(tl.int64) * stride_st + slot * stride_sn).to(tl.int32)
                lo = block * SELECT_BLOCK
                hi = tl.minimum(lo + SELECT_BLOCK, length)
                if CAUSAL:
                    hi = tl.minimum(hi, tile_last + 1)
                hi = tl.where(block >= 0, hi, lo)
                for start in range(lo, hi, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    col_ok = cols < hi
                    k = _load_rows(K, seq_start + cols, col_ok, stride_kt, offs_d, d_ok, stride_kd)
                    v = _load_rows(V, seq_start + cols, col_ok, stride_vt, offs_dv, dv_ok, stride_vd)
                    visible = in_tile[:, None] & col_ok[None, :]
                    if CAUSAL:
                        visible = visible & (cols[None, :] <= rows[:, None])
                    acc, m_i, l_i = _query_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    elif BRANCH == 1:  # jrn: the sequence's anchors (causal: those up to the tile's last query)
        first = tl.load(AnchorPrefix + seq_start)
        if CAUSAL:
            last = tl.load(AnchorPrefix + seq_start + tile_last + 1)
        else:
            last = tl.load(AnchorPrefix + seq_start + length)
        for start in range(first, last, BLOCK_N):
            index = start + tl.arange(0, BLOCK_N)
            col_ok = index < last
            token = tl.load(AnchorList + index, mask=col_ok, other=0)
            k = _load_rows(K, token, col_ok, stride_kt, offs_d, d_ok, stride_kd)
            v = _load_rows(V, token, col_ok, stride_vt, offs_dv, dv_ok, stride_vd)
            visible = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                visible = visible & ((token - seq_start)[None, :] <= rows[:, None])
            acc, m_i, l_i = _query_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    else:  # win: t - w < s <= t (causal) or |t - s| < w
        lo = tl.maximum(tile_start - WINDOW + 1, 0)
        if CAUSAL:
            hi = tile_last + 1
        else:
            hi = tl.minimum(tile_last + WINDOW, length)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            k = _load_rows(K, seq_start + cols, col_ok, stride_kt, offs_d, d_ok, stride_kd)
            v = _load_rows(V, seq_start + cols, col_ok, stride_vt, offs_dv, dv_ok, stride_vd)
            offset = rows[:, None] - cols[None, :]
            visible = row_ok[:, None] & col_ok[None, :] & (offset < WINDOW)
            if CAUSAL:
                visible = visible & (offset >= 0)
            else:
                visible = visible & (offset > -WINDOW)
            acc, m_i, l_i = _query_step(acc, m_i, l_i, q, k, v, visible, qk_scale, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _head_rows(base, rows, heads, row_ok, stride_t, stride_h, offs, offs_ok, stride_d):
    """Pointers (and mask) of one (token, head) row per tile row."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + heads[:, None] * stride_h + offs[None, :] * stride_d
    return ptrs, row_ok[:, None] & offs_ok[None, :]


@triton.jit
def _query_major_tile(
    tile, kv_head, Q, K, V, G, Sel, AnchorList, AnchorPrefix, CuSeqlens, TileSeq, TileStart,
    Out, Lse, Branches, DO, Delta, DGates, OCmp,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc,
    stride_st, stride_sh, stride_sn, stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod, stride_dgt, stride_dgh, stride_dgc, stride_oct, stride_och,
    total_tokens, num_heads, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    TOP_N: tl.constexpr, SELECT_BLOCK: tl.constexpr, SELECT_Q_BLOCK: tl.constexpr, WINDOW: tl.constexpr,
    CAUSAL: tl.constexpr, BACKWARD: tl.constexpr, STORE_BRANCHES: tl.constexpr, WITH_CMP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Query tile `tile` (TileSeq/TileStart, BLOCK_M // GROUP_PAD tokens; sequence -1: nothing to
    do) for every query head of kv head `kv_head`: the tile's rows are (token, head) pairs, token
    major, GROUP_PAD slots per token of which GROUP are heads, so each key chunk is loaded once for
    the whole group (which shares the selection too), and a row's keys are those of its token.
    Forward: Out = gated output, Lse, Branches; WITH_CMP, Out also gets the gated cmp output
    g_cmp * OCmp (gate channel 0). BACKWARD: no keys, only each branch's gate gradient
    rowsum(dout * o_b) into DGates (channels 1..3 with WITH_CMP, 0..2 without; with WITH_CMP the
    cmp branch's, from OCmp, into channel 0) and its softmax delta g_b * d(g_b) into Delta, which
    the key-major programs read.
    """
    seq, seq_start, length, tile_start = tile_bounds(TileSeq, TileStart, CuSeqlens, tile)
    if seq < 0:
        return
    tile_last = tl.minimum(tile_start + BLOCK_M // GROUP_PAD, length) - 1
    slot = tl.arange(0, BLOCK_M)
    member = slot % GROUP_PAD
    rows = tile_start + slot // GROUP_PAD
    row_ok = (rows < length) & (member < GROUP)
    h = kv_head * GROUP + tl.minimum(member, GROUP - 1)  # padding slots repeat the last head, masked
    rows_global = (seq_start + rows).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    gate_rows = rows_global * stride_gt + h * stride_gh

    if BACKWARD:
        ptrs, mask = _head_rows(DO, rows_global, h, row_ok, stride_dot, stride_doh, offs_dv, dv_ok, stride_dod)
        do = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        dgate_rows = rows_global * stride_dgt + h * stride_dgh
        for branch in tl.static_range(3):
            branch_rows = ((branch * total_tokens + rows_global) * num_heads + h) * VALUE_DIM
            o_branch = tl.load(Branches + branch_rows[:, None] + offs_dv[None, :],
                               mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
            dgate = tl.sum(do * o_branch, 1)
            gate = tl.load(G + gate_rows + (1 + branch) * stride_gc, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(DGates + dgate_rows + (branch + WITH_CMP) * stride_dgc, dgate.to(DGates.dtype.element_ty),
                     mask=row_ok)
            tl.store(Delta + (branch * num_heads + h).to(tl.int64) * total_tokens + rows_global, gate * dgate,
                     mask=row_ok)
        if WITH_CMP:
            ptrs, mask = _head_rows(OCmp, rows_global, h, row_ok, stride_oct, stride_och, offs_dv, dv_ok, 1)
            dgate = tl.sum(do * tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), 1)
            tl.store(DGates + dgate_rows, dgate.to(DGates.dtype.element_ty), mask=row_ok)
        return

    K += kv_head * stride_kh
    V += kv_head * stride_vh
    Sel += kv_head * stride_sh
    ptrs, mask = _head_rows(Q, rows_global, h, row_ok, stride_qt, stride_qh, offs_d, d_ok, stride_qd)
    q = tl.load(ptrs, mask=mask, other=0.0)
    total = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)  # gated output
    for branch in tl.static_range(3):
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, m_i, l_i = _walk_branch(
            acc, m_i, l_i, q, K, V, Sel, AnchorList, AnchorPrefix,
            stride_kt, stride_kd, stride_vt, stride_vd, stride_st, stride_sn,
            seq_start, length, tile_start, tile_last, rows, row_ok, offs_d, d_ok, offs_dv, dv_ok,
            qk_scale, branch, CAUSAL, TOP_N, SELECT_BLOCK, SELECT_Q_BLOCK, WINDOW, BLOCK_N, PRECISION)
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        o_branch = acc / l_safe[:, None]
        tl.store(Lse + (branch * num_heads + h).to(tl.int64) * total_tokens + rows_global,
                 tl.where(seen, (m_i + tl.log2(l_safe)) / LOG2E, float("inf")), mask=row_ok)
        if STORE_BRANCHES:
            # Tile-sized pointers and masks are formed where used: live across a walk they spill.
            branch_rows = ((branch * total_tokens + rows_global) * num_heads + h) * VALUE_DIM
            tl.store(Branches + branch_rows[:, None] + offs_dv[None, :],
                     o_branch.to(Branches.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        gate = tl.load(G + gate_rows + (1 + branch) * stride_gc, mask=row_ok, other=0.0).to(tl.float32)
        total += gate[:, None] * o_branch
    if WITH_CMP:
        gate = tl.load(G + gate_rows, mask=row_ok, other=0.0).to(tl.float32)
        ptrs, mask = _head_rows(OCmp, rows_global, h, row_ok, stride_oct, stride_och, offs_dv, dv_ok, 1)
        total += gate[:, None] * tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    ptrs, mask = _head_rows(Out, rows_global, h, row_ok, stride_ot, stride_oh, offs_dv, dv_ok, stride_od)
    tl.store(ptrs, total.to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Key-major backward: dk, dv, and dq by atomic adds
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key_step(dk, dv, k, v, visible, Q, DO, Lse, Delta, G, DQ, rows, row_ok, stride_st, stride_ot,
              offs_d, d_ok, offs_dv, dv_ok, stride_qt, stride_qd, stride_dot, stride_dod, stride_gt, stride_dqt,
              qk_scale, sm_scale, DELTA_FROM_O: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of a key chunk from one chunk of query rows (global `rows`) of one head and branch,
    and those rows' dq share from the chunk, added atomically to DQ (fp32, at the head; row r at
    r * stride_dqt, unit column stride): FlashAttention-2's five tile products, where a separate
    dq walk would recompute the scores and dP (seven). Q, DO at the head; Lse at its statistics
    (row r at r * stride_st); G at its gate channel; Delta at its stored softmax delta (like Lse),
    or with DELTA_FROM_O at the branch's output O (row r at r * stride_ot, unit column stride),
    from which delta = gate * rowsum(dout * O) is computed here."""
    q = _load_rows(Q, rows, row_ok, stride_qt, offs_d, d_ok, stride_qd)
    do = _load_rows(DO, rows, row_ok, stride_dot, offs_dv, dv_ok, stride_dod)
    stat = rows.to(tl.int64) * stride_st
    lse2 = tl.load(Lse + stat, mask=row_ok, other=float("inf")) * LOG2E
    gate = tl.load(G + rows.to(tl.int64) * stride_gt, mask=row_ok, other=0.0).to(tl.float32)
    if DELTA_FROM_O:
        o = _load_rows(Delta, rows, row_ok, stride_ot, offs_dv, dv_ok, 1).to(tl.float32)
        delta = gate * tl.sum(do.to(tl.float32) * o, 1)
    else:
        delta = tl.load(Delta + stat, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dv += tl.dot(tl.trans(p * gate[:, None]).to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * gate[:, None]
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
    tl.atomic_add(DQ + rows.to(tl.int64)[:, None] * stride_dqt + offs_d[None, :], dq,
                  mask=row_ok[:, None] & d_ok[None, :])
    return dk, dv


@triton.jit
def _merged_key_step(dk, dv, k, v, cols, col_ok, chosen, Q, DO, Lse, Delta, G, DQ, seq_start, rows, row_ok,
                     offs_d, d_ok, offs_dv, dv_ok, stride_qt, stride_qd, stride_dot, stride_dod, stride_gt,
                     stride_gc, stride_dqt, total_tokens, num_heads, qk_scale, sm_scale, WINDOW: tl.constexpr,
                     CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """_key_step for the slc and win branches of one head at once, over sequence-local `rows` that
    may see the keys `cols` through either (slc where `chosen`: the row's tile selected them): the
    scores and dP are formed once, and
    dS = P_slc (g_slc dP - delta_slc) + P_win (g_win dP - delta_win), dV = sum_b (g_b P_b)^T dO.
    Lse, Delta at the head's slc statistics ((3, H, T): win's lie 2H rows further); G at the head.
    The masks are formed after the products (live across them, they spilled)."""
    tokens = seq_start + rows
    q = _load_rows(Q, tokens, row_ok, stride_qt, offs_d, d_ok, stride_qd)
    do = _load_rows(DO, tokens, row_ok, stride_dot, offs_dv, dv_ok, stride_dod)
    stat = tokens.to(tl.int64)
    win = 2 * num_heads * total_tokens
    gate_rows = tokens.to(tl.int64) * stride_gt
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    offset = rows[:, None] - cols[None, :]
    visible = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        visible = visible & (offset >= 0)
    lse2 = tl.load(Lse + stat, mask=row_ok, other=float("inf")) * LOG2E
    gate = tl.load(G + gate_rows + stride_gc, mask=row_ok, other=0.0).to(tl.float32)
    p = tl.where(visible & chosen[:, None], tl.exp2(s - lse2[:, None]), 0.0)
    ds = p * (dp * gate[:, None] - tl.load(Delta + stat, mask=row_ok, other=0.0)[:, None])
    p *= gate[:, None]
    lse2 = tl.load(Lse + win + stat, mask=row_ok, other=float("inf")) * LOG2E
    gate = tl.load(G + gate_rows + 3 * stride_gc, mask=row_ok, other=0.0).to(tl.float32)
    visible = visible & (offset < WINDOW)
    if not CAUSAL:
        visible = visible & (offset > -WINDOW)
    p_win = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    ds += p_win * (dp * gate[:, None] - tl.load(Delta + win + stat, mask=row_ok, other=0.0)[:, None])
    p += p_win * gate[:, None]
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
    tl.atomic_add(DQ + stat[:, None] * stride_dqt + offs_d[None, :], dq, mask=row_ok[:, None] & d_ok[None, :])
    return dk, dv


@triton.jit
def _slc_tiles(dk, dv, k, v, cols, col_ok, key_lo, win_lo, win_hi, seq_start, length, InvTiles, entry_lo, entry_hi,
               Q, DO, Lse, Delta, G, DQ, stride_ot, offs_d, d_ok, offs_dv, dv_ok, stride_qt, stride_qd, stride_dot,
               stride_dod, stride_gt, stride_dqt, qk_scale, sm_scale, SELECT_Q_BLOCK: tl.constexpr,
               CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, DELTA_FROM_O: tl.constexpr, PRECISION: tl.constexpr):
    """The slc-only steps of one head for a key chunk (sequence-local `cols` from key_lo on): the
    rows of the selecting tiles InvTiles[entry_lo:entry_hi] outside the window's rows [win_lo,
    win_hi), which the merged step serves. Q, DO, Lse, Delta (or, DELTA_FROM_O, o_slc with row
    stride stride_ot), G (the slc gate channel), DQ at the head, as for _key_step."""
    for entry in range(entry_lo, entry_hi):
        tile = tl.load(InvTiles + entry)
        q_hi = tl.minimum(tile + SELECT_Q_BLOCK, length)
        if CAUSAL:
            q_lo = tl.maximum(tile, key_lo)
        else:
            q_lo = tile
        for part in tl.static_range(2):  # the rows before win_lo, then those from win_hi on
            if part == 0:
                lo = q_lo
                hi = tl.minimum(q_hi, win_lo)
            else:
                lo = tl.maximum(q_lo, win_hi)
                hi = q_hi
            for start in range(lo, hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < hi
                visible = row_ok[:, None] & col_ok[None, :]
                if CAUSAL:
                    visible = visible & (cols[None, :] <= rows[:, None])
                dk, dv = _key_step(dk, dv, k, v, visible, Q, DO, Lse, Delta, G, DQ, seq_start + rows, row_ok, 1,
                                   stride_ot, offs_d, d_ok, offs_dv, dv_ok, stride_qt, stride_qd, stride_dot,
                                   stride_dod, stride_gt, stride_dqt, qk_scale, sm_scale, DELTA_FROM_O, PRECISION)
    return dk, dv


@triton.jit
def _slc_overflow(
    slot, Q, K, V, G, DO, Lse, Branches, DQ, CuSeqlens, BlockSeq, BlockStart, InvTiles, InvOffsets, SliceOwner,
    SliceIndex, DKPart, DVPart, stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc, stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, total_tokens, num_heads, num_kv_heads, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, SELECT_BLOCK: tl.constexpr,
    SELECT_Q_BLOCK: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr, SLC_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """An overflow slice of a selection block chosen by more than SLC_TILES query tiles: the slc
    part of dk, dv (and the rows' dq) from selecting tiles SLC_TILES * j onwards (SliceIndex = j - 1;
    SliceOwner = block * Hkv + kv head, -1: spare), for every key of the block, written to its row
    of DKPart/DVPart (fp32, already scaled) for the block's own program in _local_dkdv_kernel to
    add. So no program walks a heavily selected block's whole column (an attention-sink block that
    every tile picks would otherwise hold its one program for T / select_q_block tiles). The
    softmax delta comes from o_slc, as in _compact_chunk: Delta is written in this launch."""
    owner = tl.load(SliceOwner + slot)
    if owner < 0:
        return
    block_id = owner // num_kv_heads
    g = owner % num_kv_heads
    seq, seq_start, length, block_start = tile_bounds(BlockSeq, BlockStart, CuSeqlens, block_id)
    first = tl.load(InvOffsets + owner) + (tl.load(SliceIndex + slot) + 1) * SLC_TILES
    last = tl.minimum(first + SLC_TILES, tl.load(InvOffsets + owner + 1))
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    for chunk in tl.static_range((SELECT_BLOCK + BLOCK_N - 1) // BLOCK_N):
        key_lo = block_start + chunk * BLOCK_N
        key_hi = tl.minimum(tl.minimum(key_lo + BLOCK_N, length), block_start + SELECT_BLOCK)
        cols = key_lo + tl.arange(0, BLOCK_N)
        col_ok = cols < key_hi
        keys = (seq_start + cols).to(tl.int64)
        k = _load_rows(K + g * stride_kh, keys, col_ok, stride_kt, offs_d, d_ok, stride_kd)
        v = _load_rows(V + g * stride_vh, keys, col_ok, stride_vt, offs_dv, dv_ok, stride_vd)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        if CAUSAL:
            win_lo = key_lo
        else:
            win_lo = tl.maximum(key_lo - WINDOW + 1, 0)
        win_hi = tl.minimum(key_hi - 1 + WINDOW, length)
        for head in range(GROUP):
            h = g * GROUP + head
            dk, dv = _slc_tiles(dk, dv, k, v, cols, col_ok, key_lo, win_lo, win_hi, seq_start, length, InvTiles,
                                first, last, Q + h * stride_qh, DO + h * stride_doh, Lse + h * total_tokens,
                                Branches + h * VALUE_DIM, G + h * stride_gh + stride_gc, DQ + h * stride_dqh,
                                num_heads * VALUE_DIM, offs_d, d_ok, offs_dv, dv_ok, stride_qt, stride_qd, stride_dot,
                                stride_dod, stride_gt, stride_dqt, qk_scale, sm_scale, SELECT_Q_BLOCK, CAUSAL,
                                BLOCK_M, True, PRECISION)
        part = (slot * SELECT_BLOCK + chunk * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        tl.store(DKPart + (part * BLOCK_D)[:, None] + offs_d[None, :], dk * sm_scale, mask=col_ok[:, None])
        tl.store(DVPart + (part * BLOCK_DV)[:, None] + offs_dv[None, :], dv, mask=col_ok[:, None])


@triton.jit
def _compact_chunk(
    chunk, g, Q, K, V, G, DO, Lse, Branches, DQ, AnchorList, CuSeqlens, CuAnchor, AnchorChunkSeq, AnchorChunkStart,
    DKAnchor, DVAnchor, KCmp, VCmp, LseCmp, OCmp, CuCmp, CmpChunkSeq, CmpChunkStart, DKCmp, DVCmp,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc, stride_dot, stride_doh, stride_dod,
    stride_oct, stride_och, stride_kct, stride_kch, stride_vct, stride_vch, stride_lct, stride_lch,
    stride_dqt, stride_dqh, total_tokens, num_heads, num_kv_heads, anchor_chunks, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of BLOCK_N compact keys of kv head g that every query of their sequence may see, and
    the branch's dq share (atomically into DQ): chunks below `anchor_chunks` take consecutive
    anchors (the jrn part, stored in fp32 by anchor rank in DKAnchor/DVAnchor for
    _local_dkdv_kernel to add), the others consecutive compressed blocks (the cmp branch's dk_cmp,
    dv_cmp, final). Both walk the same query rows with the same
    step and differ only in where keys, row statistics and the branch output live and in the
    causal cut. The softmax delta is computed from the branch output (o_jrn in Branches, OCmp),
    so these chunks need nothing from the query-major walk and run in its launch."""
    is_cmp = chunk >= anchor_chunks
    if is_cmp:
        seq, first, count, start = tile_bounds(CmpChunkSeq, CmpChunkStart, CuCmp, chunk - anchor_chunks)
    else:
        seq, first, count, start = tile_bounds(AnchorChunkSeq, AnchorChunkStart, CuAnchor, chunk)
    if seq < 0:
        return
    seq_start = tl.load(CuSeqlens + seq).to(tl.int32)
    length = tl.load(CuSeqlens + seq + 1).to(tl.int32) - seq_start
    index = first + start + tl.arange(0, BLOCK_N)  # global compact row: compressed row or anchor rank
    col_ok = index < first + count
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    if is_cmp:
        # A compressed block is visible (causal) from its last token on.
        first_row = (start + tl.arange(0, BLOCK_N)) * CMP_STRIDE + CMP_BLOCK - 1
        k = _load_rows(KCmp + g * stride_kch, index, col_ok, stride_kct, offs_d, d_ok, 1)
        v = _load_rows(VCmp + g * stride_vch, index, col_ok, stride_vct, offs_dv, dv_ok, 1)
        lse_base, stride_st, stride_sh, channel = LseCmp, stride_lct, stride_lch, 0
        o_base, stride_ot, stride_oh = OCmp, stride_oct, stride_och
    else:
        token = tl.load(AnchorList + index, mask=col_ok, other=0)
        first_row = token - seq_start
        k = _load_rows(K + g * stride_kh, token, col_ok, stride_kt, offs_d, d_ok, stride_kd)
        v = _load_rows(V + g * stride_vh, token, col_ok, stride_vt, offs_dv, dv_ok, stride_vd)
        jrn = total_tokens.to(tl.int64) * num_heads  # branch 1 of the (3, H, T) statistics and outputs
        lse_base, stride_st, stride_sh, channel = Lse + jrn, 1, total_tokens, 2
        o_base, stride_ot, stride_oh = Branches + jrn * VALUE_DIM, num_heads * VALUE_DIM, VALUE_DIM
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    if CAUSAL:
        q_lo = tl.min(tl.where(col_ok, first_row, length))  # keys ascend: the chunk's earliest reader
    else:
        q_lo = 0
    for head in range(GROUP):
        h = g * GROUP + head
        for start in range(q_lo, length, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < length
            visible = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                visible = visible & (first_row[None, :] <= rows[:, None])
            dk, dv = _key_step(dk, dv, k, v, visible, Q + h * stride_qh, DO + h * stride_doh,
                               lse_base + h * stride_sh, o_base + h * stride_oh,
                               G + h * stride_gh + channel * stride_gc, DQ + h * stride_dqh, seq_start + rows,
                               row_ok, stride_st, stride_ot, offs_d, d_ok, offs_dv, dv_ok, stride_qt, stride_qd,
                               stride_dot, stride_dod, stride_gt, stride_dqt, qk_scale, sm_scale, True, PRECISION)
    dk = dk * sm_scale
    if is_cmp:
        rows_k = index.to(tl.int64) * stride_kct + g * stride_kch
        rows_v = index.to(tl.int64) * stride_vct + g * stride_vch
        tl.store(DKCmp + rows_k[:, None] + offs_d[None, :], dk.to(DKCmp.dtype.element_ty),
                 mask=col_ok[:, None] & d_ok[None, :])
        tl.store(DVCmp + rows_v[:, None] + offs_dv[None, :], dv.to(DVCmp.dtype.element_ty),
                 mask=col_ok[:, None] & dv_ok[None, :])
    else:
        anchor_rows = index.to(tl.int64) * num_kv_heads + g
        tl.store(DKAnchor + (anchor_rows * HEAD_DIM)[:, None] + offs_d[None, :], dk,
                 mask=col_ok[:, None] & d_ok[None, :])
        tl.store(DVAnchor + (anchor_rows * VALUE_DIM)[:, None] + offs_dv[None, :], dv,
                 mask=col_ok[:, None] & dv_ok[None, :])


# Two pipeline stages at most: with the merged slc/win step, three spilled at head dim 64 (GQA).
@triton.autotune(configs=pipeline_configs(max_stages=2), key=["HEAD_DIM", "VALUE_DIM", "GROUP", "CAUSAL", "tokens_bucket"],
                 prune_configs_by={"early_config_prune": prune_narrow_warps(widest=32)})
@triton.jit
def _local_dkdv_kernel(
    Q, K, V, G, DO, Lse, Delta, Sel, AnchorPrefix, CuSeqlens, BlockSeq, BlockStart,
    InvTiles, InvOffsets, SliceStart, DKPart, DVPart, DKAnchor, DVAnchor, DK, DV, DQ,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc, stride_st, stride_sh, stride_sn,
    stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd, stride_dqt, stride_dqh,
    total_tokens, num_heads, num_kv_heads, qk_scale, sm_scale, tokens_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, TOP_N: tl.constexpr,
    SELECT_BLOCK: tl.constexpr, SELECT_Q_BLOCK: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
    SLC_TILES: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of BLOCK_N keys (chunk of a selection block) of one kv head: slc from the first
    SLC_TILES query tiles that selected the block (the rest from the overflow slices' partials in
    DKPart/DVPart, slots SliceStart[block * Hkv + kv head] on, written by _slc_overflow), win from
    the queries within the window, jrn read from DKAnchor/DVAnchor for the anchors among the keys;
    the slc and win shares of those queries' dq are added atomically to DQ. Rows that may see the keys through both slc and win (the window's
    rows whose selection tile chose this block: often, as recent blocks are often selected) take
    one merged step, so their scores and dP are formed once."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    block_id = pid // CHUNKS
    seq, seq_start, length, block_start = tile_bounds(BlockSeq, BlockStart, CuSeqlens, block_id)
    if seq < 0:
        return
    key_lo = block_start + (pid % CHUNKS) * BLOCK_N
    key_hi = tl.minimum(tl.minimum(key_lo + BLOCK_N, length), block_start + SELECT_BLOCK)
    if key_lo >= key_hi:
        return
    cols = key_lo + tl.arange(0, BLOCK_N)
    col_ok = cols < key_hi
    keys = (seq_start + cols).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    k = _load_rows(K + g * stride_kh, keys, col_ok, stride_kt, offs_d, d_ok, stride_kd)
    v = _load_rows(V + g * stride_vh, keys, col_ok, stride_vt, offs_dv, dv_ok, stride_vd)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    inv_first = tl.load(InvOffsets + block_id * num_kv_heads + g)
    inv_last = tl.load(InvOffsets + block_id * num_kv_heads + g + 1)
    if CAUSAL:
        win_lo = key_lo
    else:
        win_lo = tl.maximum(key_lo - WINDOW + 1, 0)
    win_hi = tl.minimum(key_hi - 1 + WINDOW, length)
    block = block_start // SELECT_BLOCK  # sequence-local, as the selection names it
    Sel += g * stride_sh
    for head in range(GROUP):
        h = g * GROUP + head
        Qh = Q + h * stride_qh
        DOh = DO + h * stride_doh
        Gh = G + h * stride_gh
        DQh = DQ + h * stride_dqh
        dk, dv = _slc_tiles(dk, dv, k, v, cols, col_ok, key_lo, win_lo, win_hi, seq_start, length, InvTiles, inv_first,
                            tl.minimum(inv_first + SLC_TILES, inv_last), Qh, DOh, Lse + h * total_tokens,
                            Delta + h * total_tokens, Gh + stride_gc, DQh, 0, offs_d, d_ok, offs_dv, dv_ok,
                            stride_qt, stride_qd, stride_dot, stride_dod, stride_gt, stride_dqt, qk_scale, sm_scale,
                            SELECT_Q_BLOCK, CAUSAL, BLOCK_M, False, PRECISION)
        for start in range(win_lo, win_hi, BLOCK_M):  # win, merged with slc where the row's tile chose the block
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < win_hi
            sel_rows = (seq_start + rows).to(tl.int64) * stride_st  # every token holds its tile's selection
            chosen = tl.zeros((BLOCK_M,), dtype=tl.int1)
            for slot in tl.static_range(TOP_N):
                chosen = chosen | (tl.load(Sel + sel_rows + slot * stride_sn, mask=row_ok, other=-1) == block)
            dk, dv = _merged_key_step(dk, dv, k, v, cols, col_ok, chosen, Qh, DOh, Lse + h * total_tokens,
                                      Delta + h * total_tokens, Gh, DQh, seq_start, rows, row_ok, offs_d, d_ok,
                                      offs_dv, dv_ok, stride_qt, stride_qd, stride_dot, stride_dod, stride_gt,
                                      stride_gc, stride_dqt, total_tokens, num_heads, qk_scale, sm_scale, WINDOW,
                                      CAUSAL, PRECISION)
    rank = tl.load(AnchorPrefix + keys, mask=col_ok, other=0)
    is_anchor = col_ok & (tl.load(AnchorPrefix + keys + 1, mask=col_ok, other=0) > rank)
    anchor_rows = rank.to(tl.int64) * num_kv_heads + g
    dk = dk * sm_scale + tl.load(DKAnchor + (anchor_rows * HEAD_DIM)[:, None] + offs_d[None, :],
                                 mask=is_anchor[:, None] & d_ok[None, :], other=0.0)
    dv += tl.load(DVAnchor + (anchor_rows * VALUE_DIM)[:, None] + offs_dv[None, :],
                  mask=is_anchor[:, None] & dv_ok[None, :], other=0.0)
    first_slot = tl.load(SliceStart + block_id * num_kv_heads + g)
    overflow = tl.maximum((inv_last - inv_first + SLC_TILES - 1) // SLC_TILES - 1, 0)
    for slot in range(first_slot, first_slot + overflow):  # in slice order: deterministic sums
        part = (slot * SELECT_BLOCK + (key_lo - block_start) + tl.arange(0, BLOCK_N)).to(tl.int64)
        dk += tl.load(DKPart + (part * BLOCK_D)[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        dv += tl.load(DVPart + (part * BLOCK_DV)[:, None] + offs_dv[None, :], mask=col_ok[:, None], other=0.0)
    tl.store(DK + keys[:, None] * stride_dkt + g * stride_dkh + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + keys[:, None] * stride_dvt + g * stride_dvh + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & dv_ok[None, :])


@triton.autotune(configs=pipeline_configs(),
                 key=["HEAD_DIM", "VALUE_DIM", "GROUP", "CAUSAL", "BACKWARD", "WITH_CMP", "tokens_bucket"],
                 prune_configs_by={"early_config_prune": prune_narrow_warps(widest=32)})
@triton.jit
def _sparse_kernel(
    Q, K, V, G, Sel, AnchorList, AnchorPrefix, CuSeqlens, TileSeq, TileStart,
    Out, Lse, Branches, DO, Delta, DGates, OCmp, KCmp, VCmp, CuCmp, LseCmp,
    CuAnchor, AnchorChunkSeq, AnchorChunkStart, DKAnchor, DVAnchor, CmpChunkSeq, CmpChunkStart, DKCmp, DVCmp,
    BlockSeq, BlockStart, InvTiles, InvOffsets, SliceOwner, SliceIndex, DKPart, DVPart,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc,
    stride_st, stride_sh, stride_sn, stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod, stride_dgt, stride_dgh, stride_dgc,
    stride_oct, stride_och, stride_kct, stride_kch, stride_vct, stride_vch, stride_lct, stride_lch,
    total_tokens, num_heads, num_kv_heads, query_tiles, anchor_chunks, compact_chunks, qk_scale, sm_scale,
    tokens_bucket, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    TOP_N: tl.constexpr,
    SELECT_BLOCK: tl.constexpr, SELECT_Q_BLOCK: tl.constexpr, WINDOW: tl.constexpr,
    CAUSAL: tl.constexpr, BACKWARD: tl.constexpr, STORE_BRANCHES: tl.constexpr,
    WITH_CMP: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    COMPACT_BLOCK_M: tl.constexpr, DKV_BLOCK_M: tl.constexpr, DKV_BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One launch, a 1-D grid: programs below query_tiles * num_kv_heads are (query tile, kv head)
    of the query-major walk (_query_major_tile, the group's heads packed into the tile's rows: the
    forward, or the gates' gradients and deltas in the backward); with BACKWARD, the next
    compact_chunks * num_kv_heads are (compact chunk, kv head) of _compact_chunk and the rest the
    overflow slices of heavily selected blocks (_slc_overflow); Out is the fp32 dq they add to. The
    sets read only what the forward left, so they share the launch, and the few compact and
    overflow programs fill the GPU beside the walk instead of running alone in a launch of their own."""
    pid = tl.program_id(0)
    walk_programs = query_tiles * num_kv_heads
    if pid < walk_programs:
        _query_major_tile(
            pid % query_tiles, pid // query_tiles, Q, K, V, G, Sel, AnchorList, AnchorPrefix, CuSeqlens,
            TileSeq, TileStart, Out, Lse, Branches, DO, Delta, DGates, OCmp,
            stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
            stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc,
            stride_st, stride_sh, stride_sn, stride_ot, stride_oh, stride_od,
            stride_dot, stride_doh, stride_dod, stride_dgt, stride_dgh, stride_dgc, stride_oct, stride_och,
            total_tokens, num_heads, qk_scale, GROUP, GROUP_PAD, HEAD_DIM, VALUE_DIM, TOP_N,
            SELECT_BLOCK, SELECT_Q_BLOCK, WINDOW, CAUSAL, BACKWARD, STORE_BRANCHES, WITH_CMP,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
    elif BACKWARD and pid >= walk_programs + compact_chunks * num_kv_heads:
        _slc_overflow(
            pid - walk_programs - compact_chunks * num_kv_heads, Q, K, V, G, DO, Lse, Branches, Out, CuSeqlens,
            BlockSeq, BlockStart, InvTiles, InvOffsets, SliceOwner, SliceIndex, DKPart, DVPart,
            stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
            stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc, stride_dot, stride_doh, stride_dod,
            stride_ot, stride_oh, total_tokens, num_heads, num_kv_heads, qk_scale, sm_scale,
            GROUP, HEAD_DIM, VALUE_DIM, SELECT_BLOCK, SELECT_Q_BLOCK, WINDOW, CAUSAL, SLC_TILES,
            DKV_BLOCK_M, DKV_BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
    elif BACKWARD:
        compact = pid - walk_programs
        _compact_chunk(
            compact % compact_chunks, compact // compact_chunks, Q, K, V, G, DO, Lse, Branches, Out, AnchorList,
            CuSeqlens, CuAnchor, AnchorChunkSeq, AnchorChunkStart, DKAnchor, DVAnchor, KCmp, VCmp, LseCmp,
            OCmp, CuCmp, CmpChunkSeq, CmpChunkStart, DKCmp, DVCmp,
            stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
            stride_vt, stride_vh, stride_vd, stride_gt, stride_gh, stride_gc, stride_dot, stride_doh, stride_dod,
            stride_oct, stride_och, stride_kct, stride_kch, stride_vct, stride_vch, stride_lct, stride_lch,
            stride_ot, stride_oh, total_tokens, num_heads, num_kv_heads, anchor_chunks, qk_scale, sm_scale,
            GROUP, HEAD_DIM, VALUE_DIM, CAUSAL, CMP_BLOCK, CMP_STRIDE, COMPACT_BLOCK_M, DKV_BLOCK_N, BLOCK_D,
            BLOCK_DV, PRECISION)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _launch(q, k, v, gates, selection, plan, cu_seqlens, config, geometry, out, lse, branches,
            dout=None, delta=None, dgates=None, o_cmp=None, cmp=None, compact=None, overflow=None):
    """One _sparse_kernel launch over the plan's query tiles and anchors. Forward: out, lse, branches
    (or None); o_cmp adds the gated cmp output. Backward (dout given): delta, dgates, and out is the
    fp32 dq (zeros) the compact programs add to; o_cmp adds the cmp branch's gate gradient and
    cmp = (k_cmp, v_cmp, cu_cmp, lse_cmp) its compressed keys; compact (a dict of the outputs
    dk_anchor, dv_anchor, dk_cmp, dv_cmp) adds the compact-key programs over the plan's anchor
    chunks and, with cmp, its compressed-row chunks; overflow (_overflow_slices' dict) the overflow
    slices of heavily selected blocks."""
    total, heads, dim = q.shape
    kv_heads = k.shape[1]
    backward = dout is not None
    query_tiles = plan.query_tile_seq.shape[0]
    tile_seq, tile_start = plan.query_tile_seq, plan.query_tile_start
    # Unused pointers point at real tensors of the right dtype.
    dout_ = dout if backward else q
    dgates_ = dgates if backward else gates
    with_cmp = o_cmp is not None
    k_cmp, v_cmp, cu_cmp, lse_cmp = cmp if cmp is not None else (k, v, cu_seqlens, lse)
    o_cmp = out if o_cmp is None else o_cmp
    anchor_chunks = cmp_chunks = 0
    if compact is None:
        compact = dict(dk_anchor=lse, dv_anchor=lse, dk_cmp=k_cmp, dv_cmp=v_cmp)
    else:
        anchor_chunks = plan.anchor_chunk_seq.shape[0]
        cmp_chunks = plan.cmp_chunk_seq.shape[0] if cmp is not None else 0
    # Without cmp chunks their map may be empty: the anchor map stands in (never read).
    cmp_seq, cmp_start = ((plan.cmp_chunk_seq, plan.cmp_chunk_start) if cmp_chunks
                          else (plan.anchor_chunk_seq, plan.anchor_chunk_start))
    c = compact
    if overflow is None:
        ints = plan.query_tile_seq
        overflow = dict(inv_tiles=ints, inv_offsets=ints, slice_owner=ints, slice_index=ints, dk_part=lse, dv_part=lse)
        overflow_slots = 0
    else:
        overflow_slots = overflow["slice_owner"].shape[0]
    o = overflow
    branches_ = out if branches is None else branches
    _sparse_kernel[((query_tiles + anchor_chunks + cmp_chunks) * kv_heads + overflow_slots,)](
        q, k, v, gates, selection, plan.anchor_list, plan.anchor_prefix, cu_seqlens, tile_seq, tile_start,
        out, lse, branches_, dout_, lse if delta is None else delta, dgates_, o_cmp, k_cmp, v_cmp, cu_cmp,
        lse_cmp, plan.cu_anchor, plan.anchor_chunk_seq, plan.anchor_chunk_start, c["dk_anchor"], c["dv_anchor"],
        cmp_seq, cmp_start, c["dk_cmp"], c["dv_cmp"], plan.key_block_seq, plan.key_block_start, o["inv_tiles"],
        o["inv_offsets"], o["slice_owner"], o["slice_index"], o["dk_part"], o["dv_part"],
        *q.stride(), *k.stride(), *v.stride(), *gates.stride(), *selection.stride(),
        *out.stride(), *dout_.stride(), *dgates_.stride(),
        o_cmp.stride(0), o_cmp.stride(1), k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        lse_cmp.stride(0), lse_cmp.stride(1),
        total, heads, kv_heads, query_tiles, anchor_chunks, anchor_chunks + cmp_chunks, LOG2E.value / dim ** 0.5,
        1.0 / dim ** 0.5, size_bucket(total),
        GROUP=heads // kv_heads, GROUP_PAD=geometry["group_pad"], HEAD_DIM=dim, VALUE_DIM=v.shape[-1],
        TOP_N=config.top_n, SELECT_BLOCK=config.select_block, SELECT_Q_BLOCK=config.select_q_block,
        WINDOW=config.window, CAUSAL=config.causal, BACKWARD=backward,
        STORE_BRANCHES=branches is not None, WITH_CMP=with_cmp, CMP_BLOCK=config.block,
        CMP_STRIDE=config.stride, SLC_TILES=SLC_TILES, BLOCK_M=geometry["block_m"], BLOCK_N=geometry["block_n"],
        BLOCK_D=geometry["block_d"], BLOCK_DV=geometry["block_dv"], COMPACT_BLOCK_M=geometry["compact_block_m"],
        DKV_BLOCK_M=geometry["dkv_block_m"], DKV_BLOCK_N=geometry["dkv_block_n"], PRECISION=dot_precision(q.dtype),
    )


def _plan(plan, anchor_mask, cu_seqlens, cu_cmp, num_cmp_rows: int, config, geometry):
    """The batch's plan.AttentionPlan (built here when None), checked against this launch's tiles."""
    if plan is None:
        return attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, num_cmp_rows, geometry["tile_tokens"],
                              geometry["dkv_block_n"])
    total, batch = anchor_mask.shape[0], cu_seqlens.shape[0] - 1
    check_tiles(plan.query_tile_seq, total, batch, geometry["tile_tokens"], "query tile")
    check_tiles(plan.anchor_chunk_seq, total, batch, geometry["dkv_block_n"], "anchor chunk")
    if cu_cmp is not None:
        check_tiles(plan.cmp_chunk_seq, num_cmp_rows, batch, geometry["dkv_block_n"], "compressed-row chunk")
    return plan


def sparse_attention_fwd(q, k, v, gates, selection, anchor_mask, cu_seqlens, config,
                         store_branches: bool = False, block_m=None, block_n=None, o_cmp=None, plan=None):
    """Gated slc + jrn + win attention -> (out, lse, branches or None); see the module doc.
    With o_cmp (T_total, H, Dv), the cmp branch's output, out is the whole gated sum
    g_cmp*o_cmp + g_slc*o_slc + g_jrn*o_jrn + g_win*o_win (gate channel 0 for cmp).
    plan: the batch's `plan.AttentionPlan` for this geometry (built here when None)."""
    total, heads, dim = q.shape
    value_dim = v.shape[-1]
    geometry = launch_geometry(config, dim, block_m, block_n, value_dim, heads // k.shape[1])
    out = empty((total, heads, value_dim), q.dtype, q.device)
    lse = empty((NUM_BRANCHES, heads, total), torch.float32, q.device)
    branches = empty((NUM_BRANCHES, total, heads, value_dim), q.dtype, q.device) if store_branches else None
    if total == 0:
        return out, lse, branches
    plan = _plan(plan, anchor_mask, cu_seqlens, None, 0, config, geometry)
    _launch(q, k, v, gates, selection, plan, cu_seqlens, config, geometry, out, lse, branches, o_cmp=o_cmp)
    return out, lse, branches


def sparse_attention_bwd(dout, q, k, v, gates, selection, anchor_mask, cu_seqlens,
                         config, branches, lse, block_m=None, block_n=None, cmp=None, plan=None):
    """-> (dq, dk, dv, dgates, dk_cmp, dv_cmp); `branches` and `lse` come from the forward.

    Without cmp: dgates (T_total, H, 3) = d/d(g_slc, g_jrn, g_win), dk_cmp = dv_cmp = None.
    cmp = (k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp) from jsa_cmp's forward: the cmp branch's backward
    too, gated by gates[..., 0]: dq holds its part, dgates is (T_total, H, 4) in the gates' channel
    order (cmp first), and dk_cmp, dv_cmp are its key gradients (zero past cu_cmp[-1]).
    plan: the batch's `plan.AttentionPlan` for this geometry (built here when None).
    """
    total, heads, dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    geometry = launch_geometry(config, dim, block_m, block_n, value_dim, heads // k.shape[1])
    block_n = geometry["dkv_block_n"]  # keys per program of the key-major work
    # fp32, zeros: every key-major program adds its share of dq (atomically).
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    dgates = empty((total, heads, NUM_BRANCHES + (cmp is not None)), gates.dtype, gates.device)
    dk_cmp = dv_cmp = o_cmp = cu_cmp = None
    if cmp is not None:
        k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp = cmp
        k_cmp, v_cmp, o_cmp, lse_cmp = (t.contiguous() for t in (k_cmp, v_cmp, o_cmp, lse_cmp))
        # Zeros: k_cmp / v_cmp may end in padding rows (past cu_cmp[-1]) that no program owns.
        dk_cmp, dv_cmp = torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    if total == 0:
        return dq.to(q.dtype), dk, dv, dgates, dk_cmp, dv_cmp
    plan = _plan(plan, anchor_mask, cu_seqlens, cu_cmp, 0 if cmp is None else k_cmp.shape[0], config, geometry)
    delta = empty((NUM_BRANCHES, heads, total), torch.float32, q.device)
    # Compact keys: anchor chunks (the jrn part of dk/dv, fp32, by anchor rank; rows past the anchor
    # count stay unwritten) and compressed-block chunks (dk_cmp, dv_cmp), in the walk's launch.
    dk_anchor = empty((total, kv_heads, dim), torch.float32, q.device)
    dv_anchor = empty((total, kv_heads, value_dim), torch.float32, q.device)
    compact = dict(dk_anchor=dk_anchor, dv_anchor=dv_anchor,
                   dk_cmp=dk if cmp is None else dk_cmp, dv_cmp=dv if cmp is None else dv_cmp)  # unused: right dtypes
    # Which tiles chose each selection block: the key-major slc work, split so that no program
    # serves more than SLC_TILES of them (the overflow slices run in the first launch).
    num_blocks = plan.key_block_seq.shape[0]
    inv_tiles, inv_offsets, inv_counts = _inverse_selection(selection, cu_seqlens, config, num_blocks,
                                                            plan.select_tile_seq, plan.select_tile_start)
    overflow = _overflow_slices(inv_counts, inv_tiles.shape[0], geometry, config)
    overflow.update(inv_tiles=inv_tiles, inv_offsets=inv_offsets)
    _launch(q, k, v, gates, selection, plan, cu_seqlens, config, geometry, dq, lse,
            branches, dout=dout, delta=delta, dgates=dgates, o_cmp=o_cmp,
            cmp=None if cmp is None else (k_cmp, v_cmp, cu_cmp, lse_cmp), compact=compact, overflow=overflow)

    chunks = -(-config.select_block // block_n)
    _local_dkdv_kernel[(num_blocks * chunks, kv_heads)](
        q, k, v, gates, dout, lse, delta, selection, plan.anchor_prefix, cu_seqlens, plan.key_block_seq,
        plan.key_block_start, inv_tiles, inv_offsets, overflow["slice_start"], overflow["dk_part"],
        overflow["dv_part"], dk_anchor, dv_anchor, dk, dv, dq,
        *q.stride(), *k.stride(), *v.stride(), *gates.stride(), *selection.stride(), *dout.stride(), *dk.stride(),
        *dv.stride(), dq.stride(0), dq.stride(1), total, heads, kv_heads, LOG2E.value / dim ** 0.5, 1.0 / dim ** 0.5,
        size_bucket(total), GROUP=heads // kv_heads, HEAD_DIM=dim, VALUE_DIM=value_dim, TOP_N=config.top_n,
        SELECT_BLOCK=config.select_block,
        SELECT_Q_BLOCK=config.select_q_block, WINDOW=config.window, CAUSAL=config.causal, SLC_TILES=SLC_TILES,
        CHUNKS=chunks, BLOCK_M=geometry["dkv_block_m"], BLOCK_N=block_n, BLOCK_D=geometry["block_d"],
        BLOCK_DV=geometry["block_dv"], PRECISION=dot_precision(q.dtype))
    return dq.to(q.dtype), dk, dv, dgates, dk_cmp, dv_cmp
