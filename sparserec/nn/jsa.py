"""JourneySparseAttention: a drop-in self-attention module built on `sparserec.ops`."""
import math

import torch
from torch import nn

from ..config import JSAConfig
from ..flops import jsa_flops
from ..ops import jsa_attention, jsa_compress, jsa_plan

COMPRESS_MODES = ("mlp", "linear")


def cu_seqlens_of(valid):
    """Offsets (B+1,) int64 of the real tokens of a padded batch, valid (B, T) bool (real ones first)."""
    return nn.functional.pad(valid.sum(1).cumsum(0), (1, 0))


def compressed_jsa(q, k, v, gates, anchor_mask, cu_seqlens, k_compress, v_compress, config: JSAConfig,
                   backend: str = "auto", plan=None):
    """JSA over packed tokens whose compressed keys and values come from the learned compressors
    `k_compress`, `v_compress` (MLPCompressor or LinearCompressor) -> (T_total, H, Dv).

    plan: the batch's `sparserec.ops.jsa_plan` for these widths, built once and shared by every
    layer; without one this call builds its own (shared by its compressions, attention and their
    backward). The compressed tensors are sized by the plan's static bound (T_total // stride rows,
    the tail zero-padded), so nothing on this path reads device data: no host sync on a GPU, no graph
    break under torch.compile. When K and V have one width, their linear compressions run as one
    `jsa_compress` call over their kv heads side by side (one kernel launch, one backward, instead
    of two of each).
    """
    if plan is None:
        plan = jsa_plan(cu_seqlens, anchor_mask, config, q.shape[-1], v.shape[-1], dtype=q.dtype, backend=backend,
                        group=q.shape[1] // k.shape[1])
    (k_weight, k_pe), (v_weight, v_pe) = k_compress.linear_part(), v_compress.linear_part()
    if k.shape[-1] == v.shape[-1]:
        hidden, cu_cmp = jsa_compress(torch.cat([k, v], 1), torch.cat([k_weight, v_weight]), torch.cat([k_pe, v_pe]),
                                      cu_seqlens, config.block, config.stride, backend=backend, plan=plan)
        k_hidden, v_hidden = hidden.split([k.shape[1], v.shape[1]], dim=1)
    else:
        k_hidden, cu_cmp = jsa_compress(k, k_weight, k_pe, cu_seqlens, config.block, config.stride, backend=backend,
                                        plan=plan)
        v_hidden, _ = jsa_compress(v, v_weight, v_pe, cu_seqlens, config.block, config.stride, backend=backend,
                                   plan=plan)
    k_cmp, v_cmp = k_compress.finish(k_hidden), v_compress.finish(v_hidden)
    return jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config=config, backend=backend,
                         plan=plan)


class MLPCompressor(nn.Module):
    """NSA's φ per kv head: the flattened block plus `pe` through Linear(l·D→D), GELU, Linear(D→D).

    The first Linear of a flattened block is exactly the linear compression (`jsa_compress` with
    W_r = its weight's r-th D×D slice), so it runs on the same kernels as compress="linear".
    """

    def __init__(self, kv_heads: int, block: int, head_dim: int):
        super().__init__()
        self.block, self.head_dim = block, head_dim
        self.pe = nn.Parameter(torch.zeros(kv_heads, block, head_dim))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(block * head_dim, head_dim), nn.GELU(), nn.Linear(head_dim, head_dim))
            for _ in range(kv_heads)
        )

    def linear_part(self):
        """(weight (Hkv, block, D, D), pe) of the first Linear, as `jsa_compress` takes them."""
        dim = self.head_dim
        # Linear weight (D_out, l·D_in) -> (l, D_in, D_out) per head, stacked over kv heads.
        return torch.stack([mlp[0].weight.view(dim, self.block, dim).permute(1, 2, 0) for mlp in self.heads]), self.pe

    def finish(self, hidden):
        """The rest of φ on the first Linear's output without its bias: (Tc, Hkv, D) -> (Tc, Hkv, D)."""
        hidden = nn.functional.gelu(hidden + torch.stack([mlp[0].bias for mlp in self.heads]))
        second = torch.stack([mlp[2].weight for mlp in self.heads])  # (Hkv, D_out, D_in)
        return torch.einsum("chi,hoi->cho", hidden, second) + torch.stack([mlp[2].bias for mlp in self.heads])

    def forward(self, x, cu_seqlens, block: int, stride: int, backend: str = "auto", num_blocks=None):
        if block != self.block:
            raise ValueError(f"this compressor was built for blocks of {self.block} tokens, got block={block}")
        hidden, cu_cmp = jsa_compress(x, *self.linear_part(), cu_seqlens, block, stride, backend=backend,
                                      num_blocks=num_blocks)
        return self.finish(hidden), cu_cmp


