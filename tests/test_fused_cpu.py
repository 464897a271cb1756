"""The fused C++ CPU kernels (the `cpp` backend) against the reference: sparserec.ops.fused_cpu."""
import pytest
import torch
from torch.library import opcheck

from jsa_inputs import make_inputs
from sparserec import JSAConfig, reference
from sparserec._ext import has_extension
from tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not has_extension(), reason="sparserec._C not built")
if has_extension():
    from sparserec.ops import fused_cpu

SMALL = dict(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3)
GRACE = dict(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64)
GRAD_INPUTS = ("q", "k", "v", "k_cmp", "v_cmp", "gates")


def _grads(attention, inputs, config, grad_out):
    args = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs.attention_args()]
    out = attention(*args, config=config)
    grads = torch.autograd.grad(out, args[:6], grad_out)
    return out.detach(), dict(zip(GRAD_INPUTS, grads))


CASES = [
    # (lengths, heads, kv_heads, dim, config, anchor_rate)
    ([5, 12], 4, 2, 8, SMALL, 0.2),
    ([1], 2, 2, 8, SMALL, 0.2),
    ([7, 0, 3], 4, 1, 8, SMALL, 0.3),           # a sequence shorter than a block, an empty one, MQA
    ([97, 33], 6, 2, 16, SMALL, 0.0),           # no anchors at all
    ([64, 40], 2, 2, 8, SMALL, 1.0),            # every token an anchor
    ([1025], 2, 1, 8, dict(SMALL, select_q_block=64, window=17, top_n=3, select_block=8), 0.06),
    ([300, 130], 4, 2, 16, GRACE, 1 / 16),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths,heads,kv_heads,dim,config,anchor_rate", CASES)
def test_fp64_equals_reference_forward_and_backward(poison_outputs, lengths, heads, kv_heads, dim, config,
                                                    anchor_rate, causal):
    config = JSAConfig(**config, causal=causal)
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=dim, anchor_rate=anchor_rate, seed=3)
    grad_out = torch.randn(inputs.q.shape, generator=torch.Generator().manual_seed(1), dtype=inputs.q.dtype)
    ref_out, ref_grads = _grads(reference.jsa_attention, inputs, config, grad_out)
    out, grads = _grads(fused_cpu.attention, inputs, config, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for name in GRAD_INPUTS:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-11, msg=name)
    _, ref_selection = reference.jsa_attention(*inputs.attention_args(), config, return_selection=True)
    _, selection = fused_cpu.attention(*inputs.attention_args(), config, return_selection=True)
    assert torch.equal(selection, ref_selection)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths,heads,kv_heads,dim,value_dim", [([5, 12, 1], 4, 2, 8, 11), ([97, 40], 2, 1, 16, 5)])
def test_fp64_value_width_other_than_key_width(poison_outputs, lengths, heads, kv_heads, dim, value_dim, causal):
    config = JSAConfig(**SMALL, causal=causal)
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=dim, value_dim=value_dim, seed=4)
    grad_out = torch.randn(inputs.q.shape[:2] + (value_dim,), generator=torch.Generator().manual_seed(2),
                           dtype=inputs.q.dtype)
    ref_out, ref_grads = _grads(reference.jsa_attention, inputs, config, grad_out)
    out, grads = _grads(fused_cpu.attention, inputs, config, grad_out)
    assert out.shape == (sum(lengths), heads, value_dim)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for name in GRAD_INPUTS:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-11, msg=name)


def _reference_with_selection(selection, cu_seqlens):
    """The reference attention with a given selection (its select_fn is called once per non-empty sequence)."""
    def attention(*args, config):
        spans = iter([(s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()) if e > s])
        return reference.jsa_attention(*args, config, select_fn=lambda *_: selection[slice(*next(spans))])
    return attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("logit_scale", [1.0, 40.0])  # 40: branch maxima far apart (the own-shift path)
def test_fp32_within_twice_the_fp32_reference_error(poison_outputs, causal, logit_scale):
    config = JSAConfig(**GRACE, causal=causal)
    inputs = make_inputs([200, 97, 1], config, heads=4, kv_heads=2, dim=32, anchor_rate=1 / 16, seed=5)
    inputs.q = inputs.q * logit_scale
    inputs32 = inputs.to(torch.float32)
    grad_out = torch.randn(inputs.q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # All three runs use the kernel's fp32 selection: rounding may flip a near tie, which changes the
    # output by design; the selection itself is checked against the reference in fp64 above.
    out, grads = _grads(fused_cpu.attention, inputs32, config, grad_out.float())
    _, selection = fused_cpu.attention(*inputs32.attention_args(), config, return_selection=True)
    fixed = _reference_with_selection(selection, inputs.cu_seqlens)
    ref64, ref64_grads = _grads(fixed, inputs, config, grad_out)
    ref32, ref32_grads = _grads(fixed, inputs32, config, grad_out.float())
    # The backward recomputes P from the saved log-sum-exp (as FlashAttention does), whose rounding
    # grows with |logits|: at logits ~100 the gradients get up to ~4x the reference's error (over six
    # seeds: 0.9-4.2x; at ordinary logits 0.5-2.3x, within 2x once atol absorbs the smallest ones).
    factor = 2.0 if logit_scale == 1.0 else 5.0
    assert_close_to_reference(out, ref32, ref64, factor=factor, atol=1e-6)
    for name in GRAD_INPUTS:
        assert_close_to_reference(grads[name], ref32_grads[name], ref64_grads[name], factor=factor, atol=1e-5,
                                  name=name)


def test_results_do_not_depend_on_the_thread_count():
    config = JSAConfig(**GRACE)
    inputs = make_inputs([700, 300, 5], config, heads=4, kv_heads=2, dim=32, anchor_rate=1 / 16,
                         dtype=torch.float32, seed=7)
    grad_out = torch.randn_like(inputs.q)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_grads(fused_cpu.attention, inputs, config, grad_out))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    for name in GRAD_INPUTS:
        assert torch.equal(grads1[name], grads2[name]), name


