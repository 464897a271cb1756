"""The FlexAttention composition of JSA (benchmarks/flex_jsa.py) against the reference.

The benchmark times it as a baseline, so it must compute the same thing. On CPU, flex_attention
runs forward only (eager, unfused: it evaluates every mask_mod on the dense grid and ignores block
sparsity), so the block masks are checked separately: every block holding a visible pair is
listed, and every block listed as full is entirely visible (the compiled kernels skip mask_mod
there). The gradient check needs CUDA.
"""
from dataclasses import replace
import os
import sys
from pathlib import Path
import warnings

import pytest
import torch

from torch.nn.attention.flex_attention import create_mask

from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.reference import jsa_attention
from tolerance import assert_close_to_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # flex_jsa is benchmark code
from flex_jsa import FlexBatch, flex_jsa_attention

# Eager flex_attention warns on every call that it is unfused; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CONFIG = JSAConfig(block=8, stride=4, select_block=16, top_n=2, select_q_block=32, window=12)
# A single token, shorter than a block, several tiles with ragged ends; sequences start off the
# flex block grid, so masks must keep queries inside their own sequence.
LENGTHS = [1, 7, 97, 40, 130]
FLEX_BLOCK = 16  # small flex blocks: many of them, and sequences straddling them


def flex_and_reference(config, heads=4, kv_heads=2, lengths=LENGTHS, anchor_rate=0.2, dtype=torch.float64):
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=16, anchor_rate=anchor_rate)
    batch = FlexBatch.build(inputs.cu_seqlens, inputs.anchor_mask, config, block_size=FLEX_BLOCK)
    x = inputs.to(dtype)
    out = flex_jsa_attention(x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gates, batch)
    ref, selection = jsa_attention(*inputs.attention_args(), config, return_selection=True)
    return out, ref, selection, inputs, batch


@pytest.mark.parametrize("causal, heads, kv_heads", [(False, 4, 2), (True, 4, 2), (True, 2, 2)])
def test_flex_composition_equals_reference(causal, heads, kv_heads):
    out, ref, _, _, _ = flex_and_reference(replace(CONFIG, causal=causal), heads, kv_heads)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_no_anchors_and_no_compressed_block(causal):
    config = replace(CONFIG, causal=causal)
    out, ref, _, _, batch = flex_and_reference(config, lengths=[5, 3], anchor_rate=0.0)
    assert batch.cmp_mask is None and batch.jrn_mask is None
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_batch_compression_equals_reference():
    inputs = make_inputs(LENGTHS, CONFIG, heads=4, kv_heads=2, dim=16)
    batch = FlexBatch.build(inputs.cu_seqlens, inputs.anchor_mask, CONFIG, block_size=FLEX_BLOCK)
    torch.testing.assert_close(batch.compress(inputs.k, inputs.weight_k, inputs.pe_k), inputs.k_cmp, rtol=0, atol=0)


def blocks_of(counts, indices, num_kv_blocks):
    """(H, q blocks, kv blocks) bool from a BlockMask's ordered (count, index) pair."""
    cols = torch.arange(indices.shape[-1])
    listed = cols < counts[..., None].long()
    dense = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(listed, indices.long(), num_kv_blocks), True)
    return dense[0, ..., :num_kv_blocks]


