"""JSA compressed attention (SPEC §1 cmp) and the top-N block selection it drives (slc).

Forward, one launch (`cmp_attention_select`): one program per (aligned tile of select_q_block
queries, kv head) does both steps of the tile, so the selection needs no second kernel:
  1. cmp attention: FlashAttention of the tile's rows, for every query head of the group, over the
     sequence's compressed keys/values (the values' width Dv may differ from the keys' D); causal:
     compressed block i is visible to query t iff i*stride + block - 1 <= t. A query that sees no
     block outputs 0 (its logsumexp is stored as +inf, as jsa_sparse does, so that exp(s - lse)
     is 0). Writes o_cmp and the natural-log logsumexp.
  2. selection: the tile is re-scored against the compressed keys with the logsumexp of step 1
     (read back after a barrier), so p_cmp is never materialised (it would be T x H x T/stride);
     the probabilities summed over the tile's queries and the group's heads give selection-block
     importance (compressed block i counts for every selection block it overlaps), BLOCK_J
     selection blocks at a time, and a running top-N stays in registers (ties go to the lower
     block, as in `sparserec.reference.jsa.select_blocks`). Importance is summed in fp32; the
     reference sums fp64, so blocks whose importance ties to within rounding may be ordered
     differently.
Why one program per (selection tile, kv head): the top-N needs the importance summed over the
group's heads, so the program that owns a selection owns all of them; keeping both steps in it
saves a launch and a second read of q, at the price of GROUP-fold fewer programs for step 1
(at 64k tokens per call that still leaves thousands of programs). `cmp_select` runs step 2 alone
from an lse computed elsewhere (the FlexAttention composition).

Backward: every gradient of the branch is computed by jsa_sparse's backward, which has the same
work shapes anyway (`sparse_attention_bwd(..., cmp=...)`): the gate's gradient, the softmax delta
and dq in its query-major walk (dq written once), and dk_cmp, dv_cmp in its compact-key programs
beside the anchors' (per chunk of compressed blocks and kv head, looping over the group's query
heads so GQA needs no atomics).
"""
import math

import torch
import triton
import triton.language as tl

from .common import (LOG2E, cdiv, dot_precision, empty, jagged_tiles, max_tiles, next_power_of_2, online_softmax_step,
                     pipeline_configs, prune_narrow_warps, size_bucket, tile_bounds)
from .plan import check_tiles, token_tiles

