"""The Triton JSA backend: custom ops over the kernels in `sparserec.triton_kernels`.

Ops (torch.library, each with a fake kernel; the forward ops carry their autograd):

  sparserec::triton_jsa_compress(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks, plan)
      -> (Tc_total = num_blocks, Hkv, D)                        [jsa_compress.compress_fwd]
  sparserec::triton_jsa_compress_backward(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride, plan)
      -> (dx, dweight, dpe)                                     [jsa_compress.compress_bwd]
  sparserec::triton_jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp,
                                  *config, store_branches, plan)
      -> (out, o_cmp, lse_cmp, selection, lse_sparse, branches)   [v, v_cmp, out, o_cmp: width Dv]
  sparserec::triton_jsa_attention_backward(dout, <inputs>, o_cmp, lse_cmp, selection, lse_sparse,
                                           branches, *config, plan) -> (dq, dk, dv, dk_cmp, dv_cmp, dgates)

plan: the batch's index maps (`triton_kernels.plan`: CompressPlan / AttentionPlan as a list of
tensors), built once per batch by `plan()` (sparserec.ops.jsa_plan) and shared by every layer's
launches, forward and backward; an empty list makes the op build them for this call alone.

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
from ..triton_kernels.plan import AttentionPlan, CompressPlan, attention_plan, compress_plan
from .compiled_compress import compress_with, register_compress_autograd


def _config_args(config: JSAConfig):
    return (config.block, config.stride, config.select_block, config.top_n, config.select_q_block,
            config.window, config.causal)


def _config(block, stride, select_block, top_n, select_q_block, window, causal) -> JSAConfig:
    return JSAConfig(block=block, stride=stride, select_block=select_block, top_n=top_n,
                     select_q_block=select_q_block, window=window, causal=causal)


def plan(cu_seqlens, cu_cmp, anchor_mask, config: JSAConfig, head_dim: int, value_dim: int, group: int,
         num_cmp_rows: int):
    """The batch's maps for `sparserec.ops.jsa_plan`: (CompressPlan, AttentionPlan)."""
    return (compress_plan(cu_seqlens, cu_cmp, num_cmp_rows, config.block, config.stride),
            _new_attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, head_dim, value_dim, group, num_cmp_rows))


def _new_attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, head_dim: int, value_dim: int, group: int,
                        num_cmp_rows: int):
    """The AttentionPlan at the tile sizes the kernels pick for these widths and GQA group."""
    geometry = jsa_sparse.launch_geometry(config, head_dim, value_dim=value_dim, group=group)
    return attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, num_cmp_rows, geometry["tile_tokens"],
                          geometry["dkv_block_n"])


# ---------------------------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------------------------


@custom_op("sparserec::triton_jsa_compress", mutates_args=())
def triton_jsa_compress(x: Tensor, weight: Tensor, pe: Tensor, cu_seqlens: Tensor, cu_cmp: Tensor,
                        block: int, stride: int, num_blocks: int, plan: list[Tensor]) -> Tensor:
    return compress_kernels.compress_fwd(x, weight, pe, cu_seqlens, cu_cmp, num_blocks, block, stride,
                                         plan=CompressPlan(*plan) if plan else None)


@triton_jsa_compress.register_fake
def _(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks, plan):
    return x.new_empty(num_blocks, x.shape[1], x.shape[2])


