"""The `cpp` backend: fused C++ kernels for the whole JSA layer on CPU tensors (csrc/cpu/jsa_*.cpp).

`torch.ops.sparserec.jsa_compress` / `jsa_attention` with their fake kernels (shapes only) and their
autograd formulas (the `*_backward` ops). The attention forward also returns each branch's
log-sum-exp and the top-N selection, which the backward takes back instead of recomputing.
"""
import torch

from .._ext import has_extension
from ..config import JSAConfig
from .compiled_compress import compress_with, register_compress_autograd


def _config_args(config: JSAConfig):
    return (config.block, config.stride, config.select_block, config.top_n, config.select_q_block, config.window,
            config.causal)


def compress(x, weight, pe, cu_seqlens, block: int, stride: int, num_blocks=None, plan=None):
    """Kc_i = sum_r (x[i*stride + r] + pe_r) @ W_r -> (Tc_total, Hkv, D), cu_cmp (see ops.jsa_compress)."""
    return compress_with(torch.ops.sparserec.jsa_compress, x, weight, pe, cu_seqlens, block, stride, num_blocks, plan)


def attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config: JSAConfig,
              return_selection: bool = False):
    """Fused JSA forward (see ops.jsa_attention) -> out [, selection (T_total, Hkv, top_n)]."""
    out, _, selection = torch.ops.sparserec.jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens,
                                                         cu_cmp, *_config_args(config))
    return (out, selection) if return_selection else out


if has_extension():
    @torch.library.register_fake("sparserec::jsa_compress")
    def _compress_fake(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks):
        torch._check(x.dim() == 3, lambda: f"jsa_compress: x must be (T_total, Hkv, D), got {tuple(x.shape)}")
        return x.new_empty((num_blocks, x.shape[1], x.shape[2]))

    @torch.library.register_fake("sparserec::jsa_compress_backward")
    def _compress_backward_fake(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride):
        return tuple(t.new_empty(t.shape) for t in (x, weight, pe))  # the kernels return contiguous tensors

    register_compress_autograd("sparserec::jsa_compress", torch.ops.sparserec.jsa_compress_backward)

    @torch.library.register_fake("sparserec::jsa_attention")
    def _attention_fake(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, block, stride, select_block,
                        top_n, select_q_block, window, causal):
        torch._check(q.dim() == 3 and k.dim() == 3, lambda: "jsa_attention: q and k must be 3-D")
        total, heads, _ = q.shape
        return (q.new_empty((total, heads, v.shape[2])), q.new_empty((total, heads, 4)),
                q.new_empty((total, k.shape[1], top_n), dtype=torch.long))

    @torch.library.register_fake("sparserec::jsa_attention_backward")
    def _attention_backward_fake(grad_out, q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, lse,
                                 selection, block, stride, select_block, top_n, select_q_block, window, causal):
        return tuple(t.new_empty(t.shape) for t in (q, k, v, k_cmp, v_cmp, gates))

    def _attention_setup(ctx, inputs, output):
        *tensors, block, stride, select_block, top_n, select_q_block, window, causal = inputs
        _, lse, selection = output
        ctx.save_for_backward(*tensors, lse, selection)
        ctx.config = (block, stride, select_block, top_n, select_q_block, window, causal)
        ctx.mark_non_differentiable(lse, selection)

    def _attention_backward(ctx, grad_out, grad_lse, grad_selection):
        grads = torch.ops.sparserec.jsa_attention_backward(grad_out, *ctx.saved_tensors, *ctx.config)
        return (*grads, None, None, None) + (None,) * 7

    torch.library.register_autograd("sparserec::jsa_attention", _attention_backward, setup_context=_attention_setup)
