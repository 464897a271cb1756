"""JSA (SPEC §1) composed from FlexAttention calls: the baseline a PyTorch user would write.

The packed batch (T_total tokens, `cu_seqlens`) is one flex sequence, and every mask keeps a
query inside its own sequence. Four `flex_attention` calls, the gated sum in PyTorch:

  cmp  queries x compressed keys; causal: block i is visible to t iff i*stride + block - 1 <= t
  slc  queries x keys, with a BlockMask made from the selection (per kv head)
  jrn  queries x the anchors' keys gathered into a compact list; the mask tests anchor positions
       (a mask over all keys would visit every key block, anchors being ~1 in 16 tokens)
  win  queries x keys, the sliding window

The selection runs between cmp and slc: `select(q, k_cmp, lse_cmp, cu_seqlens, cu_cmp, config)`,
with lse_cmp (T_total, H) fp32, +inf where a query sees no compressed block. `torch_select` is
the reference's selection; on CUDA, `sparserec.triton_kernels.jsa_cmp.cmp_select` has the same
signature.

Block masks are built from per-query key ranges (contiguous for cmp, jrn and win) and from the
selection (slc), never by evaluating a mask_mod over T_total^2 pairs. The cmp, jrn and win masks
depend only on the batch (lengths, anchors), so `FlexBatch.build` makes them once per batch, as
a model shares them across its layers; the slc mask depends on the selection and is made in
every call. The compressed and anchor key lists are padded to a power of two (the masks never
list the padding's blocks, so it costs no attention work): batches then share a few shapes, and
a torch.compile'd flex_attention with static shapes is not recompiled for every batch.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from sparserec import JSAConfig
from sparserec.reference.jsa import cmp_mask, compress_block_index, select_blocks

# FlexAttention's default sparse block: the compiled kernels' tiles divide it on every GPU.
BLOCK_SIZE = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded(n: int, block_size: int) -> int:
    """Key list length for n keys: a power of two, at least one block (0 stays 0: no call)."""
    return 0 if n == 0 else max(block_size, 1 << (n - 1).bit_length())


def _ordered(dense: torch.Tensor):
    """(..., rows, cols) bool -> per row: how many columns are True, and column indices, True ones first."""
    counts = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, indices.to(torch.int32)


def _block_mask(partial, full, q_len: int, kv_len: int, mask_mod, block_size: int) -> BlockMask:
    """BlockMask from (H or 1, q blocks, kv blocks) bool maps of partial and full blocks."""
    kv_num, kv_index = _ordered(partial[None])
    full_num, full_index = _ordered(full[None]) if full is not None else (None, None)
    return BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def _range_block_mask(lo, hi, kv_len: int, mask_mod, block_size: int) -> Optional[BlockMask]:
    """Block mask of a mask that is, for query t, exactly the keys [lo[t], hi[t]) (empty if lo >= hi)."""
    if kv_len == 0:
        return None
    q_len = lo.numel()
    pad = (-q_len) % block_size
    no_key = lo >= hi
    big = kv_len + 1

    def per_block(x, pad_value, reduce):
        return reduce(F.pad(x, (0, pad), value=pad_value).view(-1, block_size), dim=1)

    # Touched: some query of the block sees some key of the kv block. Full: all of its queries
    # see all of its keys (padding rows past q_len do not count, rows without keys forbid it).
    span_lo = per_block(torch.where(no_key, big, lo), big, torch.amin)
    span_hi = per_block(torch.where(no_key, 0, hi), 0, torch.amax)
    cover_lo = per_block(lo, 0, torch.amax)
    cover_hi = per_block(hi, big, torch.amin)
    kv_start = torch.arange(0, kv_len, block_size, device=lo.device)
    kv_end = torch.clamp(kv_start + block_size, max=kv_len)
    touched = (kv_start[None, :] < span_hi[:, None]) & (kv_end[None, :] > span_lo[:, None])
    full = (cover_lo[:, None] <= kv_start[None, :]) & (kv_end[None, :] <= cover_hi[:, None])
    return _block_mask((touched & ~full)[None], full[None], q_len, kv_len, mask_mod, block_size)


@dataclass
class FlexBatch:
    """What every call on one batch shares: token indices, and the cmp, jrn and win block masks."""

    config: JSAConfig
    cu_seqlens: torch.Tensor
    cu_cmp: torch.Tensor
    block_size: int
    token_seq: torch.Tensor      # (T,) sequence of each token
    token_block: torch.Tensor    # (T,) batch-wide index of each token's selection block
    seq_first_block: torch.Tensor  # (B,) batch-wide index of each sequence's first selection block
    tile_first: torch.Tensor     # (tiles,) first token of each selection tile (select_q_block)
    tile_last: torch.Tensor      # (tiles,) last token of each selection tile
    anchor_index: torch.Tensor   # (A padded,) anchor tokens, ascending, then token 0 as padding
    compress_index: torch.Tensor  # (Tc, block) tokens of each compressed block
    cmp_keys: int                # length of the padded compressed key list
    cmp_mask: Optional[BlockMask]
    jrn_mask: Optional[BlockMask]
    win_mask: BlockMask

    @classmethod
    def build(cls, cu_seqlens, anchor_mask, config: JSAConfig, block_size: int = BLOCK_SIZE):
        device = cu_seqlens.device
        cu = cu_seqlens.long()
        total = int(cu[-1])
        lengths = cu[1:] - cu[:-1]
        token = torch.arange(total, device=device)
        token_seq = torch.searchsorted(cu[1:], token, right=True)
        seq_start, seq_end = cu[token_seq], cu[token_seq + 1]
        pos = token - seq_start

        blocks = (lengths + config.select_block - 1) // config.select_block
        seq_first_block = torch.cumsum(blocks, 0) - blocks
        token_block = seq_first_block[token_seq] + pos // config.select_block
        tile_first = token[pos % config.select_q_block == 0]
        tile_last = torch.minimum(tile_first + config.select_q_block, seq_end[tile_first]) - 1

        compress_index, cu_cmp = compress_block_index(cu_seqlens, config.block, config.stride)
        compress_index, cu_cmp = compress_index.to(device), cu_cmp.to(device)
        num_blocks, cmp_keys = len(compress_index), _padded(len(compress_index), block_size)
        # Padding keys belong to no sequence (-1), so no mask_mod lets a query see them.
        cmp_seq = torch.full((cmp_keys,), -1, dtype=torch.long, device=device)
        block_ids = torch.arange(num_blocks, device=device)
        cmp_seq[:num_blocks] = torch.searchsorted(cu_cmp[1:].long(), block_ids, right=True)
        cmp_last = torch.zeros(cmp_keys, dtype=torch.long, device=device)
        cmp_last[:num_blocks] = (block_ids - cu_cmp[cmp_seq[:num_blocks]]) * config.stride + config.block - 1

        anchor_pos = anchor_mask.nonzero().flatten()
        anchor_keys = _padded(len(anchor_pos), block_size)
        anchor_index = torch.zeros(anchor_keys, dtype=torch.long, device=device)
        anchor_index[:len(anchor_pos)] = anchor_pos
        anchor_seq = torch.full((anchor_keys,), -1, dtype=torch.long, device=device)
        anchor_seq[:len(anchor_pos)] = token_seq[anchor_pos]
        anchors_before = torch.zeros(total + 1, dtype=torch.long, device=device)
        anchors_before[1:] = torch.cumsum(anchor_mask.long(), 0)
        causal, window = config.causal, config.window

        def win_mod(b, h, q_idx, kv_idx):
            offset = q_idx - kv_idx
            near = (offset >= 0) & (offset < window) if causal else (offset < window) & (-offset < window)
            return near & (token_seq[q_idx] == token_seq[kv_idx])

        def cmp_mod(b, h, q_idx, kv_idx):
            same = token_seq[q_idx] == cmp_seq[kv_idx]
            return same & (cmp_last[kv_idx] <= pos[q_idx]) if causal else same

        def jrn_mod(b, h, q_idx, kv_idx):
            same = token_seq[q_idx] == anchor_seq[kv_idx]
            return same & (anchor_index[kv_idx] <= q_idx) if causal else same

        num_cmp = (cu_cmp[1:] - cu_cmp[:-1])[token_seq]
        if causal:
            reach = torch.where(pos >= config.block - 1, (pos - config.block + 1) // config.stride + 1, 0)
            cmp_hi = cu_cmp[token_seq] + torch.minimum(reach, num_cmp)
            win_hi, jrn_hi = token + 1, anchors_before[token + 1]
        else:
            cmp_hi = cu_cmp[token_seq] + num_cmp
            win_hi, jrn_hi = torch.minimum(token + window, seq_end), anchors_before[seq_end]
        win_lo = torch.maximum(token - window + 1, seq_start)
        return cls(
            config=config, cu_seqlens=cu_seqlens, cu_cmp=cu_cmp, block_size=block_size,
            token_seq=token_seq, token_block=token_block, seq_first_block=seq_first_block,
            tile_first=tile_first, tile_last=tile_last, anchor_index=anchor_index, compress_index=compress_index,
            cmp_keys=cmp_keys,
            cmp_mask=_range_block_mask(cu_cmp[token_seq].long(), cmp_hi.long(), cmp_keys, cmp_mod, block_size),
            jrn_mask=_range_block_mask(anchors_before[seq_start], jrn_hi, anchor_keys, jrn_mod, block_size),
            win_mask=_range_block_mask(win_lo, win_hi, total, win_mod, block_size),
        )

    def compress(self, x, weight, pe):
        """The reference's linear compression (SPEC §1 cmp), with the block index made once per batch."""
        return torch.einsum("clhd,hlde->che", x[self.compress_index] + pe.transpose(0, 1), weight)

    def slc_mask(self, selection, heads: int) -> BlockMask:
        """Block mask of the slc branch for `selection` (T, Hkv, top_n), sequence-local, -1 padded."""
        config, size = self.config, self.block_size
        total, kv_heads, top_n = selection.shape
        group = heads // kv_heads
        picked = selection.long()
        chosen = torch.where(picked >= 0, self.seq_first_block[self.token_seq][:, None, None] + picked, -1)
        token_block, causal = self.token_block, config.causal

        def slc_mod(b, h, q_idx, kv_idx):
            kv_block, kv_head = token_block[kv_idx], h // group
            hit = chosen[q_idx, kv_head, 0] == kv_block
            for n in range(1, top_n):
                hit = hit | (chosen[q_idx, kv_head, n] == kv_block)
            return hit & (kv_idx <= q_idx) if causal else hit

        # Key range of each (tile, kv head, slot) pick, then every (q block, kv block) it touches.
        tile_picks = picked[self.tile_first]
        seq_start = self.cu_seqlens.long()[self.token_seq[self.tile_first]]
        seq_end = self.cu_seqlens.long()[self.token_seq[self.tile_first] + 1]
        key_lo = seq_start[:, None, None] + tile_picks * config.select_block
        key_hi = torch.minimum(key_lo + config.select_block, seq_end[:, None, None])
        if causal:
            key_hi = torch.minimum(key_hi, self.tile_last[:, None, None] + 1)
        valid = (tile_picks >= 0) & (key_hi > key_lo)
        q_first, q_last = (self.tile_first // size)[:, None, None], (self.tile_last // size)[:, None, None]
        kv_first, kv_last = key_lo.clamp(min=0) // size, (key_hi - 1).clamp(min=0) // size
        head = torch.arange(kv_heads, device=selection.device)[None, :, None].expand_as(tile_picks)
        num_blocks = _cdiv(total, size)
        hits = torch.zeros(kv_heads, num_blocks, num_blocks, dtype=torch.int32, device=selection.device)
        for dq in range(_cdiv(config.select_q_block, size) + 1):
            q_block = torch.minimum(q_first + dq, q_last).expand_as(tile_picks)
            for dk in range(_cdiv(config.select_block, size) + 1):
                kv_block = torch.minimum(kv_first + dk, kv_last)
                hits.index_put_((head, q_block, kv_block), valid.to(torch.int32), accumulate=True)
        partial = (hits > 0).repeat_interleave(group, dim=0)
        return _block_mask(partial, None, total, total, slc_mod, size)


def torch_select(q, k_cmp, lse_cmp, cu_seqlens, cu_cmp, config: JSAConfig):
    """The reference's top-N selection, from cmp probabilities recomputed with the cmp lse."""
    total, heads, dim = q.shape
    group = heads // k_cmp.shape[1]
    counts = (cu_cmp[1:] - cu_cmp[:-1]).tolist()
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.zeros(total, heads, max(counts + [1]), dtype=dtype, device=q.device)
    bounds = zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), cu_cmp[:-1].tolist(), counts)
    for start, end, c_start, count in bounds:
        if end == start or count == 0:
            continue
        keys = k_cmp[c_start:c_start + count].repeat_interleave(group, dim=1).to(dtype)
        scores = torch.einsum("thd,chd->thc", q[start:end].to(dtype), keys) / math.sqrt(dim)
        visible = cmp_mask(torch.arange(end - start, device=q.device), count, config)[:, None, :]
        probs[start:end, :, :count] = torch.where(visible, torch.exp(scores - lse_cmp[start:end, :, None]), 0.0)
    return select_blocks(probs, cu_seqlens, config, k_cmp.shape[1])


