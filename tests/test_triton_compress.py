"""Triton block compression (triton_kernels/jsa_compress.py) against the reference, fwd and bwd.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1). Outputs are NaN-poisoned before the kernels run.
"""

import pytest
import torch

from jsa_inputs import cu_from_lengths
from sparserec.ops import jsa_compress
from sparserec.reference import jsa_compress as reference_compress
from sparserec.triton_kernels.common import interpreting
from sparserec.triton_kernels.jsa_compress import compress_bwd, compress_fwd, compressed_cu_seqlens
from sparserec.triton_kernels.plan import compress_plan
from tolerance import assert_close_to_reference

DEVICE = "cpu" if interpreting() else "cuda"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("poison_outputs")  # tests/conftest.py


def make(lengths, kv_heads, dim, block, seed=0, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, kv_heads, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(kv_heads, block, dim, dim, generator=gen, dtype=torch.float64) / (block * dim) ** 0.5
    pe = torch.randn(kv_heads, block, dim, generator=gen, dtype=torch.float64) * 0.1
    cu = cu_from_lengths(lengths).to(index_dtype)
    return [t.to(DEVICE) for t in (x, weight, pe, cu)]


def reference(x, weight, pe, cu, block, stride, grad):
    """Reference output and (dx, dweight, dpe) for output gradient `grad`, in x's dtype."""
    x, weight, pe = (t.detach().clone().requires_grad_() for t in (x, weight, pe))
    out, cu_cmp = reference_compress(x, weight, pe, cu, block, stride)
    out.backward(grad.to(out.dtype))
    return out.detach(), cu_cmp, (x.grad, weight.grad, pe.grad)


# (lengths, block, stride, kv_heads, dim): block a multiple of stride or not, stride == block,
# sequences of 1 token and shorter than a block, head dims not a power of two.
CASES = [
    ([1, 7, 16, 37], 8, 4, 2, 16),
    ([40, 13, 2], 5, 2, 2, 32),
    ([20, 1], 4, 4, 1, 24),
    ([9, 30], 6, 6, 1, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths, block, stride, kv_heads, dim", CASES)
def test_compress_matches_reference(lengths, block, stride, kv_heads, dim, dtype):
    x, weight, pe, cu = make(lengths, kv_heads, dim, block)
    cu_cmp = compressed_cu_seqlens(cu, block, stride)
    num_blocks = int(cu_cmp[-1])
    grad = torch.randn(num_blocks, kv_heads, dim, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(DEVICE)
    ref64, ref_cu, ref_grads64 = reference(x, weight, pe, cu, block, stride, grad)
    low = [t.to(dtype) for t in (x, weight, pe)]
    ref_low, _, ref_grads_low = reference(*low, cu, block, stride, grad)
    assert torch.equal(cu_cmp, ref_cu)

    out = compress_fwd(*low, cu, cu_cmp, num_blocks, block, stride)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref_low, ref64, atol=ATOL[dtype], name="k_cmp")
    grads = compress_bwd(grad.to(dtype), *low, cu, cu_cmp, block, stride)
    for name, got, same, exact in zip(("dx", "dweight", "dpe"), grads, ref_grads_low, ref_grads64):
        assert got.dtype == dtype
        assert_close_to_reference(got, same, exact, atol=ATOL[dtype], name=name)


def test_no_full_block_gives_empty_output_and_zero_grads():
    x, weight, pe, cu = make([3, 1, 7], 2, 16, 8)
    cu_cmp = compressed_cu_seqlens(cu, 8, 4)
    assert cu_cmp.tolist() == [0, 0, 0, 0]
    out = compress_fwd(x.float(), weight.float(), pe.float(), cu, cu_cmp, 0, 8, 4)
    assert out.shape == (0, 2, 16)
    dx, dweight, dpe = compress_bwd(out, x.float(), weight.float(), pe.float(), cu, cu_cmp, 8, 4)
    assert not dx.any() and not dweight.any() and not dpe.any()


def test_public_op_with_autograd_and_int32_offsets():
    x, weight, pe, cu = make([1, 7, 25], 2, 16, 8, index_dtype=torch.int32)
    x, weight, pe = (t.float().requires_grad_() for t in (x, weight, pe))
    out, cu_cmp = jsa_compress(x, weight, pe, cu, 8, 4, backend="triton")
    ref, ref_cu = reference_compress(x.double(), weight.double(), pe.double(), cu, 8, 4)
    assert torch.equal(cu_cmp, ref_cu) and cu_cmp.dtype == torch.int32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    x64, w64, pe64 = (t.detach().double().requires_grad_() for t in (x, weight, pe))
    reference_compress(x64, w64, pe64, cu, 8, 4)[0].square().sum().backward()
    for got, want in ((x.grad, x64.grad), (weight.grad, w64.grad), (pe.grad, pe64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_plan", [False, True])
def test_compress_op_passes_opcheck(with_plan):
    """With the batch plan's maps as an input (with_plan), or building its own ([])."""
    import sparserec.ops.triton_backend  # noqa: F401  (registers the op; the dispatcher imports it lazily)

    x, weight, pe, cu = (t.float() if t.is_floating_point() else t for t in make([7, 18], 1, 16, 4))
    cu_cmp = compressed_cu_seqlens(cu, 4, 2)
    num_blocks = x.shape[0] // 2  # the static bound, with padding rows
    weight.requires_grad_()
    plan = list(compress_plan(cu, cu_cmp, num_blocks, 4, 2)) if with_plan else []
    torch.library.opcheck(torch.ops.sparserec.triton_jsa_compress.default,
                          (x, weight, pe, cu, cu_cmp, 4, 2, num_blocks, plan))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_real_size_gpu(dtype):
    lengths, block, stride, kv_heads, dim = [2048, 1000, 4096, 31], 32, 16, 2, 64
    x, weight, pe, cu = make(lengths, kv_heads, dim, block)
    cu_cmp = compressed_cu_seqlens(cu, block, stride)
    num_blocks = int(cu_cmp[-1])
    grad = torch.randn(num_blocks, kv_heads, dim, dtype=torch.float64, device=DEVICE)
    ref64, _, ref_grads64 = reference(x, weight, pe, cu, block, stride, grad)
    low = [t.to(dtype) for t in (x, weight, pe)]
    ref_low, _, ref_grads_low = reference(*low, cu, block, stride, grad)
    assert_close_to_reference(compress_fwd(*low, cu, cu_cmp, num_blocks, block, stride), ref_low, ref64,
                              atol=ATOL[dtype], name="k_cmp")
    grads = compress_bwd(grad.to(dtype), *low, cu, cu_cmp, block, stride)
    for name, got, same, exact in zip(("dx", "dweight", "dpe"), grads, ref_grads_low, ref_grads64):
        assert_close_to_reference(got, same, exact, atol=ATOL[dtype], name=name)

