"""The Triton JSA backend: custom ops over the kernels in `sparserec.triton_kernels`.

Ops (torch.library, each with a fake kernel; the forward ops carry their autograd):

  sparserec::triton_jsa_compress(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks)
      -> (Tc_total = num_blocks, Hkv, D)                        [jsa_compress.compress_fwd]
  sparserec::triton_jsa_compress_backward(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride)
      -> (dx, dweight, dpe)                                     [jsa_compress.compress_bwd]
  sparserec::triton_jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp,
                                  *config, store_branches)
      -> (out, o_cmp, lse_cmp, selection, lse_sparse, branches)   [v, v_cmp, out, o_cmp: width Dv]
  sparserec::triton_jsa_attention_backward(dout, <inputs>, o_cmp, lse_cmp, selection, lse_sparse,
                                           branches, *config) -> (dq, dk, dv, dk_cmp, dv_cmp, dgates)

The attention forward runs, with no host synchronisation (grids are bounds from shapes; idle
programs exit), so it can be captured in a CUDA graph and traced by torch.compile:
  1. jsa_cmp.cmp_attention_select   o_cmp, lse_cmp and the selection (T_total, Hkv, top_n) int32
                                     from the cmp probabilities, in one launch
  2. jsa_sparse.sparse_attention_fwd   out = g_cmp*o_cmp + g_slc*o_slc + g_jrn*o_jrn + g_win*o_win
Backward: jsa_sparse.sparse_attention_bwd with the cmp branch's tensors (dq of all four branches,
dk, dv, dk_cmp, dv_cmp and every gate's gradient, in two launches); selection is not differentiated.

Interface with triton_kernels/jsa_sparse.py (its module docstring is the authority):
    out, lse, branches = sparse_attention_fwd(q, k, v, gates, selection, anchor_mask, cu_seqlens,
                                              config, store_branches=False, o_cmp=o_cmp)
    dq, dk, dv, dgates, dk_cmp, dv_cmp = sparse_attention_bwd(
        dout, q, k, v, gates, selection, anchor_mask, cu_seqlens, config, branches, lse,
        cmp=(k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp))
  out (T_total, H, D) = g_cmp*o_cmp + g_slc*o_slc + g_jrn*o_jrn + g_win*o_win (gates channels 0..3);
  lse (3, H, T_total) fp32; branches (3, T_total, H, D), kept only for a backward;
  dgates (T_total, H, 4), the gates' channel order.

Compression's exact output size (the number of full blocks) depends on the lengths: `compress` reads
it from the device unless the caller passes a static bound (`num_blocks`, e.g. T_total // stride, as
the module does), in which case the rows past cu_cmp[-1] are zeros and nothing is read. Its entry and
autograd are shared with the C++ op (`compiled_compress`).
"""
import torch
from torch import Tensor
from torch.library import custom_op

from ..config import JSAConfig
from ..triton_kernels import jsa_cmp, jsa_sparse
from ..triton_kernels import jsa_compress as compress_kernels
from .compiled_compress import compress_with, register_compress_autograd


def _config_args(config: JSAConfig):
    return (config.block, config.stride, config.select_block, config.top_n, config.select_q_block,
            config.window, config.causal)


def _config(block, stride, select_block, top_n, select_q_block, window, causal) -> JSAConfig:
    return JSAConfig(block=block, stride=stride, select_block=select_block, top_n=top_n,
                     select_q_block=select_q_block, window=window, causal=causal)


# ---------------------------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------------------------


@custom_op("sparserec::triton_jsa_compress", mutates_args=())
def triton_jsa_compress(x: Tensor, weight: Tensor, pe: Tensor, cu_seqlens: Tensor, cu_cmp: Tensor,
                        block: int, stride: int, num_blocks: int) -> Tensor:
    return compress_kernels.compress_fwd(x, weight, pe, cu_seqlens, cu_cmp, num_blocks, block, stride)


@triton_jsa_compress.register_fake
def _(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks):
    return x.new_empty(num_blocks, x.shape[1], x.shape[2])


@custom_op("sparserec::triton_jsa_compress_backward", mutates_args=())
def triton_jsa_compress_backward(grad: Tensor, x: Tensor, weight: Tensor, pe: Tensor, cu_seqlens: Tensor,
                                 cu_cmp: Tensor, block: int, stride: int) -> tuple[Tensor, Tensor, Tensor]:
    return compress_kernels.compress_bwd(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride)