def _heads_first(x):
    """(T, H, D) -> (1, H, T, D), the layout flex_attention takes (a view, no copy)."""
    return x.transpose(0, 1).unsqueeze(0)


def flex_jsa_attention(q, k, v, k_cmp, v_cmp, gates, batch: FlexBatch, select: Callable = torch_select,
                       attend: Callable = flex_attention):
    """o = sum of gate * branch over cmp, slc, jrn, win (SPEC §1) -> (T_total, H, D).

    Same tensors as `sparserec.reference.jsa_attention`; lengths, anchors and config come with
    `batch`. `attend` is flex_attention, or its torch.compile'd form (the fast one on CUDA).
    """
    total, heads, dim = q.shape
    gqa = heads != k.shape[1]

    def run(keys, values, mask, lse=False):
        kwargs = dict(block_mask=mask, enable_gqa=gqa)
        if lse:
            out, aux = attend(_heads_first(q), _heads_first(keys), _heads_first(values),
                              return_aux=AuxRequest(lse=True), **kwargs)
            return out[0].transpose(0, 1), aux.lse[0].transpose(0, 1)
        return attend(_heads_first(q), _heads_first(keys), _heads_first(values), **kwargs)[0].transpose(0, 1)

    if batch.cmp_mask is None:  # no sequence has a full compressed block
        o_cmp, lse_cmp = torch.zeros_like(q), q.new_full((total, heads), math.inf, dtype=torch.float32)
    else:
        pad = (0, 0, 0, 0, 0, batch.cmp_keys - k_cmp.shape[0])
        o_cmp, lse_cmp = run(F.pad(k_cmp, pad), F.pad(v_cmp, pad), batch.cmp_mask, lse=True)
        lse_cmp = torch.where(torch.isneginf(lse_cmp), math.inf, lse_cmp)  # flex: -inf, select: +inf
    with torch.no_grad():
        selection = select(q.detach(), k_cmp.detach(), lse_cmp.detach(), batch.cu_seqlens, batch.cu_cmp, batch.config)
    o_slc = run(k, v, batch.slc_mask(selection, heads))
    if batch.jrn_mask is None:  # no anchors
        o_jrn = torch.zeros_like(q)
    else:
        o_jrn = run(k[batch.anchor_index], v[batch.anchor_index], batch.jrn_mask)
    o_win = run(k, v, batch.win_mask)
    return (gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_jrn
            + gates[..., 3:4] * o_win)
