"""Public ops: dispatch, and a clear ValueError/TypeError for every kind of bad input."""
import pytest
import torch

import sparserec
from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.ops import jsa_attention, jsa_compress
from sparserec.reference import jsa_attention as reference_attention

CONFIG = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3)


@pytest.fixture
def inputs():
    return make_inputs([5, 12], CONFIG, heads=4, kv_heads=2, dim=8)


def test_ops_equal_reference(inputs):
    out = jsa_attention(*inputs.attention_args(), config=CONFIG, backend="reference")
    torch.testing.assert_close(out, reference_attention(*inputs.attention_args(), CONFIG), rtol=0, atol=0)
    k_cmp, cu_cmp = jsa_compress(inputs.k, inputs.weight_k, inputs.pe_k, inputs.cu_seqlens, 4, 2)
    torch.testing.assert_close(k_cmp, inputs.k_cmp)
    assert torch.equal(cu_cmp, inputs.cu_cmp)


def test_backends_report_reasons():
    status = sparserec.backends()
    assert status["reference"] is None
    for name, reason in status.items():
        assert reason is None or isinstance(reason, str) and reason


def test_auto_picks_a_cpu_backend(inputs):
    out = jsa_attention(*inputs.attention_args(), config=CONFIG)
    torch.testing.assert_close(out, reference_attention(*inputs.attention_args(), CONFIG))


def test_explicit_backend_that_cannot_serve_names_why(inputs):
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        jsa_attention(*inputs.attention_args(), config=CONFIG, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        jsa_attention(*inputs.attention_args(), config=CONFIG, backend="fastest")


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


Q, K, V, KC, VC, GATES, ANCHORS, CU, CU_CMP = range(9)
BAD_ATTENTION_INPUTS = [
    ("q 2-D", lambda a: _replace(a, Q, a[Q][:, 0]), ValueError, "q must have 3 dimensions"),
    ("q int", lambda a: _replace(a, Q, a[Q].long()), TypeError, "q must have dtype"),
    ("q list", lambda a: _replace(a, Q, a[Q].tolist()), TypeError, "q must be a torch.Tensor"),
    ("k tokens", lambda a: _replace(a, K, a[K][:-1]), ValueError, r"k must have shape \(T_total=17"),
    ("heads not multiple", lambda a: _replace(a, Q, a[Q][:, :3]), ValueError, "multiple of kv heads"),
    ("k_cmp dim", lambda a: _replace(a, KC, a[KC][..., :4]), ValueError, "k_cmp must have shape"),
    ("v_cmp dim", lambda a: _replace(a, VC, a[VC][..., :4]), ValueError, r"v_cmp \(Tc_total, Hkv=2, Dv=8\)"),
    ("dtype mix", lambda a: _replace(a, V, a[V].float()), TypeError, "share a dtype"),
    ("gates shape", lambda a: _replace(a, GATES, a[GATES][..., :3]), ValueError, r"gates must have shape"),
    ("gates above 1", lambda a: _replace(a, GATES, a[GATES] + 1), ValueError, r"gates must lie in \[0, 1\]"),
    ("gates nan", lambda a: _replace(a, GATES, a[GATES] * float("nan")), ValueError, r"gates hold NaN"),
    ("anchor dtype", lambda a: _replace(a, ANCHORS, a[ANCHORS].long()), TypeError, "anchor_mask must have dtype"),
    ("anchor length", lambda a: _replace(a, ANCHORS, a[ANCHORS][:-1]), ValueError, "anchor_mask must have one"),
    ("cu float", lambda a: _replace(a, CU, a[CU].float()), TypeError, "cu_seqlens must have dtype"),
    ("cu not from 0", lambda a: _replace(a, CU, a[CU] + 1), ValueError, r"cu_seqlens\[0\] must be 0"),
    ("cu decreasing", lambda a: _replace(a, CU, torch.tensor([0, 12, 5, 17])), ValueError, "non-decreasing"),
    ("cu overflow", lambda a: _replace(a, CU, torch.tensor([0, 5, 18])), ValueError, "must equal the number"),
    ("cu too short", lambda a: _replace(a, CU, torch.tensor([0])), ValueError, "at least 2 offsets"),
    ("cu_cmp count", lambda a: _replace(a, CU_CMP, torch.tensor([0, 2, a[CU_CMP][-1].item()])), ValueError,
     "compressed blocks"),
    ("cu_cmp batch", lambda a: _replace(a, CU_CMP, a[CU_CMP][[0, -1]]), ValueError,
     "same 2 sequences"),
]


@pytest.mark.parametrize("name,corrupt,error,match", BAD_ATTENTION_INPUTS, ids=[b[0] for b in BAD_ATTENTION_INPUTS])
def test_bad_attention_input_raises_clear_error(inputs, name, corrupt, error, match):
    with pytest.raises(error, match=match):
        jsa_attention(*corrupt(inputs.attention_args()), config=CONFIG)


def test_bad_config_raises_clear_error(inputs):
    with pytest.raises(TypeError, match="config must be a sparserec.JSAConfig"):
        jsa_attention(*inputs.attention_args(), config={"block": 4})
    with pytest.raises(ValueError, match="must be a multiple of stride"):
        JSAConfig(block=4, stride=4, select_block=6)
    with pytest.raises(ValueError, match="must not exceed block"):
        JSAConfig(block=4, stride=8, select_block=8)
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        JSAConfig(top_n=0)
    with pytest.raises(TypeError, match="window must be an int"):
        JSAConfig(window=2.5)
    with pytest.raises(TypeError, match="causal must be a bool"):
        JSAConfig(causal=1)


BAD_COMPRESS_INPUTS = [
    ("weight shape", lambda x, w, pe: (x, w[:, :3], pe), ValueError, "weight must have shape"),
    ("pe shape", lambda x, w, pe: (x, w, pe[..., :2]), ValueError, "pe must have shape"),
    ("x 2-D", lambda x, w, pe: (x[:, 0], w, pe), ValueError, "k must have 3 dimensions"),
    ("dtype mix", lambda x, w, pe: (x, w.float(), pe), TypeError, "share a dtype"),
]


@pytest.mark.parametrize("name,corrupt,error,match", BAD_COMPRESS_INPUTS, ids=[b[0] for b in BAD_COMPRESS_INPUTS])
def test_bad_compress_input_raises_clear_error(inputs, name, corrupt, error, match):
    x, w, pe = corrupt(inputs.k, inputs.weight_k, inputs.pe_k)
    with pytest.raises(error, match=match):
        jsa_compress(x, w, pe, inputs.cu_seqlens, 4, 2)


def test_compress_rejects_bad_block_arguments(inputs):
    with pytest.raises(ValueError, match="stride .* must not exceed block"):
        jsa_compress(inputs.k, inputs.weight_k, inputs.pe_k, inputs.cu_seqlens, 4, 5)
    with pytest.raises(ValueError, match="block must be a positive int"):
        jsa_compress(inputs.k, inputs.weight_k, inputs.pe_k, inputs.cu_seqlens, 0, 1)
