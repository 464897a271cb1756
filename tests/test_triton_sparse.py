"""The fused slc + jrn + win Triton kernel (triton_kernels/jsa_sparse.py) against the reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run compiled on the GPU, plus the
real-size ones marked `gpu`. The oracle is the reference's own masks (`token_masks`) and
attention (`masked_attention`) with the selection the reference picked; it is checked against
`jsa_attention` itself with the cmp gate at zero. Outputs are NaN-poisoned before the kernels
run, so a row left unwritten fails.
"""
import math
from dataclasses import replace

import pytest
import torch

from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.reference import jsa_attention
from sparserec.reference.jsa import masked_attention, token_masks
from sparserec.triton_kernels import jsa_sparse
from sparserec.triton_kernels.common import interpreting
from tolerance import assert_close_to_reference

DEVICE = "cpu" if interpreting() else "cuda"
# Where the same-dtype reference is nearly exact (fp32 vs fp64), summation order alone differs.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

CONFIG = JSAConfig(block=8, stride=4, select_block=16, top_n=2, select_q_block=32, window=12)
# Lengths: a single token, shorter than a selection block, several query tiles and a ragged end.
LENGTHS = [1, 7, 97, 13]


pytestmark = pytest.mark.usefixtures("poison_outputs")  # tests/conftest.py


def sparse_reference(q, k, v, gates, selection, anchor_mask, cu_seqlens, config):
    """g_slc*o_slc + g_jrn*o_jrn + g_win*o_win (T, H, D) and the branch lse (3, H, T)."""
    total, heads, dim = q.shape
    group = heads // k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    outs, lses = [], []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        length = end - start
        if length == 0:
            continue
        queries = torch.arange(length, device=q.device)
        slc, jrn, win = token_masks(length, queries, config, anchor_mask[start:end], selection[start:end])
        masks = (slc.repeat_interleave(group, 0), jrn, win)

        def heads_first(x):
            return x[start:end].transpose(0, 1).repeat_interleave(heads // x.shape[1], 0)

        qs, ks, vs = heads_first(q), heads_first(k), heads_first(v)
        gate = gates[start:end].permute(1, 0, 2)
        out = 0
        for branch, mask in enumerate(masks):
            out = out + gate[..., 1 + branch:2 + branch] * masked_attention(qs, ks, vs, mask, scale)[0]
            scores = ((qs @ ks.transpose(-1, -2)) * scale).masked_fill(~mask.expand(heads, -1, -1), -math.inf)
            lses.append((branch, start, end, torch.logsumexp(scores.double(), -1).detach()))
        outs.append(out.transpose(0, 1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.empty(3, heads, total, dtype=torch.float64, device=q.device)
    for branch, start, end, value in lses:
        lse[branch, :, start:end] = value
    return out, lse


def case(lengths, config, heads=4, kv_heads=2, dim=16, anchor_rate=0.2, seed=0):
    """fp64 inputs on DEVICE with the cmp gate zeroed, and the selection the reference makes."""
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=dim,
                         anchor_rate=anchor_rate, seed=seed, device=DEVICE)
    inputs.gates[..., 0] = 0
    _, selection = jsa_attention(*inputs.attention_args(), config, return_selection=True)
    return inputs, selection


def check(inputs, selection, config, dtype=torch.float32, block_m=None, block_n=None):
    """Forward (out, lse) and backward (dq, dk, dv, d gates) against the reference."""
    leaves64 = [t.detach().clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v, inputs.gates)]
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    rest = (selection, inputs.anchor_mask, inputs.cu_seqlens, config)
    ref64, lse64 = sparse_reference(*leaves64, *rest)
    ref, _ = sparse_reference(*leaves, *rest)
    q, k, v, gates = (t.detach() for t in leaves)
    out, lse, branches = jsa_sparse.sparse_attention_fwd(
        q, k, v, gates, selection, inputs.anchor_mask, inputs.cu_seqlens, config,
        store_branches=True, block_m=block_m, block_n=block_n)
    atol = ATOL[dtype]
    assert out.dtype == dtype
    assert_close_to_reference(out, ref, ref64, atol=atol, name="out")
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), seen), "lse: +inf exactly where a branch sees no key"
    assert (lse[~seen] == math.inf).all()
    lse_atol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[seen].double(), lse64[seen], rtol=0, atol=lse_atol)

    generator = torch.Generator().manual_seed(1)
    dout64 = torch.randn(out.shape, dtype=torch.float64, generator=generator).to(DEVICE)
    grads64 = torch.autograd.grad(ref64, leaves64, dout64)
    grads = torch.autograd.grad(ref, leaves, dout64.to(dtype))
    dq, dk, dv, dgates, _, _ = jsa_sparse.sparse_attention_bwd(
        dout64.to(dtype), q, k, v, gates, selection, inputs.anchor_mask, inputs.cu_seqlens, config,
        branches, lse, block_m=block_m, block_n=block_n)
    for name, got, same, exact in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, grads64):
        assert_close_to_reference(got, same, exact, atol=atol, name=name)
    assert_close_to_reference(dgates, grads[3][..., 1:], grads64[3][..., 1:], atol=atol, name="dgates")


