"""What the compiled compression ops share: their backend entry and their autograd.

Both `sparserec::jsa_compress` (C++, CPU) and `sparserec::triton_jsa_compress` (Triton) take
(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks) -> (num_blocks, Hkv, D), where
num_blocks >= Tc_total = cu_cmp[-1] and the rows past Tc_total are zeros; their backward ops take
(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride) -> (dx, dweight, dpe). The Triton ops take
one more input, the batch plan's compression maps (a list of tensors, empty: built by the op).
"""
import torch

from ..reference.jsa import compressed_cu_seqlens


def compress_with(op, x, weight, pe, cu_seqlens, block: int, stride: int, num_blocks=None, plan=None, *plan_maps):
    """Backend entry of `sparserec.ops.jsa_compress` over `op`: (num_blocks or Tc_total, Hkv, D), cu_cmp.
    plan (a `JSAPlan`) gives cu_cmp; plan_maps are the op's extra inputs (the Triton op's maps)."""
    cu_cmp = compressed_cu_seqlens(cu_seqlens, block, stride) if plan is None else plan.cu_cmp
    if num_blocks is None:
        num_blocks = int(cu_cmp[-1])  # the exact row count: a host read (a sync on a GPU)
    return op(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks, *plan_maps), cu_cmp


def register_compress_autograd(op, backward_op):
    """Gradients of x, weight and pe of `op` through `backward_op`."""
    def setup_context(ctx, inputs, output):
        x, weight, pe, cu_seqlens, cu_cmp, block, stride, _, *plan_maps = inputs  # plan_maps: [] or [list]
        ctx.has_plan = bool(plan_maps)
        ctx.save_for_backward(x, weight, pe, cu_seqlens, cu_cmp, *(plan_maps[0] if plan_maps else ()))
        ctx.block, ctx.stride = block, stride

    def backward(ctx, grad):
        x, weight, pe, cu_seqlens, cu_cmp, *maps = ctx.saved_tensors
        grad_x, grad_weight, grad_pe = backward_op(grad.contiguous(), x, weight, pe, cu_seqlens, cu_cmp, ctx.block,
                                                   ctx.stride, *([maps] if ctx.has_plan else []))
        return grad_x, grad_weight, grad_pe, None, None, None, None, None, *([[None] * len(maps)] if ctx.has_plan else [])

    torch.library.register_autograd(op, backward, setup_context=setup_context)
