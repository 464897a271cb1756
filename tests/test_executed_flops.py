"""triton_executed_flops against the tile products the Triton kernels really run.

Under TRITON_INTERPRET=1 every tl.dot goes through the interpreter's builder, so counting there
measures what the kernels execute (padding included); the counter must equal it, forward and
backward, and never be below the useful FLOPs.
"""
import os

import pytest
import torch

from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.flops import jsa_flops, triton_executed_flops

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts tl.dot calls in Triton's interpreter")


@pytest.fixture
def dot_flops(monkeypatch):
    """Running total of 2*m*n*k over the tl.dot calls the interpreter executes."""
    from triton.runtime import interpreter

    total = [0]
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *rest):
        total[0] += 2 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        return create_dot(self, a, b, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    return total


# A query tile of 16 rows overlaps two selection tiles of 24; an empty sequence; odd head dims.
# The key-major kernels take smaller tiles than the query-major walk (their launch_geometry):
# fewer keys at head dim 40 with 64-token selection blocks, fewer query rows at head dim 72.
@pytest.mark.parametrize("causal, heads, kv_heads, dim, select_block, select_q_block",
                         [(True, 4, 2, 16, 16, 32), (False, 3, 1, 24, 16, 24), (False, 2, 2, 40, 64, 32),
                          (True, 2, 1, 72, 16, 64)])
def test_counter_equals_executed_tile_products(dot_flops, causal, heads, kv_heads, dim, select_block,
                                               select_q_block):
    from sparserec.ops import triton_backend

    config = JSAConfig(block=8, stride=4, select_block=select_block, top_n=2, select_q_block=select_q_block,
                       window=12, causal=causal)
    lengths = [1, 7, 97, 0, 40]
    x = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=dim).to(torch.float32)
    q, k, v, w_k, w_v, pe_k, pe_v, gates = (t.clone().requires_grad_() for t in (
        x.q, x.k, x.v, x.weight_k, x.weight_v, x.pe_k, x.pe_v, x.gates))
    k_cmp, cu_cmp = triton_backend.compress(k, w_k, pe_k, x.cu_seqlens, config.block, config.stride)
    v_cmp, _ = triton_backend.compress(v, w_v, pe_v, x.cu_seqlens, config.block, config.stride)
    out, selection = triton_backend.attention(q, k, v, k_cmp, v_cmp, gates, x.anchor_mask, x.cu_seqlens, cu_cmp,
                                              config, return_selection=True)
    forward = dot_flops[0]
    out.sum().backward()
    backward = dot_flops[0] - forward

    counted = triton_executed_flops(lengths, config, heads, dim, kv_heads, x.anchor_mask, selection)
    assert (counted.forward_total, counted.backward_total) == (forward, backward)
    useful = jsa_flops(lengths, config, heads, dim, kv_heads, x.anchor_mask, selection.long())
    assert counted.forward["sparse"] >= sum(useful.branches[b] for b in ("slc", "jrn", "win"))
    assert counted.forward["cmp"] >= useful.branches["cmp"]
    assert counted.forward["compress"] >= useful.compress
