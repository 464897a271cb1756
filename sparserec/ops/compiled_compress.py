"""What the compiled compression ops share: their backend entry and their autograd.

Both `sparserec::jsa_compress` (C++, CPU) and `sparserec::triton_jsa_compress` (Triton) take
(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks) -> (num_blocks, Hkv, D), where
num_blocks >= Tc_total = cu_cmp[-1] and the rows past Tc_total are zeros; their backward ops take
(grad, x, weight, pe, cu_seqlens, cu_cmp, block, stride) -> (dx, dweight, dpe).
"""
import torch

from ..reference.jsa import compressed_cu_seqlens


def compress_with(op, x, weight, pe, cu_seqlens, block: int, stride: int, num_blocks=None):
    """Backend entry of `sparserec.ops.jsa_compress` over `op`: (num_blocks or Tc_total, Hkv, D), cu_cmp."""
    cu_cmp = compressed_cu_seqlens(cu_seqlens, block, stride)
    if num_blocks is None:
        num_blocks = int(cu_cmp[-1])  # the exact row count: a host read (a sync on a GPU)
    return op(x, weight, pe, cu_seqlens, cu_cmp, block, stride, num_blocks), cu_cmp


def register_compress_autograd(op, backward_op):
    """Gradients of x, weight and pe of `op` through `backward_op`."""
    def setup_context(ctx, inputs, output):
        x, weight, pe, cu_seqlens, cu_cmp, block, stride, _ = inputs
        ctx.save_for_backward(x, weight, pe, cu_seqlens, cu_cmp)
        ctx.block, ctx.stride = block, stride

    def backward(ctx, grad):
        x, weight, pe, cu_seqlens, cu_cmp = ctx.saved_tensors
        grad_x, grad_weight, grad_pe = backward_op(grad.contiguous(), x, weight, pe, cu_seqlens, cu_cmp, ctx.block,
                                                   ctx.stride)
        return grad_x, grad_weight, grad_pe, None, None, None, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)