def test_gradcheck_fp64():
    config = JSAConfig(**SMALL, causal=True)
    inputs = make_inputs([9, 6], config, heads=2, kv_heads=1, dim=4, anchor_rate=0.3, seed=11)
    args = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs.attention_args()]
    assert torch.autograd.gradcheck(lambda *a: fused_cpu.attention(*a, config=config), args, eps=1e-6, atol=1e-6)


# Many short sequences share the kernel's pieces (<= 64 blocks, crossing sequence boundaries); 1,025
# tokens is 511 blocks in 8 pieces of one sequence; block 5 / stride 3 leaves a partial stride.
@pytest.mark.parametrize("lengths", [[5, 12], [1, 0, 40], [3], [1025], [(7 * i) % 23 for i in range(70)]])
@pytest.mark.parametrize("block, stride", [(4, 2), (5, 3)])
def test_compress_equals_reference_forward_and_backward(poison_outputs, lengths, block, stride):
    config = JSAConfig(**SMALL)
    inputs = make_inputs(lengths, config, heads=4, kv_heads=2, dim=8, seed=2)
    x = inputs.k.detach().clone().requires_grad_()
    weight = (torch.randn(2, block, 8, 8, dtype=x.dtype) / (block * 8) ** 0.5).requires_grad_()
    pe = (0.1 * torch.randn(2, block, 8, dtype=x.dtype)).requires_grad_()
    leaves = [x, weight, pe]
    expected, cu_expected = reference.jsa_compress(*leaves, inputs.cu_seqlens, block, stride)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    out, cu_cmp = fused_cpu.compress(*leaves, inputs.cu_seqlens, block, stride)
    grads = torch.autograd.grad(out, leaves, grad)
    assert torch.equal(cu_cmp, cu_expected)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for name, a, b in zip(("x", "weight", "pe"), grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


def test_opcheck_every_op():
    config = JSAConfig(**SMALL)
    inputs = make_inputs([5, 12], config, heads=4, kv_heads=2, dim=8)
    cfg = (config.block, config.stride, config.select_block, config.top_n, config.select_q_block, config.window,
           config.causal)
    args = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs.attention_args()]
    opcheck(torch.ops.sparserec.jsa_attention, (*args, *cfg))
    out, lse, selection = torch.ops.sparserec.jsa_attention(*inputs.attention_args(), *cfg)
    opcheck(torch.ops.sparserec.jsa_attention_backward,
            (torch.randn_like(out), *inputs.attention_args(), lse, selection, *cfg))
    leaves = [t.detach().clone().requires_grad_() for t in (inputs.k, inputs.weight_k, inputs.pe_k)]
    num_blocks = int(inputs.cu_cmp[-1])
    opcheck(torch.ops.sparserec.jsa_compress, (*leaves, inputs.cu_seqlens, inputs.cu_cmp, 4, 2, num_blocks))
    opcheck(torch.ops.sparserec.jsa_compress_backward,
            (torch.randn(num_blocks, 2, 8, dtype=torch.float64), inputs.k, inputs.weight_k, inputs.pe_k,
             inputs.cu_seqlens, inputs.cu_cmp, 4, 2))


def test_raw_ops_reject_inconsistent_inputs():
    config = JSAConfig(**SMALL)
    inputs = make_inputs([5, 12], config, heads=4, kv_heads=2, dim=8)
    cfg = (4, 2, 4, 2, 4, 3, False)
    args = list(inputs.attention_args())
    bad_cu_cmp = inputs.cu_cmp.clone()
    bad_cu_cmp[1] += 1
    with pytest.raises(RuntimeError, match="compressed blocks"):
        torch.ops.sparserec.jsa_attention(*args[:8], bad_cu_cmp, *cfg)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.sparserec.jsa_attention(*[a.half() if a.is_floating_point() else a for a in args], *cfg)
    out, lse, selection = torch.ops.sparserec.jsa_attention(*args, *cfg)
    with pytest.raises(RuntimeError, match="selection holds block"):
        torch.ops.sparserec.jsa_attention_backward(out, *args, lse, torch.full_like(selection, 99), *cfg)
    with pytest.raises(RuntimeError, match="cu_cmp\\[-1\\]"):
        torch.ops.sparserec.jsa_compress(inputs.k, inputs.weight_k, inputs.pe_k, inputs.cu_seqlens, inputs.cu_cmp,
                                         4, 2, int(inputs.cu_cmp[-1]) - 1)  # fewer rows than blocks