@triton.jit
def _visible_blocks(last_row, num_cmp, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, CAUSAL: tl.constexpr):
    """Compressed blocks visible to a query at `last_row` (a prefix of the sequence's blocks)."""
    if CAUSAL:
        reach = tl.where(last_row >= CMP_BLOCK - 1, (last_row - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)
        return tl.minimum(reach, num_cmp)
    else:
        return num_cmp


@triton.jit
def _cmp_attend_rows(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bos, rows, row_ok, head, kv_head, cmp_bos, num_visible, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, stride_lh,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """FlashAttention of BLOCK_M query rows of one head over their visible compressed blocks:
    stores o_cmp and the natural-log logsumexp (+inf for a row that sees nothing)."""
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    vdims = tl.arange(0, BLOCK_DV)
    vdim_ok = vdims < VALUE_DIM
    tokens = (bos + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for n0 in range(0, num_visible, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < num_visible
        blocks = (cmp_bos + cols).to(tl.int64)
        k = tl.load(k_ptr + blocks[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + blocks[:, None] * stride_vt + kv_head * stride_vh + vdims[None, :],
                    mask=col_ok[:, None] & vdim_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= rows[:, None])
        acc, row_max, row_sum = online_softmax_step(acc, row_max, row_sum, tl.where(visible, scores, float("-inf")),
                                                    v, PRECISION)
    has_key = row_sum > 0
    out = acc / tl.where(has_key, row_sum, 1.0)[:, None]
    lse = tl.where(has_key, (row_max + tl.log2(tl.where(has_key, row_sum, 1.0))) / LOG2E, float("inf"))
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + vdims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & vdim_ok[None, :])
    tl.store(lse_ptr + tokens * stride_lt + head * stride_lh, lse, mask=row_ok)


@triton.autotune(configs=pipeline_configs(), key=["HEAD_DIM", "VALUE_DIM", "GROUP", "CAUSAL", "ATTEND", "tokens_bucket"],
                 prune_configs_by={"early_config_prune": prune_narrow_warps()})
@triton.jit
def _cmp_fwd_select(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, sel_ptr, tile_seq_ptr, tile_start_ptr, cu_seqlens_ptr, cu_cmp_ptr,
    qk_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lt, stride_lh, stride_st, stride_sh, tokens_bucket,
    GROUP: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SELECT_BLOCK: tl.constexpr,
    SELECT_Q_BLOCK: tl.constexpr, TOP_N: tl.constexpr, TOP_N_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Program (selection tile, kv head). ATTEND: first the cmp forward of the tile's rows for
    every head of the group (o_cmp, lse); then the top-N selection from that lse (without
    ATTEND, from the lse passed in)."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq, bos, length, start = tile_bounds(tile_seq_ptr, tile_start_ptr, cu_seqlens_ptr, pid)
    if seq < 0:
        return
    none: tl.constexpr = 1 << 30  # index of an empty slot; sorts after every block
    cmp_bos = tl.load(cu_cmp_ptr + seq).to(tl.int32)
    num_cmp = tl.load(cu_cmp_ptr + seq + 1).to(tl.int32) - cmp_bos
    last = tl.minimum(start + SELECT_Q_BLOCK, length) - 1
    num_sel = (length + SELECT_BLOCK - 1) // SELECT_BLOCK
    if CAUSAL:
        num_eligible = tl.minimum(num_sel, last // SELECT_BLOCK + 1)
    else:
        num_eligible = num_sel
    num_visible = _visible_blocks(last, num_cmp, CMP_BLOCK, CMP_STRIDE, CAUSAL)
    if ATTEND:
        for g in range(GROUP):
            for m0 in range(0, SELECT_Q_BLOCK, BLOCK_M):
                local = m0 + tl.arange(0, BLOCK_M)
                rows = start + local
                row_ok = (local < SELECT_Q_BLOCK) & (rows < length)
                chunk_last = tl.minimum(start + tl.minimum(m0 + BLOCK_M, SELECT_Q_BLOCK), length) - 1
                _cmp_attend_rows(
                    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bos, rows, row_ok, kv_head * GROUP + g, kv_head, cmp_bos,
                    _visible_blocks(chunk_last, num_cmp, CMP_BLOCK, CMP_STRIDE, CAUSAL), qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_lt, stride_lh, CMP_BLOCK, CMP_STRIDE, CAUSAL, HEAD_DIM, BLOCK_D, VALUE_DIM, BLOCK_DV,
                    PRECISION, BLOCK_M, BLOCK_N)
        # The selection below reads the lse rows other threads of this program just stored.
        tl.debug_barrier()
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    slots = tl.arange(0, TOP_N_PAD)
    best_score = tl.full((TOP_N_PAD,), -1.0, tl.float32)
    best_index = tl.full((TOP_N_PAD,), none, tl.int32)

    for j0 in range(0, num_eligible, BLOCK_J):
        sel = j0 + tl.arange(0, BLOCK_J)
        importance = tl.zeros((BLOCK_J,), tl.float32)
        # Compressed blocks overlapping selection blocks [j0, j0 + BLOCK_J).
        span_start = j0 * SELECT_BLOCK
        i_lo = tl.where(span_start >= CMP_BLOCK, (span_start - CMP_BLOCK) // CMP_STRIDE + 1, 0)
        i_hi = tl.minimum(num_visible, (j0 + BLOCK_J) * (SELECT_BLOCK // CMP_STRIDE))
        for i0 in range(i_lo, i_hi, BLOCK_N):
            cols = i0 + tl.arange(0, BLOCK_N)
            col_ok = cols < i_hi
            k = tl.load(k_ptr + (cmp_bos + cols).to(tl.int64)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            mass = tl.zeros((BLOCK_N,), tl.float32)
            for g in range(GROUP):
                head = kv_head * GROUP + g
                for m0 in range(0, SELECT_Q_BLOCK, BLOCK_M):
                    local = m0 + tl.arange(0, BLOCK_M)
                    rows = start + local
                    row_ok = (local < SELECT_Q_BLOCK) & (rows < length)
                    tokens = (bos + rows).to(tl.int64)
                    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
                    lse = tl.load(lse_ptr + tokens * stride_lt + head * stride_lh, mask=row_ok, other=0.0)
                    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                    visible = row_ok[:, None] & col_ok[None, :]
                    if CAUSAL:
                        visible = visible & (cols[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= rows[:, None])
                    p = tl.where(visible, tl.exp2(scores - lse[:, None] * LOG2E), 0.0)
                    mass += tl.sum(p, 0)
            overlap = ((cols[:, None] * CMP_STRIDE < (sel[None, :] + 1) * SELECT_BLOCK)
                       & (cols[:, None] * CMP_STRIDE + CMP_BLOCK > sel[None, :] * SELECT_BLOCK) & col_ok[:, None])
            importance += tl.sum(tl.where(overlap, mass[:, None], 0.0), 0)
        score = tl.where(sel < num_eligible, importance, -1.0)

        # Merge this chunk into the running top-N. Earlier chunks hold lower block indices, so an
        # equal score prefers the running list; within a list, the lower index.
        new_score = tl.full((TOP_N_PAD,), -1.0, tl.float32)
        new_index = tl.full((TOP_N_PAD,), none, tl.int32)
        for n in tl.static_range(TOP_N):
            best_max = tl.max(best_score, 0)
            chunk_max = tl.max(score, 0)
            best_arg = tl.min(tl.where(best_score == best_max, best_index, none), 0)
            chunk_arg = tl.min(tl.where(score == chunk_max, sel, none), 0)
            from_chunk = chunk_max > best_max
            pick_score = tl.where(from_chunk, chunk_max, best_max)
            pick_index = tl.where(from_chunk, chunk_arg, best_arg)
            new_score = tl.where(slots == n, pick_score, new_score)
            new_index = tl.where(slots == n, pick_index, new_index)
            best_score = tl.where(from_chunk, best_score, tl.where(best_index == pick_index, -2.0, best_score))
            score = tl.where(from_chunk, tl.where(sel == pick_index, -2.0, score), score)
        best_score = new_score
        best_index = new_index

    chosen = tl.sort(tl.where(best_score >= 0, best_index, none))
    chosen = tl.where(chosen == none, -1, chosen)
    tl.store(sel_ptr + pid.to(tl.int64) * stride_st + kv_head * stride_sh + slots, chosen, mask=slots < TOP_N)


def launch_geometry(config, head_dim: int) -> dict:
    """Tile sizes of this module's launches for a JSA config; sparserec.flops counts executed FLOPs
    from them. select_block_m / select_block_n: query rows per step and compressed blocks per chunk of the
    fused forward, in both its cmp attention and its selection re-scoring."""
    select_block_m = min(64, max(16, next_power_of_2(config.select_q_block)))
    return dict(
        block_d=max(16, next_power_of_2(head_dim)),
        select_block_m=select_block_m, select_block_n=64,
        select_block_j=min(64, max(16, next_power_of_2(cdiv(2048, config.select_block)))),
    )


def _meta(q, k_cmp, config, v_cmp=None):
    """Constexprs of the launches; with v_cmp also its width (the value dim may differ from q's)."""
    _, heads, dim = q.shape
    meta = dict(GROUP=heads // k_cmp.shape[1], CMP_BLOCK=config.block, CMP_STRIDE=config.stride,
                CAUSAL=config.causal, HEAD_DIM=dim, BLOCK_D=max(16, next_power_of_2(dim)),
                PRECISION=dot_precision(q.dtype))
    if v_cmp is not None:
        meta.update(VALUE_DIM=v_cmp.shape[-1], BLOCK_DV=max(16, next_power_of_2(v_cmp.shape[-1])))
    return meta


def _fwd_select(q, k_cmp, v_cmp, out, lse, cu_seqlens, cu_cmp, config, attend: bool, plan) -> torch.Tensor:
    total, heads, dim = q.shape
    kv_heads = k_cmp.shape[1]
    tile = config.select_q_block
    num_tiles = max_tiles(total, cu_seqlens.numel() - 1, tile)
    if plan is None:
        tile_seq, tile_start = jagged_tiles(cu_seqlens, tile, num_tiles)
        token_tile = token_tiles(cu_seqlens, tile, total)
    else:
        check_tiles(plan.select_tile_seq, total, cu_seqlens.numel() - 1, tile, "selection tile")
        tile_seq, tile_start, token_tile = plan.select_tile_seq, plan.select_tile_start, plan.token_tile
    per_tile = torch.empty(num_tiles, kv_heads, config.top_n, dtype=torch.int32, device=q.device)
    geometry = launch_geometry(config, dim)
    _cmp_fwd_select[(num_tiles, kv_heads)](
        q, k_cmp, v_cmp, out, lse, per_tile, tile_seq, tile_start, cu_seqlens, cu_cmp, LOG2E.value / math.sqrt(dim),
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), per_tile.stride(0), per_tile.stride(1),
        size_bucket(total), SELECT_BLOCK=config.select_block, SELECT_Q_BLOCK=tile, TOP_N=config.top_n,
        TOP_N_PAD=max(2, next_power_of_2(config.top_n)), ATTEND=attend,
        BLOCK_M=geometry["select_block_m"], BLOCK_N=geometry["select_block_n"], BLOCK_J=geometry["select_block_j"],
        **_meta(q, k_cmp, config, v_cmp),
    )
    return per_tile[token_tile]


def cmp_attention_select(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, config, plan=None):
    """One launch: o_cmp (T_total, H, Dv) in q's dtype, its logsumexp (T_total, H) fp32 (+inf:
    nothing visible) and the top-N selection blocks (T_total, Hkv, top_n) int32, ascending, -1
    padded (SPEC §1 cmp and slc). plan: the batch's `plan.AttentionPlan`, whose selection tile
    maps it uses (built here when None)."""
    total, heads, _ = q.shape
    q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
    out = empty((total, heads, v_cmp.shape[-1]), q.dtype, q.device)
    lse = empty((total, heads), torch.float32, q.device)
    if total == 0:
        return out, lse, torch.empty(0, k_cmp.shape[1], config.top_n, dtype=torch.int32, device=q.device)
    return out, lse, _fwd_select(q, k_cmp, v_cmp, out, lse, cu_seqlens, cu_cmp, config, attend=True, plan=plan)


def cmp_select(q, k_cmp, lse, cu_seqlens, cu_cmp, config) -> torch.Tensor:
    """The selection alone, from a cmp logsumexp computed elsewhere (the FlexAttention composition
    of benchmarks/flex_jsa.py): the same kernel without its attention phase."""
    total = q.shape[0]
    if total == 0:
        return torch.empty(0, k_cmp.shape[1], config.top_n, dtype=torch.int32, device=q.device)
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    # The attention phase is compiled out; its pointers only need the right dtypes.
    return _fwd_select(q, k_cmp, k_cmp, q, lse, cu_seqlens, cu_cmp, config, attend=False, plan=None)
