"""The whole Triton backend (`backend="triton"`: compress, cmp, selection, fused sparse kernel,
gating, autograd) against `backend="reference"`, forward and backward.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run compiled, plus the real-size ones
marked `gpu`. Every kernel output is NaN-poisoned before the kernels run.

The selection is a discrete choice made from floating-point importance, so the references run
with the kernel's selection injected (after checking it equals the reference's own on these
inputs): the float64 reference would otherwise be free to break near-ties differently.
"""
from dataclasses import replace

import pytest
import torch

import sparserec
from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.ops import jsa_attention, jsa_compress, jsa_plan
from sparserec.ops.dispatch import resolve
from sparserec.reference import jsa_attention as reference_attention
from sparserec.triton_kernels.common import interpreting
from tolerance import assert_close_to_reference

DEVICE = "cpu" if interpreting() else "cuda"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CONFIG = JSAConfig(block=8, stride=4, select_block=16, top_n=2, select_q_block=32, window=12)
# One token, two sequences shorter than a compressed block, and one of 97 tokens.
LENGTHS = [1, 7, 5, 97]
DIFFERENTIABLE = ("q", "k", "v", "k_cmp", "v_cmp", "gates")


pytestmark = pytest.mark.usefixtures("poison_outputs")  # tests/conftest.py


def fixed_selection(selection, cu_seqlens):
    """A select_fn for the reference that hands back `selection`, one sequence per call."""
    bounds = iter([(s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()) if e > s])

    def select(p_cmp, seq_cu, config, num_kv_heads):
        start, end = next(bounds)
        return selection[start:end].long()
    return select


def run(inputs, config, dout, backend, select_fn=None):
    """Output and gradients of every differentiable input for output gradient dout."""
    leaves = {name: getattr(inputs, name).detach().clone().requires_grad_() for name in DIFFERENTIABLE}
    args = [leaves.get(name, getattr(inputs, name)) for name in
            ("q", "k", "v", "k_cmp", "v_cmp", "gates", "anchor_mask", "cu_seqlens", "cu_cmp")]
    if backend == "reference":
        out = reference_attention(*args, config, select_fn=select_fn)
    else:
        out = jsa_attention(*args, config=config, backend=backend)
    out.backward(dout.to(out.dtype))
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def check_against_reference(lengths, config, heads, kv_heads, dtype=torch.float32, anchor_rate=0.2, dim=16,
                            seed=0, value_dim=None):
    from sparserec.ops.triton_backend import attention as triton_attention

    exact = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=dim, anchor_rate=anchor_rate,
                        seed=seed, device=DEVICE, value_dim=value_dim)
    inputs = exact.to(dtype)
    _, selection = triton_attention(*inputs.attention_args(), config=config, return_selection=True)
    _, expected = reference_attention(*inputs.to(torch.float32).attention_args(), config, return_selection=True)
    agreement = (selection.long() == expected).float().mean().item() if expected.numel() else 1.0
    if dtype == torch.float32:
        assert agreement == 1.0, "selection differs from the reference's"
    else:  # low-precision scores may reorder near-tied blocks
        assert agreement > 0.99

    dout = torch.randn(exact.q.shape[:2] + exact.v.shape[2:], generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)
    dout = dout.to(DEVICE)
    out, grads = run(inputs, config, dout, "triton")
    ref_low, grads_low = run(inputs, config, dout, "reference", fixed_selection(selection, inputs.cu_seqlens))
    ref64, grads64 = run(exact, config, dout, "reference", fixed_selection(selection, exact.cu_seqlens))
    assert out.dtype == dtype
    assert_close_to_reference(out, ref_low, ref64, atol=ATOL[dtype], name="out")
    for name in DIFFERENTIABLE:
        assert grads[name].dtype == dtype
        assert_close_to_reference(grads[name], grads_low[name], grads64[name], atol=ATOL[dtype], name=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (2, 2)])
def test_backend_matches_reference(causal, heads, kv_heads):
    check_against_reference(LENGTHS, replace(CONFIG, causal=causal), heads, kv_heads)


@pytest.mark.parametrize("anchor_rate", [0.0, 1.0])
def test_no_anchors_and_all_anchors(anchor_rate):
    check_against_reference([9, 40], replace(CONFIG, causal=True), 2, 1, anchor_rate=anchor_rate)


@pytest.mark.parametrize("causal", [True, False])
def test_value_width_other_than_key_width(causal):
    """v, v_cmp of width Dv != D: a second value stream through the same softmax (issue 11)."""
    check_against_reference([7, 40], replace(CONFIG, causal=causal), 2, 1, dim=16, value_dim=24)


def test_float16_and_odd_config():
    config = JSAConfig(block=6, stride=3, select_block=9, top_n=3, select_q_block=16, window=5, causal=True)
    check_against_reference([3, 50], config, 3, 1, dtype=torch.float16)