@triton_jsa_compress_backward.register_fake
def _(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(pe)


register_compress_autograd(triton_jsa_compress, triton_jsa_compress_backward)


def compress(x, weight, pe, cu_seqlens, block: int, stride: int, num_blocks=None):
    """Backend entry of `sparserec.ops.jsa_compress`: (Tc_total, Hkv, D), cu_cmp."""
    return compress_with(triton_jsa_compress, x, weight, pe, cu_seqlens, block, stride, num_blocks)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@custom_op("sparserec::triton_jsa_attention", mutates_args=())
def triton_jsa_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, anchor_mask: Tensor,
    cu_seqlens: Tensor, cu_cmp: Tensor, block: int, stride: int, select_block: int, top_n: int,
    select_q_block: int, window: int, causal: bool, store_branches: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(block, stride, select_block, top_n, select_q_block, window, causal)
    o_cmp, lse_cmp, selection = jsa_cmp.cmp_attention_select(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, config)
    out, lse_sparse, branches = jsa_sparse.sparse_attention_fwd(
        q, k, v, gates, selection, anchor_mask, cu_seqlens, config, store_branches=store_branches, o_cmp=o_cmp)
    if branches is None:
        branches = q.new_empty(0)
    return out, o_cmp, lse_cmp, selection, lse_sparse, branches


@triton_jsa_attention.register_fake
def _(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, block, stride, select_block, top_n,
      select_q_block, window, causal, store_branches):
    total, heads, _ = q.shape
    value_dim = v.shape[-1]
    branches = q.new_empty(3, total, heads, value_dim) if store_branches else q.new_empty(0)
    return (q.new_empty(total, heads, value_dim), q.new_empty(total, heads, value_dim),
            q.new_empty(total, heads, dtype=torch.float32),
            q.new_empty(total, k.shape[1], top_n, dtype=torch.int32),
            q.new_empty(3, heads, total, dtype=torch.float32), branches)


@custom_op("sparserec::triton_jsa_attention_backward", mutates_args=())
def triton_jsa_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor,
    anchor_mask: Tensor, cu_seqlens: Tensor, cu_cmp: Tensor, o_cmp: Tensor, lse_cmp: Tensor, selection: Tensor,
    lse_sparse: Tensor, branches: Tensor, block: int, stride: int, select_block: int, top_n: int,
    select_q_block: int, window: int, causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(block, stride, select_block, top_n, select_q_block, window, causal)
    dq, dk, dv, dgates, dk_cmp, dv_cmp = jsa_sparse.sparse_attention_bwd(
        dout, q, k, v, gates, selection, anchor_mask, cu_seqlens, config, branches, lse_sparse,
        cmp=(k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp))
    return dq, dk, dv, dk_cmp, dv_cmp, dgates


@triton_jsa_attention_backward.register_fake
def _(dout, q, k, v, k_cmp, v_cmp, gates, *rest):
    return tuple(torch.empty_like(t) for t in (q, k, v, k_cmp, v_cmp, gates))


_ATTENTION_INPUTS = ("q", "k", "v", "k_cmp", "v_cmp", "gates", "anchor_mask", "cu_seqlens", "cu_cmp")


def _attention_setup_context(ctx, inputs, output):
    _, o_cmp, lse_cmp, selection, lse_sparse, branches = output
    ctx.save_for_backward(*inputs[:len(_ATTENTION_INPUTS)], o_cmp, lse_cmp, selection, lse_sparse, branches)
    ctx.config_args = inputs[len(_ATTENTION_INPUTS):-1]
    ctx.stored_branches = inputs[-1]


def _attention_backward(ctx, dout, *unused_grads):
    if not ctx.stored_branches:
        raise RuntimeError("sparserec::triton_jsa_attention ran with store_branches=False, so it kept no "
                           "branch outputs for a backward; call it through sparserec.ops.jsa_attention")
    grads = triton_jsa_attention_backward(dout.contiguous(), *ctx.saved_tensors, *ctx.config_args)
    return (*grads[:6], *([None] * (len(_ATTENTION_INPUTS) - 6 + len(ctx.config_args) + 1)))


triton_jsa_attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config: JSAConfig,
              return_selection: bool = False):
    """Backend entry of `sparserec.ops.jsa_attention` -> (T_total, H, D) [and the selection]."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_cmp, v_cmp, gates))
    out, _, _, selection, _, _ = triton_jsa_attention(
        q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, *_config_args(config), needs_grad)
    return (out, selection) if return_selection else out