class LinearCompressor(nn.Module):
    """The kernel path: `jsa_compress`, a learned linear map of each flattened block."""

    def __init__(self, kv_heads: int, block: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(kv_heads, block, head_dim, head_dim) / math.sqrt(block * head_dim))
        self.pe = nn.Parameter(torch.zeros(kv_heads, block, head_dim))

    def linear_part(self):
        return self.weight, self.pe

    def finish(self, hidden):
        return hidden

    def forward(self, x, cu_seqlens, block: int, stride: int, backend: str = "auto", num_blocks=None):
        return jsa_compress(x, self.weight, self.pe, cu_seqlens, block, stride, backend=backend, num_blocks=num_blocks)


class JourneySparseAttention(nn.Module):
    """Self-attention with Journey-aware Sparse Attention (SPEC §1).

    Packed input: forward(x (T_total, E), cu_seqlens=(B+1,), anchor_mask=(T_total,) bool).
    Padded input: forward(x (B, T, E), key_padding_mask=(B, T) bool, True = padding, as in
    nn.MultiheadAttention; anchor_mask=(B, T) bool). Padding tokens are dropped before attention
    (positions count real tokens only) and come back as zeros. No anchors when anchor_mask is None.
    plan: `self.plan(cu_seqlens, anchor_mask)`, built once per batch and passed to every layer of
    the same config and widths (packed input; optional: each call builds its own otherwise).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads=None, config: JSAConfig = JSAConfig(),
                 backend: str = "auto", compress: str = "mlp", bias: bool = True):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {COMPRESS_MODES}, got {compress!r}")
        if not isinstance(config, JSAConfig):
            raise TypeError(f"config must be a JSAConfig, got {type(config).__name__}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.config, self.backend, self.compress = config, backend, compress
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.gate_proj = nn.Linear(embed_dim, num_heads * 4)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        compressor = MLPCompressor if compress == "mlp" else LinearCompressor
        self.k_compress = compressor(num_kv_heads, config.block, self.head_dim)
        self.v_compress = compressor(num_kv_heads, config.block, self.head_dim)

    def plan(self, cu_seqlens, anchor_mask, dtype=None):
        """The batch plan (`sparserec.ops.jsa_plan`) of packed input (cu_seqlens, anchor_mask (T_total,)
        bool: all False for no anchors) for this module's config, widths and backend, with activations
        of `dtype` (default: the weights'): pass it to every such layer's forward."""
        return jsa_plan(cu_seqlens, anchor_mask, self.config, self.head_dim, dtype=dtype or self.q_proj.weight.dtype,
                        backend=self.backend, group=self.num_heads // self.num_kv_heads)

    def forward(self, x, cu_seqlens=None, anchor_mask=None, key_padding_mask=None, plan=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 3:
            if plan is not None:
                raise ValueError("plan applies to packed (T_total, E) input only")
            return self._forward_padded(x, key_padding_mask, anchor_mask)
        if x.dim() != 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (T_total, {self.embed_dim}) packed or (B, T, {self.embed_dim}) padded, "
                             f"got {tuple(x.shape)}")
        if cu_seqlens is None:
            raise ValueError("packed input (T_total, E) needs cu_seqlens")
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor of B+1 offsets, got {type(cu_seqlens).__name__}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask applies to padded (B, T, E) input only")
        return self._forward_packed(x, cu_seqlens, anchor_mask, plan)

    def _forward_packed(self, x, cu_seqlens, anchor_mask, plan=None):
        total = x.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(total, heads, dim)
        k = self.k_proj(x).view(total, kv_heads, dim)
        v = self.v_proj(x).view(total, kv_heads, dim)
        gates = torch.sigmoid(self.gate_proj(x)).view(total, heads, 4)
        if anchor_mask is None:
            anchor_mask = torch.zeros(total, dtype=torch.bool, device=x.device)
        out = compressed_jsa(q, k, v, gates, anchor_mask, cu_seqlens, self.k_compress, self.v_compress, self.config,
                             self.backend, plan)
        return self.out_proj(out.reshape(total, heads * dim))

    def _forward_padded(self, x, key_padding_mask, anchor_mask):
        batch, length, embed = x.shape
        if embed != self.embed_dim:
            raise ValueError(f"x must have embed_dim {self.embed_dim} in its last dimension, got {embed}")
        for name, mask in (("key_padding_mask", key_padding_mask), ("anchor_mask", anchor_mask)):
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (batch, length)):
                raise ValueError(f"{name} must be a bool tensor of shape {(batch, length)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        valid = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        if key_padding_mask is not None:
            valid = ~key_padding_mask
        cu_seqlens = cu_seqlens_of(valid)
        packed_anchors = anchor_mask[valid] if anchor_mask is not None else None
        out = self._forward_packed(x[valid], cu_seqlens, packed_anchors)
        return x.new_zeros(batch, length, embed).masked_scatter(valid[..., None], out)

    def flops(self, lengths, anchor_mask=None, selection=None):
        """Useful and dense FLOPs of the attention core (see `sparserec.flops.jsa_flops`)."""
        return jsa_flops(lengths, self.config, self.num_heads, self.head_dim, self.num_kv_heads,
                         anchor_mask=anchor_mask, selection=selection)