@custom_op("sparserec::triton_jsa_compress_backward", mutates_args=())
def triton_jsa_compress_backward(grad: Tensor, x: Tensor, weight: Tensor, pe: Tensor, cu_seqlens: Tensor,
                                 cu_cmp: Tensor, block: int, stride: int,
                                 plan: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return compress_kernels.compress_bwd(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride,
                                         plan=CompressPlan(*plan) if plan else None)


@triton_jsa_compress_backward.register_fake
def _(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride, plan):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(pe)


register_compress_autograd(triton_jsa_compress, triton_jsa_compress_backward)


def compress(x, weight, pe, cu_seqlens, block: int, stride: int, num_blocks=None, plan=None):
    """Backend entry of `sparserec.ops.jsa_compress`: (Tc_total, Hkv, D), cu_cmp."""
    return compress_with(triton_jsa_compress, x, weight, pe, cu_seqlens, block, stride, num_blocks, plan,
                         [] if plan is None else list(plan.compress))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@custom_op("sparserec::triton_jsa_attention", mutates_args=())
def triton_jsa_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor, anchor_mask: Tensor,
    cu_seqlens: Tensor, cu_cmp: Tensor, block: int, stride: int, select_block: int, top_n: int,
    select_q_block: int, window: int, causal: bool, store_branches: bool, plan: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(block, stride, select_block, top_n, select_q_block, window, causal)
    maps = _attention_maps(plan, q, k, v, anchor_mask, cu_seqlens, cu_cmp, k_cmp.shape[0], config)
    o_cmp, lse_cmp, selection = jsa_cmp.cmp_attention_select(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, config, plan=maps)
    out, lse_sparse, branches = jsa_sparse.sparse_attention_fwd(
        q, k, v, gates, selection, anchor_mask, cu_seqlens, config, store_branches=store_branches, o_cmp=o_cmp,
        plan=maps)
    if branches is None:
        branches = q.new_empty(0)
    return out, o_cmp, lse_cmp, selection, lse_sparse, branches


def _attention_maps(plan, q, k, v, anchor_mask, cu_seqlens, cu_cmp, num_cmp_rows: int, config) -> AttentionPlan:
    """The op's AttentionPlan: the one passed in, or this call's own."""
    if plan:
        return AttentionPlan(*plan)
    return _new_attention_plan(cu_seqlens, cu_cmp, anchor_mask, config, q.shape[-1], v.shape[-1],
                               q.shape[1] // k.shape[1], num_cmp_rows)


@triton_jsa_attention.register_fake
def _(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, block, stride, select_block, top_n,
      select_q_block, window, causal, store_branches, plan):
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
    select_q_block: int, window: int, causal: bool, plan: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(block, stride, select_block, top_n, select_q_block, window, causal)
    dq, dk, dv, dgates, dk_cmp, dv_cmp = jsa_sparse.sparse_attention_bwd(
        dout, q, k, v, gates, selection, anchor_mask, cu_seqlens, config, branches, lse_sparse,
        cmp=(k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp),
        plan=_attention_maps(plan, q, k, v, anchor_mask, cu_seqlens, cu_cmp, k_cmp.shape[0], config))
    return dq, dk, dv, dk_cmp, dv_cmp, dgates


@triton_jsa_attention_backward.register_fake
def _(dout, q, k, v, k_cmp, v_cmp, gates, *rest):
    return tuple(torch.empty_like(t) for t in (q, k, v, k_cmp, v_cmp, gates))


_ATTENTION_INPUTS = ("q", "k", "v", "k_cmp", "v_cmp", "gates", "anchor_mask", "cu_seqlens", "cu_cmp")


def _attention_setup_context(ctx, inputs, output):
    _, o_cmp, lse_cmp, selection, lse_sparse, branches = output
    *config_args, store_branches, plan = inputs[len(_ATTENTION_INPUTS):]
    ctx.save_for_backward(*inputs[:len(_ATTENTION_INPUTS)], o_cmp, lse_cmp, selection, lse_sparse, branches, *plan)
    ctx.config_args, ctx.stored_branches = config_args, store_branches


def _attention_backward(ctx, dout, *unused_grads):
    if not ctx.stored_branches:
        raise RuntimeError("sparserec::triton_jsa_attention ran with store_branches=False, so it kept no "
                           "branch outputs for a backward; call it through sparserec.ops.jsa_attention")
    saved = ctx.saved_tensors
    inputs, plan = saved[:len(_ATTENTION_INPUTS) + 5], list(saved[len(_ATTENTION_INPUTS) + 5:])
    grads = triton_jsa_attention_backward(dout.contiguous(), *inputs, *ctx.config_args, plan)
    # No gradient for the index inputs, the config, store_branches, or the plan's maps (a list).
    return (*grads[:6], *([None] * (len(_ATTENTION_INPUTS) - 6 + len(ctx.config_args) + 1)), [None] * len(plan))


triton_jsa_attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config: JSAConfig,
              return_selection: bool = False, plan=None):
    """Backend entry of `sparserec.ops.jsa_attention` -> (T_total, H, D) [and the selection]."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_cmp, v_cmp, gates))
    out, _, _, selection, _, _ = triton_jsa_attention(
        q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, *_config_args(config), needs_grad,
        [] if plan is None else list(plan.attention))
    return (out, selection) if return_selection else out