def test_compress_then_attend_end_to_end():
    """Gradients reach W and pe through the compressed keys and values."""
    inputs = make_inputs([6, 45], CONFIG, heads=2, kv_heads=1, dim=16, device=DEVICE).to(torch.float32)
    grads = {}
    for backend in ("triton", "reference"):
        weights = [t.detach().clone().requires_grad_() for t in (inputs.weight_k, inputs.pe_k, inputs.weight_v,
                                                                   inputs.pe_v)]
        k_cmp, cu_cmp = jsa_compress(inputs.k, *weights[:2], inputs.cu_seqlens, CONFIG.block, CONFIG.stride,
                                     backend=backend)
        v_cmp, _ = jsa_compress(inputs.v, *weights[2:], inputs.cu_seqlens, CONFIG.block, CONFIG.stride,
                                backend=backend)
        out = jsa_attention(inputs.q, inputs.k, inputs.v, k_cmp, v_cmp, inputs.gates, inputs.anchor_mask,
                            inputs.cu_seqlens, cu_cmp, config=CONFIG, backend=backend)
        out.square().sum().backward()
        grads[backend] = (out.detach(), *[w.grad for w in weights])
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_plan", [False, True])
def test_attention_op_passes_opcheck(with_plan):
    """With the batch plan's maps as an input (with_plan), or building its own ([])."""
    inputs = make_inputs([5, 19], CONFIG, heads=2, kv_heads=1, dim=16, device=DEVICE).to(torch.float32)
    plan = jsa_plan(inputs.cu_seqlens, inputs.anchor_mask, CONFIG, 16, backend="triton")
    args = list(inputs.attention_args())
    for i in (0, 5):  # q and gates
        args[i] = args[i].requires_grad_()
    config_args = (CONFIG.block, CONFIG.stride, CONFIG.select_block, CONFIG.top_n, CONFIG.select_q_block,
                   CONFIG.window, CONFIG.causal)
    torch.library.opcheck(torch.ops.sparserec.triton_jsa_attention.default,
                          (*args, *config_args, True, list(plan.attention) if with_plan else []),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(not interpreting(), reason="interpreter-only limits")
def test_dispatch_under_the_interpreter():
    assert sparserec.backends()["triton"] is None
    assert resolve("auto", torch.device("cpu"), torch.float32).name != "triton"  # too slow to be picked
    inputs = make_inputs([5], CONFIG, heads=2, kv_heads=1, dim=16).to(torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter"):
        jsa_attention(*inputs.attention_args(), config=CONFIG, backend="triton")


# --------------------------------------------------------------------------------------------
# GPU: real sizes in fp16/bf16, torch.compile, CUDA graphs
# --------------------------------------------------------------------------------------------

GRACE = JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(8, 8, 64), (4, 4, 32), (16, 2, 128)])
@pytest.mark.gpu
def test_backend_real_size_gpu(causal, dtype, heads, kv_heads, dim):
    check_against_reference([2048, 777, 1, 1500], replace(GRACE, causal=causal), heads, kv_heads, dtype=dtype,
                            anchor_rate=1 / 16, dim=dim)


def _gpu_inputs(causal=False):
    inputs = make_inputs([512, 1024, 300, 2048], replace(GRACE, causal=causal), heads=8, kv_heads=8, dim=64,
                         anchor_rate=1 / 16, device="cuda")
    return inputs.to(torch.bfloat16)


@pytest.mark.gpu
def test_torch_compile_gpu():
    inputs = _gpu_inputs()
    eager = jsa_attention(*inputs.attention_args(), config=GRACE, backend="triton")

    @torch.compile(fullgraph=True)
    def compiled(*args):
        return jsa_attention(*args, config=GRACE, backend="triton")

    torch.testing.assert_close(compiled(*inputs.attention_args()), eager, atol=0, rtol=0)
    q = inputs.q.detach().clone().requires_grad_()
    args = list(inputs.attention_args())
    args[0] = q
    compiled(*args).float().square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.gpu
def test_cuda_graph_capture_gpu():
    inputs = _gpu_inputs(causal=True)
    config = replace(GRACE, causal=True)
    static = [t.clone() for t in inputs.attention_args()]
    jsa_attention(*static, config=config, backend="triton")  # autotuning happens outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = jsa_attention(*static, config=config, backend="triton")
    fresh = make_inputs([512, 1024, 300, 2048], config, heads=8, kv_heads=8, dim=64, anchor_rate=1 / 16,
                        seed=7, device="cuda").to(torch.bfloat16)
    for buffer, value in zip(static, fresh.attention_args()):
        buffer.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, jsa_attention(*fresh.attention_args(), config=config, backend="triton"),
                               atol=0, rtol=0)
