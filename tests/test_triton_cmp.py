"""Triton compressed attention and top-N selection (triton_kernels/jsa_cmp.py: one fused forward
launch, and the selection alone) against the reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1). Outputs are NaN-poisoned before the kernels run.
"""
from dataclasses import replace
import math

import pytest
import torch

from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.reference.jsa import cmp_mask, masked_attention, select_blocks
from sparserec.triton_kernels.common import interpreting
from sparserec.triton_kernels.jsa_cmp import cmp_attention_select, cmp_select
from sparserec.triton_kernels.jsa_sparse import sparse_attention_bwd, sparse_attention_fwd
from tolerance import assert_close_to_reference

DEVICE = "cpu" if interpreting() else "cuda"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CONFIG = JSAConfig(block=8, stride=4, select_block=8, top_n=2, select_q_block=16, window=8)
# A single token, shorter than a block, exactly a block, several query tiles with a ragged end.
LENGTHS = [1, 7, 8, 37, 97]


pytestmark = pytest.mark.usefixtures("poison_outputs")  # tests/conftest.py


def reference_cmp(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, config):
    """o_cmp (T, H, D), logsumexp (T, H) (+inf where nothing is visible), p_cmp (T, H, C_max)."""
    total, heads, dim = q.shape
    group = heads // k_cmp.shape[1]
    counts = (cu_cmp[1:] - cu_cmp[:-1]).tolist()
    out = torch.zeros_like(q)
    lse = torch.full((total, heads), math.inf, dtype=torch.float64, device=q.device)
    probs = torch.zeros(total, heads, max(counts + [1]), dtype=q.dtype, device=q.device)
    bounds = zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), cu_cmp[:-1].tolist(), counts)
    for start, end, c_start, count in bounds:
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks, vs = (x[c_start:c_start + count].transpose(0, 1).repeat_interleave(group, 0) for x in (k_cmp, v_cmp))
        mask = cmp_mask(torch.arange(end - start, device=q.device), count, config)
        o, p = masked_attention(qs, ks, vs, mask, 1 / math.sqrt(dim))
        scores = ((qs.double() @ ks.double().transpose(-1, -2)) / math.sqrt(dim)).masked_fill(~mask, -math.inf)
        row_lse = torch.logsumexp(scores, -1).transpose(0, 1)
        out = out.index_put((torch.arange(start, end, device=q.device),), o.transpose(0, 1))
        lse[start:end] = torch.where(mask.any(-1)[:, None], row_lse, math.inf)
        probs[start:end, :, :count] = p.transpose(0, 1)
    return out, lse, probs


def cmp_grads(dout, x, o_cmp, lse, config):
    """dq, dk_cmp, dv_cmp and d(g_cmp) of the cmp branch: jsa_sparse's backward with `cmp=`, the
    sparse branches' gates at zero (their terms are then exactly zero) and no block selected."""
    gates = x.gates.clone()
    gates[..., 1:] = 0
    selection = torch.full((x.q.shape[0], x.k.shape[1], config.top_n), -1, dtype=torch.int32, device=x.q.device)
    args = (selection, x.anchor_mask, x.cu_seqlens, config)
    _, lse_sparse, branches = sparse_attention_fwd(x.q, x.k, x.v, gates, *args, store_branches=True)
    dq, _, _, dgates, dk_cmp, dv_cmp = sparse_attention_bwd(dout, x.q, x.k, x.v, gates, *args, branches,
                                                            lse_sparse, cmp=(x.k_cmp, x.v_cmp, x.cu_cmp, o_cmp, lse))
    return dq, dk_cmp, dv_cmp, dgates[..., 0]


def case(lengths, config, heads, kv_heads, dim=16, seed=0, dtype=torch.float64):
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=dim, seed=seed, device=DEVICE)
    return inputs.to(dtype) if dtype != torch.float64 else inputs


HEADS = [(4, 2), (2, 2), (3, 1)]  # GQA, MHA, one kv head for three query heads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
def test_cmp_forward_and_backward(causal, heads, kv_heads):
    config = replace(CONFIG, causal=causal)
    exact = case(LENGTHS, config, heads, kv_heads)
    inputs = exact.to(torch.float32)
    out, lse, _ = cmp_attention_select(inputs.q, inputs.k_cmp, inputs.v_cmp, inputs.cu_seqlens, inputs.cu_cmp,
                                       config)

    def reference_grads(x):
        q, k_cmp, v_cmp, gates = (t.detach().clone().requires_grad_() for t in (x.q, x.k_cmp, x.v_cmp, x.gates))
        o, row_lse, _ = reference_cmp(q, k_cmp, v_cmp, x.cu_seqlens, x.cu_cmp, config)
        (gates[..., :1] * o).backward(dout.to(o.dtype))
        return o.detach(), row_lse, (q.grad, k_cmp.grad, v_cmp.grad, gates.grad[..., 0])

    dout = torch.randn(exact.q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    ref64, lse64, grads64 = reference_grads(exact)
    ref32, _, grads32 = reference_grads(inputs)
    assert_close_to_reference(out, ref32, ref64, atol=ATOL[torch.float32], name="o_cmp")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], atol=1e-5, rtol=1e-5)

    grads = cmp_grads(dout.float(), inputs, out, lse, config)
    for name, got, same, want in zip(("dq", "dk_cmp", "dv_cmp", "dgate"), grads, grads32, grads64):
        assert_close_to_reference(got, same, want, atol=ATOL[torch.float32], name=name)


