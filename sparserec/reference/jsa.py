"""The executable spec of Journey-aware Sparse Attention (SPEC §1), in plain PyTorch.

Clear over fast: every branch is a masked dense softmax attention over one sequence at a time
(queries in chunks to bound memory). Inputs are trusted here; `sparserec.ops` validates them.
Layout: packed jagged batches, `cu_seqlens` (B+1,) int offsets into the token dimension.
"""
import math

import torch

from ..config import JSAConfig

BRANCHES = ("cmp", "slc", "jrn", "win")
# Elements of one (heads, query chunk, keys) score tensor; bounds the reference's peak memory.
_CHUNK_ELEMENTS = 1 << 24


def num_compressed_blocks(length: int, block: int, stride: int) -> int:
    """Full compressed blocks of a sequence: i*stride + block <= length."""
    return (length - block) // stride + 1 if length >= block else 0


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Offsets of each sequence's compressed blocks (num_compressed_blocks per length), on the device."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = torch.where(lengths >= block, torch.div(lengths - block, stride, rounding_mode="floor") + 1, 0)
    return torch.cat([cu_seqlens.new_zeros(1), counts.cumsum(0).to(cu_seqlens.dtype)])


def compress_block_index(cu_seqlens: torch.Tensor, block: int, stride: int):
    """Token index (Tc_total, block) of every compressed block, and the compressed cu_seqlens."""
    cu_cmp = compressed_cu_seqlens(cu_seqlens, block, stride)
    starts = []
    for seq_start, c0, c1 in zip(cu_seqlens[:-1].tolist(), cu_cmp[:-1].tolist(), cu_cmp[1:].tolist()):
        starts.append(seq_start + stride * torch.arange(c1 - c0))
    start = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)
    index = start[:, None] + torch.arange(block)[None, :]
    return index.to(cu_seqlens.device), cu_cmp


def compressed_rows_bound(total_tokens, stride: int):
    """A static bound on cu_cmp[-1] from the token count alone: T_total // stride.

    A sequence of n tokens has (n - block) // stride + 1 <= n // stride full blocks (block >= stride),
    or none when n < block, so the batch has at most sum(n // stride) <= T_total // stride. Sizing
    compressed tensors by it needs no read of the lengths (a device sync on a GPU).
    """
    return total_tokens // stride


def jsa_compress(x, weight, pe, cu_seqlens, block: int, stride: int, num_blocks=None):
    """Kc_i = sum_r (x[i*stride + r] + pe_r) @ W_r per kv head.

    x (T_total, Hkv, D), weight (Hkv, block, D, D), pe (Hkv, block, D)
    -> (num_blocks or Tc_total, Hkv, D) and the compressed cu_seqlens; rows past Tc_total are zeros.
    """
    index, cu_cmp = compress_block_index(cu_seqlens, block, stride)
    blocks = x[index] + pe.transpose(0, 1)  # (Tc, block, Hkv, D)
    out = torch.einsum("clhd,hlde->che", blocks, weight)
    if num_blocks is not None:
        out = torch.cat([out, out.new_zeros(num_blocks - out.shape[0], *out.shape[1:])])
    return out, cu_cmp