def sink_selection(lengths, config, kv_heads):
    """Every selection tile picks block 0 (an attention sink) and the last block it may see."""
    rows = []
    for n in lengths:
        for t in range(n):
            last = min((t // config.select_q_block + 1) * config.select_q_block, n) - 1
            other = (last if config.causal else n - 1) // config.select_block
            picks = [0, other] if other else [0, -1]
            rows.append(picks + [-1] * (config.top_n - 2))
    return torch.tensor(rows, device=DEVICE)[:, None, :].expand(-1, kv_heads, -1).contiguous()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_a_heavily_selected_block_is_split_across_programs(causal, monkeypatch):
    """With one selecting tile per program, every tile past a block's first is an overflow slice
    whose partial dk, dv the block's own program adds; block 0, picked by every tile, has many."""
    monkeypatch.setattr(jsa_sparse, "SLC_TILES", 1)
    config = replace(CONFIG, causal=causal)
    lengths = [200, 7, 61]
    inputs, _ = case(lengths, config)
    check(inputs, sink_selection(lengths, config, kv_heads=2), config)


def test_oracle_is_the_reference_with_cmp_gate_zero():
    config = replace(CONFIG, causal=True)
    inputs, selection = case(LENGTHS, config)
    full = jsa_attention(*inputs.attention_args(), config)
    mine, _ = sparse_reference(inputs.q, inputs.k, inputs.v, inputs.gates, selection,
                               inputs.anchor_mask, inputs.cu_seqlens, config)
    torch.testing.assert_close(mine, full, rtol=0, atol=1e-12)


# Groups of 2 and of 3 heads: a group is packed into a tile's rows, padded to a power of two.
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (6, 2)], ids=["mha", "gqa", "gqa3"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_forward_backward(causal, heads, kv_heads):
    config = replace(CONFIG, causal=causal)
    inputs, selection = case(LENGTHS, config, heads=heads, kv_heads=kv_heads)
    check(inputs, selection, config)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_query_tile_spans_selection_tiles(causal):
    """select_q_block below the query tile: one tile walks several selections (masked by row);
    select_block not a multiple of the key chunk; an empty sequence in the batch; an int32
    selection (what the Triton selection kernel emits)."""
    config = JSAConfig(block=8, stride=4, select_block=24, top_n=2, select_q_block=8, window=5,
                       causal=causal)
    inputs, selection = case([33, 0, 50], config, heads=2, kv_heads=1)
    check(inputs, selection.int(), config, block_m=32, block_n=16)


@pytest.mark.parametrize("anchor_rate", [0.0, 1.0], ids=["no-anchors", "all-anchors"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_anchor_extremes(causal, anchor_rate):
    config = replace(CONFIG, causal=causal)
    inputs, selection = case([1, 40, 9], config, heads=2, kv_heads=2, anchor_rate=anchor_rate)
    check(inputs, selection, config)


@pytest.mark.parametrize("window,top_n", [(1, 1), (200, 8)], ids=["self-only", "full"])
def test_window_and_selection_extremes(window, top_n):
    """Window 1 with one block; a window past every sequence with every block selected (both
    branches then equal full attention)."""
    config = JSAConfig(block=8, stride=4, select_block=16, top_n=top_n, select_q_block=16,
                       window=window, causal=True)
    inputs, selection = case([45, 5], config, heads=2, kv_heads=1, dim=32)
    check(inputs, selection, config)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float16(causal):
    config = replace(CONFIG, causal=causal)
    inputs, selection = case([3, 61], config, heads=4, kv_heads=2)
    check(inputs, selection, config, dtype=torch.float16)


def test_strided_inputs():
    """q, k, v as views into one packed qkv tensor and gates as a slice: any strides work."""
    config = replace(CONFIG, causal=True)
    inputs, selection = case([45, 20], config, heads=2, kv_heads=1)
    q, k, v, gates = (t.float() for t in (inputs.q, inputs.k, inputs.v, inputs.gates))
    qkv = torch.cat([q, k, v], dim=1)
    gates_wide = torch.cat([gates, torch.rand_like(gates)], dim=-1)
    args = (selection, inputs.anchor_mask, inputs.cu_seqlens, config)
    out, lse, branches = jsa_sparse.sparse_attention_fwd(qkv[:, :2], qkv[:, 2:3], qkv[:, 3:],
                                                         gates_wide[..., :4], *args, store_branches=True)
    expected, lse_c, branches_c = jsa_sparse.sparse_attention_fwd(q, k, v, gates, *args, store_branches=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dout = torch.randn_like(q).transpose(0, 1).contiguous().transpose(0, 1)
    strided = jsa_sparse.sparse_attention_bwd(dout, qkv[:, :2], qkv[:, 2:3], qkv[:, 3:],
                                              gates_wide[..., :4], *args, branches, lse)
    dense = jsa_sparse.sparse_attention_bwd(dout.contiguous(), q, k, v, gates, *args, branches_c, lse_c)
    for got, want in zip(strided, dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forward_without_branches_and_empty_batch():
    config = CONFIG
    inputs, selection = case([20], config, heads=2, kv_heads=2)
    q, k, v, gates = (t.float() for t in (inputs.q, inputs.k, inputs.v, inputs.gates))
    args = (selection, inputs.anchor_mask, inputs.cu_seqlens, config)
    out, _, branches = jsa_sparse.sparse_attention_fwd(q, k, v, gates, *args)
    assert branches is None
    stored, _, _ = jsa_sparse.sparse_attention_fwd(q, k, v, gates, *args, store_branches=True)
    torch.testing.assert_close(out, stored, rtol=0, atol=0)
    empty = [t[:0] for t in (q, k, v, gates, selection, inputs.anchor_mask)]
    cu = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out, lse, _ = jsa_sparse.sparse_attention_fwd(*empty, cu, config)
    assert out.shape == (0, 2, 16) and lse.shape == (3, 2, 0)


# ---------------------------------------------------------------------------------------------
# GPU: real sizes, half precisions, CUDA-graph capture
# ---------------------------------------------------------------------------------------------

GRACE = JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 8, 64), (4, 4, 32), (16, 2, 128)],
                         ids=["8x64", "4x32", "gqa16/2x128"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gpu_real_sizes(causal, heads, kv_heads, dim, dtype):
    config = replace(GRACE, causal=causal)
    inputs, selection = case([1, 97, 1025, 2048, 512], config, heads=heads, kv_heads=kv_heads,
                             dim=dim, anchor_rate=1 / 16)
    check(inputs, selection, config, dtype=dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    config = replace(GRACE, causal=True)
    inputs, selection = case([300, 1025, 64], config, heads=8, kv_heads=2, dim=64, anchor_rate=1 / 16)
    q, k, v, gates = (t.to(torch.bfloat16) for t in (inputs.q, inputs.k, inputs.v, inputs.gates))
    dout = torch.randn_like(q)
    args = (selection, inputs.anchor_mask, inputs.cu_seqlens, config)

    def step():
        out, lse, branches = jsa_sparse.sparse_attention_fwd(q, k, v, gates, *args, store_branches=True)
        return (out, *jsa_sparse.sparse_attention_bwd(dout, q, k, v, gates, *args, branches, lse))

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
