"""The compiled top-N selection (torch.ops.sparserec.jsa_select, C++ and CUDA) against its Python
twin sparserec.reference.jsa.select_blocks: equal results, ties included, on awkward shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jsa_inputs import cu_from_lengths, make_inputs
from sparserec import EXTENSION_ERROR, JSAConfig, has_extension
from sparserec.ops import jsa_attention, jsa_select
from sparserec.reference.jsa import num_compressed_blocks, select_blocks

needs_extension = pytest.mark.skipif(not has_extension(), reason=f"sparserec._C is not built: {EXTENSION_ERROR}")


def random_p_cmp(lengths, config, heads, dtype=torch.float64, dyadic=False, extra_cols=2, seed=0):
    """(T_total, H, C) probabilities; columns past each sequence's block count are NaN (ignored)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [num_compressed_blocks(n, config.block, config.stride) for n in lengths]
    num_cols = max(counts, default=0) + extra_cols
    if dyadic:  # few distinct, exactly representable values: many exact ties
        p = torch.randint(0, 4, (sum(lengths), heads, num_cols), generator=gen).double() / 4
    else:
        p = torch.rand(sum(lengths), heads, num_cols, generator=gen, dtype=torch.float64)
    starts = cu_from_lengths(lengths)[:-1].tolist()
    for start, length, count in zip(starts, lengths, counts):
        p[start:start + length, :, count:] = float("nan")
    return p.to(dtype)


def op_args(p_cmp, cu_seqlens, config, num_kv_heads):
    return (p_cmp, cu_seqlens, config.block, config.stride, config.select_block, config.top_n,
            config.select_q_block, num_kv_heads, config.causal)


configs = st.builds(
    lambda stride, block_mult, sel_mult, top_n, select_q_block, causal: JSAConfig(
        block=stride * block_mult, stride=stride, select_block=stride * sel_mult, top_n=top_n,
        select_q_block=select_q_block, causal=causal),
    stride=st.sampled_from([1, 2, 4, 8]), block_mult=st.integers(1, 4), sel_mult=st.integers(1, 4),
    top_n=st.integers(1, 40), select_q_block=st.sampled_from([1, 3, 8, 16, 64]), causal=st.booleans())
lengths_lists = st.lists(st.one_of(st.sampled_from([0, 1, 7, 97]), st.integers(0, 130)), min_size=1, max_size=4)


@needs_extension
@settings(max_examples=300, deadline=None)
@given(config=configs, lengths=lengths_lists, heads_kv=st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 2), (3, 1)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), dyadic=st.booleans(),
       offsets_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**16))
def test_cpu_op_equals_twin(config, lengths, heads_kv, dtype, dyadic, offsets_dtype, seed):
    heads, kv_heads = heads_kv
    p = random_p_cmp(lengths, config, heads, dtype, dyadic, seed=seed)
    cu = cu_from_lengths(lengths).to(offsets_dtype)
    assert torch.equal(jsa_select(p, cu, config, kv_heads), select_blocks(p, cu, config, kv_heads))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_equals_twin(dtype):
    config = JSAConfig(block=8, stride=4, select_block=8, top_n=3, select_q_block=16, causal=True)
    lengths = [97, 1, 40]
    p = random_p_cmp(lengths, config, heads=4, dtype=dtype, seed=3)
    cu = cu_from_lengths(lengths)
    assert torch.equal(jsa_select(p, cu, config, 2), select_blocks(p, cu, config, 2))


@needs_extension
@pytest.mark.parametrize("causal", [False, True])
def test_all_zero_probabilities_select_the_lowest_eligible_blocks(causal):
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=3, select_q_block=8, causal=causal)
    length = 30  # 8 selection blocks, 4 query tiles
    p = torch.zeros(length, 2, num_compressed_blocks(length, 4, 2))
    out = jsa_select(p, cu_from_lengths([length]), config, 1)
    for t in range(length):
        tile_last = min((t // 8 + 1) * 8, length) - 1
        eligible = tile_last // 4 + 1 if causal else 8
        expected = list(range(min(eligible, 3))) + [-1] * (3 - min(eligible, 3))
        assert out[t, 0].tolist() == expected


@needs_extension
def test_exact_ties_go_to_the_lower_block():
    # block = stride = select_block: selection block j is exactly compressed block j.
    config = JSAConfig(block=2, stride=2, select_block=2, top_n=2, select_q_block=8, causal=False)
    p = torch.tensor([0.5, 0.25, 0.5, 0.25]).expand(8, 1, 4).contiguous()
    cu = cu_from_lengths([8])
    assert jsa_select(p, cu, config, 1)[:, 0].tolist() == [[0, 2]] * 8
    wider = JSAConfig(block=2, stride=2, select_block=2, top_n=3, select_q_block=8, causal=False)
    assert jsa_select(p, cu, wider, 1)[:, 0].tolist() == [[0, 1, 2]] * 8


@needs_extension
def test_empty_batch_and_empty_sequences():
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4)
    p = torch.rand(0, 2, 0)
    assert jsa_select(p, cu_from_lengths([0, 0]), config, 2).shape == (0, 2, 2)
    p = random_p_cmp([0, 5, 0], config, heads=2)
    cu = cu_from_lengths([0, 5, 0])
    assert torch.equal(jsa_select(p, cu, config, 2), select_blocks(p, cu, config, 2))


@needs_extension
def test_opcheck():
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=3, select_q_block=5, causal=True)
    for lengths, dtype in (([7, 0, 33], torch.float32), ([97], torch.float64)):
        p = random_p_cmp(lengths, config, heads=4, dtype=dtype, extra_cols=0)
        torch.library.opcheck(torch.ops.sparserec.jsa_select.default, op_args(p, cu_from_lengths(lengths), config, 2))


