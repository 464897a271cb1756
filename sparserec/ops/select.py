"""jsa_select: the compiled top-N intra-journey block selection (SPEC §1, slc), validated.

Same signature and result as its Python twin `sparserec.reference.jsa.select_blocks`, which the
`cpp` and `cuda` backends replace with this function. The C++ kernel (csrc/cpu/jsa_select.cpp)
and the CUDA kernel (csrc/cuda/jsa_select.cu[h]) accumulate importance in double, in the twin's
order, so the three agree exactly, ties included (lower block index first).
"""
import torch

from .._ext import EXTENSION_ERROR, has_extension
from ..config import JSAConfig
from ..reference.jsa import num_compressed_blocks
from . import validate

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def jsa_select(p_cmp, cu_seqlens, config: JSAConfig, num_kv_heads: int) -> torch.Tensor:
    """Selection blocks of every token's query tile, per kv head -> (T_total, Hkv, top_n) int64.

    p_cmp (T_total, H, C) float: cmp-branch probabilities over each sequence's own compressed
    blocks (columns past a sequence's count are ignored); cu_seqlens (B+1,) int32/int64 offsets.
    Per tile of `config.select_q_block` tokens and kv head, the `config.top_n` eligible blocks of
    largest importance (sequence-local indices, ascending, -1 padded). Finite p_cmp expected: the
    C++ kernel rejects NaN/inf, the CUDA kernel cannot check without a host sync.
    """
    if not isinstance(config, JSAConfig):
        raise TypeError(f"config must be a sparserec.JSAConfig, got {type(config).__name__}")
    validate.check_tensor("p_cmp", p_cmp, ndim=3, dtypes=validate.FLOAT_DTYPES)
    validate.check_tensor("cu_seqlens", cu_seqlens)
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
    total, heads, num_cols = p_cmp.shape
    if heads % num_kv_heads:
        raise ValueError(f"p_cmp's query heads ({heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    validate.check_same_device(p_cmp=p_cmp, cu_seqlens=cu_seqlens)
    validate.check_cu_seqlens(cu_seqlens, total)
    if validate._reads_values_allowed(cu_seqlens) and total:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        needed = num_compressed_blocks(longest, config.block, config.stride)
        if needed > num_cols:
            raise ValueError(f"p_cmp has {num_cols} columns, but the longest sequence ({longest} tokens) has "
                             f"{needed} compressed blocks (block={config.block}, stride={config.stride})")
    if not has_extension():
        raise RuntimeError(f"jsa_select needs the compiled extension: {EXTENSION_ERROR}")
    dispatch_key = _DISPATCH_KEYS.get(p_cmp.device.type)
    if dispatch_key and not torch._C._dispatch_has_kernel_for_dispatch_key("sparserec::jsa_select", dispatch_key):
        raise ValueError(f"sparserec._C has no jsa_select kernel for {p_cmp.device.type} tensors "
                         "(built without CUDA?)")
    return torch.ops.sparserec.jsa_select(p_cmp, cu_seqlens, config.block, config.stride, config.select_block,
                                          config.top_n, config.select_q_block, num_kv_heads, config.causal)


if has_extension():
    @torch.library.register_fake("sparserec::jsa_select")
    def _jsa_select_fake(p_cmp, cu_seqlens, block, stride, select_block, top_n, select_q_block, num_kv_heads,
                         causal):
        torch._check(p_cmp.dim() == 3, lambda: f"jsa_select: p_cmp must be (T_total, H, C), got {p_cmp.shape}")
        torch._check(p_cmp.dtype in validate.FLOAT_DTYPES,
                     lambda: f"jsa_select: p_cmp must be a float tensor, got {p_cmp.dtype}")
        torch._check(cu_seqlens.dim() == 1 and cu_seqlens.dtype in (torch.int32, torch.int64),
                     lambda: f"jsa_select: cu_seqlens must be 1-D int32/int64, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        torch._check(min(block, stride, select_block, top_n, select_q_block) >= 1,
                     lambda: "jsa_select: block, stride, select_block, top_n and select_q_block must be >= 1")
        torch._check(num_kv_heads >= 1 and p_cmp.shape[1] % num_kv_heads == 0,
                     lambda: f"jsa_select: query heads ({p_cmp.shape[1]}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        return p_cmp.new_empty((p_cmp.shape[0], num_kv_heads, top_n), dtype=torch.long)