def test_cmp_float16():
    config = replace(CONFIG, causal=True)
    exact = case([37, 5, 60], config, 2, 1)
    inputs = exact.to(torch.float16)
    out, _, _ = cmp_attention_select(inputs.q, inputs.k_cmp, inputs.v_cmp, inputs.cu_seqlens, inputs.cu_cmp,
                                     config)
    assert out.dtype == torch.float16
    args = (exact.cu_seqlens, exact.cu_cmp, config)
    ref16 = reference_cmp(inputs.q, inputs.k_cmp, inputs.v_cmp, *args)[0]
    ref64 = reference_cmp(exact.q, exact.k_cmp, exact.v_cmp, *args)[0]
    assert_close_to_reference(out, ref16, ref64, atol=ATOL[torch.float16], name="o_cmp fp16")


SELECT_CONFIGS = [
    CONFIG,
    JSAConfig(block=6, stride=3, select_block=9, top_n=3, select_q_block=24, window=8),  # odd sizes
    JSAConfig(block=4, stride=2, select_block=4, top_n=1, select_q_block=8, window=8),  # top-1
    JSAConfig(block=8, stride=4, select_block=16, top_n=16, select_q_block=32, window=8),  # N >= blocks
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("config", SELECT_CONFIGS)
def test_selection_equals_reference(config, causal):
    config = replace(config, causal=causal)
    inputs = case(LENGTHS, config, 4, 2, dtype=torch.float32)
    args = (inputs.cu_seqlens, inputs.cu_cmp, config)
    _, lse, selection = cmp_attention_select(inputs.q, inputs.k_cmp, inputs.v_cmp, *args)
    _, _, probs = reference_cmp(inputs.q, inputs.k_cmp, inputs.v_cmp, *args)
    expected = select_blocks(probs, inputs.cu_seqlens, config, num_kv_heads=2)
    assert selection.shape == expected.shape
    assert torch.equal(selection.long(), expected)
    # The selection alone, from the same lse (the FlexAttention composition's entry).
    assert torch.equal(cmp_select(inputs.q, inputs.k_cmp, lse, *args), selection)


def test_selection_ties_go_to_the_lower_block():
    """Equal compressed keys give every visible block the same probability: exact ties."""
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=3, select_q_block=8, window=8)
    inputs = case([45, 18], config, 2, 1, dtype=torch.float32)
    k_cmp = torch.zeros_like(inputs.k_cmp)
    args = (inputs.cu_seqlens, inputs.cu_cmp, config)
    _, _, selection = cmp_attention_select(inputs.q, k_cmp, inputs.v_cmp, *args)
    _, _, probs = reference_cmp(inputs.q, k_cmp, inputs.v_cmp, *args)
    assert torch.equal(selection.long(), select_blocks(probs, inputs.cu_seqlens, config, num_kv_heads=1))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cmp_real_size_gpu(causal, dtype):
    config = JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64, causal=causal)
    exact = case([2048, 777, 4096, 1], config, 8, 2, dim=64)
    inputs = exact.to(dtype)
    args = (exact.cu_seqlens, exact.cu_cmp, config)
    out, _, selection = cmp_attention_select(inputs.q, inputs.k_cmp, inputs.v_cmp, *args)
    ref_low = reference_cmp(inputs.q, inputs.k_cmp, inputs.v_cmp, *args)[0]
    ref64 = reference_cmp(exact.q, exact.k_cmp, exact.v_cmp, *args)[0]
    assert_close_to_reference(out, ref_low, ref64, atol=ATOL[dtype], name="o_cmp")
    # Against fp64 scores of the same rounded inputs, only blocks tied to within fp32 rounding of
    # their importance may be ordered differently.
    rounded = (inputs.q.double(), inputs.k_cmp.double(), inputs.v_cmp.double())
    expected = select_blocks(reference_cmp(*rounded, *args)[2], exact.cu_seqlens, config, num_kv_heads=2)
    assert (selection.long() == expected).float().mean() > 0.99