def check_block_mask(mask, heads):
    """Listed blocks cover every visible pair; full blocks are entirely visible."""
    q_len, kv_len = mask.seq_lengths
    size_q, size_kv = mask.BLOCK_SIZE
    exact = create_mask(mask.mask_mod, 1, heads, q_len, kv_len, device="cpu")[0]
    pad_q, pad_kv = (-q_len) % size_q, (-kv_len) % size_kv
    grid = torch.nn.functional.pad(exact, (0, pad_kv, 0, pad_q)).view(
        heads, -1, size_q, (kv_len + pad_kv) // size_kv, size_kv)
    num_kv_blocks = grid.shape[3]
    partial = blocks_of(mask.kv_num_blocks, mask.kv_indices, num_kv_blocks).expand(heads, -1, -1)
    full = torch.zeros_like(partial)
    if mask.full_kv_num_blocks is not None:
        full = blocks_of(mask.full_kv_num_blocks, mask.full_kv_indices, num_kv_blocks).expand(heads, -1, -1)
    assert not (partial & full).any()
    any_visible = grid.any(4).any(2)
    assert not (any_visible & ~(partial | full)).any(), "a block with visible pairs is missing"
    # Full: every real (query, key) pair of the block visible; padding rows/columns are ignored.
    real = torch.nn.functional.pad(torch.ones(q_len, kv_len, dtype=torch.bool), (0, pad_kv, 0, pad_q)).view(
        1, -1, size_q, num_kv_blocks, size_kv)
    all_visible = (grid | ~real).all(4).all(2)
    assert not (full & ~all_visible).any(), "a block listed as full has masked pairs"
    return int(partial.sum() + full.sum()), any_visible.numel()


@pytest.mark.parametrize("causal", [False, True])
def test_block_masks_cover_the_mask_and_full_blocks_are_full(causal):
    config = replace(CONFIG, causal=causal)
    heads = 4
    inputs = make_inputs(LENGTHS, config, heads=heads, kv_heads=2, dim=16)
    batch = FlexBatch.build(inputs.cu_seqlens, inputs.anchor_mask, config, block_size=FLEX_BLOCK)
    _, selection = jsa_attention(*inputs.attention_args(), config, return_selection=True)
    for name, mask in [("cmp", batch.cmp_mask), ("jrn", batch.jrn_mask), ("win", batch.win_mask),
                       ("slc", batch.slc_mask(selection, heads))]:
        listed, total = check_block_mask(mask, heads)
        if name in ("win", "slc"):  # sparse: far fewer blocks than the dense grid
            assert listed < total // 2, f"{name}: {listed} of {total} blocks listed"


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton selection kernel needs CUDA or TRITON_INTERPRET=1")
def test_triton_selection_drop_in():
    """The benchmark passes the Triton selection kernel as `select`; on CPU it runs interpreted."""
    from sparserec.triton_kernels.jsa_cmp import cmp_select

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = replace(CONFIG, causal=True)
    inputs = make_inputs(LENGTHS, config, heads=4, kv_heads=2, dim=16, device=device)
    batch = FlexBatch.build(inputs.cu_seqlens, inputs.anchor_mask, config, block_size=FLEX_BLOCK)
    x = inputs.to(torch.float32)
    out = flex_jsa_attention(x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gates, batch, select=cmp_select)
    ref = jsa_attention(*inputs.attention_args(), config)
    ref32 = jsa_attention(*x.attention_args(), config)
    assert_close_to_reference(out, ref32, ref, atol=1e-5)


@pytest.mark.gpu  # FlexAttention's backward needs CUDA
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_flex_gradients_gpu(causal):
    from torch.nn.attention.flex_attention import flex_attention

    from sparserec.triton_kernels.jsa_cmp import cmp_select

    config = JSAConfig(causal=causal)
    inputs = make_inputs([700, 1500, 300, 2048], config, heads=4, kv_heads=2, dim=64, anchor_rate=1 / 16,
                         device="cuda")
    batch = FlexBatch.build(inputs.cu_seqlens, inputs.anchor_mask, config)
    attend = torch.compile(flex_attention, dynamic=False)
    rest = (inputs.anchor_mask, inputs.cu_seqlens, inputs.cu_cmp)
    _, selection = jsa_attention(*inputs.attention_args(), config, return_selection=True)

    def reference_selection(*unused):  # near-ties may pick differently in fp32; the glue is tested above
        return selection

    def grads(x, fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gates)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    x = inputs.to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = grads(x, lambda *t: flex_jsa_attention(*t, batch, select=reference_selection, attend=attend))
    exact = grads(inputs, lambda *t: jsa_attention(*t, *rest, config))
    same_dtype = grads(x, lambda *t: jsa_attention(*t, *rest, config))
    for name, got, ref32, ref in zip(["out", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates"], flex, same_dtype, exact):
        assert_close_to_reference(got, ref32, ref, factor=3.0, atol=1e-4, name=name)