def _softmax_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_attention(q, k, v, mask, scale):
    """Softmax attention restricted to `mask`; a query with no visible key outputs 0.

    q (H, Tq, D), k/v (H, Tk, D), mask broadcastable to (H, Tq, Tk) -> out (H, Tq, D), probs.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = mask.expand(scores.shape)
    has_key = mask.any(-1, keepdim=True)
    # Rows without keys get finite scores so softmax (and its backward) stays NaN-free.
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1, dtype=_softmax_dtype(q.dtype)) * has_key
    probs = probs.to(v.dtype)
    return probs @ v, probs


def block_overlap(num_cmp: int, num_sel: int, config: JSAConfig, device=None) -> torch.Tensor:
    """(num_cmp, num_sel) bool: compressed block i overlaps selection block j."""
    cmp_start = torch.arange(num_cmp, device=device)[:, None] * config.stride
    sel_start = torch.arange(num_sel, device=device)[None, :] * config.select_block
    return (cmp_start < sel_start + config.select_block) & (cmp_start + config.block > sel_start)


def select_blocks(p_cmp, cu_seqlens, config: JSAConfig, num_kv_heads: int):
    """Top-N selection blocks per query tile and kv head (the Python twin of jsa_select).

    p_cmp (T_total, H, C): cmp-branch probabilities over each sequence's compressed blocks
    (columns past a sequence's count are ignored). Returns (T_total, Hkv, top_n) int64: per
    token, its tile's selected blocks (sequence-local, ascending), -1 padded.
    """
    total, heads, _ = p_cmp.shape
    group = heads // num_kv_heads
    out = torch.full((total, num_kv_heads, config.top_n), -1, dtype=torch.long, device=p_cmp.device)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        length = end - start
        if length == 0:
            continue
        num_cmp = num_compressed_blocks(length, config.block, config.stride)
        num_sel = -(-length // config.select_block)
        num_tiles = -(-length // config.select_q_block)
        probs = p_cmp[start:end, :, :num_cmp].double()
        per_group = probs.view(length, num_kv_heads, group, num_cmp).sum(2)
        tile_of = torch.arange(length, device=p_cmp.device) // config.select_q_block
        per_tile = torch.zeros(num_tiles, num_kv_heads, num_cmp, dtype=torch.float64, device=p_cmp.device)
        per_tile.index_add_(0, tile_of, per_group)
        overlap = block_overlap(num_cmp, num_sel, config, p_cmp.device).double()
        importance = per_tile @ overlap  # (tiles, Hkv, num_sel)
        sel_start = torch.arange(num_sel, device=p_cmp.device) * config.select_block
        if config.causal:
            tile_last = torch.clamp(
                (torch.arange(num_tiles, device=p_cmp.device) + 1) * config.select_q_block, max=length
            ) - 1
            eligible = sel_start[None, :] <= tile_last[:, None]
        else:
            eligible = torch.ones(num_tiles, num_sel, dtype=torch.bool, device=p_cmp.device)
        eligible = eligible[:, None, :].expand_as(importance)
        score = importance.masked_fill(~eligible, float("-inf"))
        # Stable descending sort: among equal scores the lower block index comes first.
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., : config.top_n]
        taken = torch.gather(eligible, -1, order)
        chosen = torch.where(taken, order, torch.full_like(order, num_sel))
        chosen = torch.sort(chosen, dim=-1).values
        chosen = chosen.masked_fill(chosen == num_sel, -1)
        if chosen.shape[-1] < config.top_n:
            pad = chosen.new_full((*chosen.shape[:-1], config.top_n - chosen.shape[-1]), -1)
            chosen = torch.cat([chosen, pad], dim=-1)
        out[start:end] = chosen[tile_of]
    return out


def cmp_mask(queries: torch.Tensor, num_cmp: int, config: JSAConfig) -> torch.Tensor:
    """(Tq, C) bool: compressed blocks visible to query positions `queries`."""
    if not config.causal:
        return torch.ones(len(queries), num_cmp, dtype=torch.bool, device=queries.device)
    cmp_end = torch.arange(num_cmp, device=queries.device) * config.stride + config.block - 1
    return cmp_end[None, :] <= queries[:, None]


def token_masks(length: int, queries: torch.Tensor, config: JSAConfig, anchors, selection):
    """Visibility masks of the token-level branches for query positions `queries` of a sequence.

    anchors (length,) bool; selection (Tq, Hkv, top_n) selected blocks of these queries.
    Returns slc (Hkv, Tq, T), jrn (Tq, T), win (Tq, T) bool masks.
    """
    device = queries.device
    t = queries[:, None]
    s = torch.arange(length, device=device)[None, :]
    if config.causal:
        jrn = anchors[None, :] & (s <= t)
        win = (s <= t) & (s > t - config.window)
    else:
        jrn = anchors[None, :].expand(len(queries), length)
        win = (s - t).abs() < config.window
    num_sel = -(-length // config.select_block)
    picked = torch.zeros(*selection.shape[:2], num_sel + 1, dtype=torch.bool, device=device)
    picked.scatter_(-1, torch.where(selection < 0, num_sel, selection), True)
    slc = picked[:, :, s[0] // config.select_block].transpose(0, 1)  # (Hkv, Tq, T)
    if config.causal:
        slc = slc & (s <= t)[None]
    return slc, jrn, win


def jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config: JSAConfig,
                  select_fn=None, return_selection: bool = False):
    """o = sum over branches of gate * branch attention (SPEC §1).

    q, k (T_total, H|Hkv, D); v (T_total, Hkv, Dv); k_cmp (Tc_total, Hkv, D), v_cmp (Tc_total, Hkv, Dv);
    gates (T_total, H, 4) ordered (cmp, slc, jrn, win); anchor_mask (T_total,) bool. The value
    width Dv may differ from D: a second value stream (e.g. action embeddings) concatenated to v is
    pooled by the same probabilities.
    select_fn: the top-N selection (default: `select_blocks`); the compiled backends pass
    torch.ops.sparserec.jsa_select here. Returns (T_total, H, Dv) [and the selection].
    """
    select_fn = select_fn or select_blocks
    total, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim)
    out = q.new_zeros(total, heads, v.shape[-1])
    selection = torch.full((total, kv_heads, config.top_n), -1, dtype=torch.long, device=q.device)
    bounds = zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), cu_cmp[:-1].tolist(), cu_cmp[1:].tolist())
    pieces = []
    for start, end, c_start, c_end in bounds:
        length = end - start
        if length == 0:
            continue
        num_cmp = c_end - c_start

        def heads_first(x):  # (T, Hkv|H, D) -> (H, T, D), kv heads repeated for their query group
            return x.transpose(0, 1).repeat_interleave(heads // x.shape[1], dim=0)

        qs, ks, vs = heads_first(q[start:end]), heads_first(k[start:end]), heads_first(v[start:end])
        kc, vc = heads_first(k_cmp[c_start:c_end]), heads_first(v_cmp[c_start:c_end])
        anchors = anchor_mask[start:end]
        gate = gates[start:end].permute(1, 0, 2)  # (H, T, 4)
        chunk = max(config.select_q_block, _CHUNK_ELEMENTS // max(1, heads * length))

        cmp_out, cmp_probs = [], []
        for q0 in range(0, length, chunk):
            queries = torch.arange(q0, min(q0 + chunk, length), device=q.device)
            o, p = masked_attention(qs[:, queries], kc, vc, cmp_mask(queries, num_cmp, config), scale)
            cmp_out.append(o)
            cmp_probs.append(p.detach())
        o_cmp = torch.cat(cmp_out, dim=1)
        p_cmp = torch.cat(cmp_probs, dim=1).transpose(0, 1).contiguous()  # (T, H, C)
        seq_cu = torch.tensor([0, length], dtype=cu_seqlens.dtype, device=q.device)
        sel = select_fn(p_cmp, seq_cu, config, kv_heads)
        selection[start:end] = sel

        seq_out = []
        for q0 in range(0, length, chunk):
            queries = torch.arange(q0, min(q0 + chunk, length), device=q.device)
            slc_mask, jrn_mask, win_mask = token_masks(length, queries, config, anchors, sel[queries])
            slc_mask = slc_mask.repeat_interleave(group, dim=0)
            qc = qs[:, queries]
            o_slc, _ = masked_attention(qc, ks, vs, slc_mask, scale)
            o_jrn, _ = masked_attention(qc, ks, vs, jrn_mask, scale)
            o_win, _ = masked_attention(qc, ks, vs, win_mask, scale)
            g = gate[:, queries]
            seq_out.append(g[..., 0:1] * o_cmp[:, queries] + g[..., 1:2] * o_slc
                           + g[..., 2:3] * o_jrn + g[..., 3:4] * o_win)
        pieces.append((start, end, torch.cat(seq_out, dim=1).transpose(0, 1)))
    if pieces:
        # index_copy keeps autograd simple across sequences (out starts as zeros).
        index = torch.cat([torch.arange(s, e, device=q.device) for s, e, _ in pieces])
        out = out.index_copy(0, index, torch.cat([p for _, _, p in pieces]).to(q.dtype))
    return (out, selection) if return_selection else out