@needs_extension
def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = JSAConfig(top_n=5)
    with FakeTensorMode():
        p, cu = torch.empty(123, 6, 9), torch.empty(4, dtype=torch.int64)
        out = torch.ops.sparserec.jsa_select(*op_args(p, cu, config, 3))
    assert out.shape == (123, 3, 5) and out.dtype == torch.int64


@pytest.mark.parametrize("change, error, match", [
    (dict(p_cmp=torch.rand(7, 4)), ValueError, "3 dimensions"),
    (dict(p_cmp=torch.ones(7, 4, 2, dtype=torch.int64)), TypeError, "dtype"),
    (dict(num_kv_heads=3), ValueError, "multiple of num_kv_heads"),
    (dict(num_kv_heads=0), ValueError, "positive int"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 7])), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "packed tokens"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0])), TypeError, "dtype"),
    (dict(p_cmp=torch.rand(7, 4, 1)), ValueError, "compressed blocks"),
    (dict(config="block=4"), TypeError, "JSAConfig"),
])
def test_wrapper_rejects_bad_input(change, error, match):
    args = dict(p_cmp=torch.rand(7, 4, 2), cu_seqlens=torch.tensor([0, 7]),
                config=JSAConfig(block=4, stride=2, select_block=4), num_kv_heads=2)
    args.update(change)
    with pytest.raises(error, match=match):
        jsa_select(**args)


@needs_extension
@pytest.mark.parametrize("change, match", [
    (dict(p_cmp=torch.rand(7, 4, 1)), "compressed blocks"),
    (dict(p_cmp=torch.ones(7, 4, 2, dtype=torch.int64)), "float32"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 7])), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([1, 7])), r"cu_seqlens\[0\]"),
    (dict(cu_seqlens=torch.tensor([0, 6])), "packed tokens"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(top_n=0), ">= 1"),
    (dict(p_cmp=torch.full((7, 4, 2), float("nan"))), "non-finite"),
])
def test_compiled_op_rejects_bad_input(change, match):
    args = dict(p_cmp=torch.rand(7, 4, 2), cu_seqlens=torch.tensor([0, 7]), block=4, stride=2, select_block=4,
                top_n=2, select_q_block=4, num_kv_heads=2, causal=False)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparserec.jsa_select(*args.values())


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_op_equals_cpu_op(dtype, causal):
    for seed, (lengths, stride, top_n, select_q_block, dyadic, heads, kv_heads) in enumerate([
        ([1, 7, 97, 0], 2, 3, 8, False, 6, 2),
        ([0, 130, 5, 64, 1], 4, 40, 3, True, 4, 4),
        ([2000, 1, 513], 16, 16, 64, False, 6, 2),
        ([7, 3] * 150, 1, 2, 2, True, 2, 1),  # more sequences than threads in the offsets scan
        ([7000], 1, 7, 128, True, 2, 1),  # 6999 columns: more shared memory than the 48 KiB default
    ]):
        config = JSAConfig(block=2 * stride, stride=stride, select_block=2 * stride, top_n=top_n,
                           select_q_block=select_q_block, causal=causal)
        p = random_p_cmp(lengths, config, heads, dtype=dtype, dyadic=dyadic, seed=seed)
        cu = cu_from_lengths(lengths)
        cpu = jsa_select(p, cu, config, kv_heads)
        cuda = jsa_select(p.cuda(), cu.cuda(), config, kv_heads)
        assert torch.equal(cuda.cpu(), cpu), (lengths, stride, top_n)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backend_attention_equals_reference(causal):
    config = JSAConfig(block=8, stride=4, select_block=8, top_n=2, select_q_block=16, window=8, causal=causal)
    inputs = make_inputs([1, 97, 0, 40], config, heads=4, kv_heads=2, seed=5, device="cuda")
    out = jsa_attention(*inputs.attention_args(), config=config, backend="cuda")
    ref = jsa_attention(*inputs.attention_args(), config=config, backend="reference")
    assert torch.equal(out, ref)
