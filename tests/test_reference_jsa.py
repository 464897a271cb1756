"""The executable spec against a brute-force, loop-per-query construction written from SPEC §1."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jsa_inputs import cu_from_lengths, make_inputs
from sparserec import JSAConfig
from sparserec.reference import jsa_attention, jsa_compress


def brute_force_jsa(inputs, config):
    """Per sequence, per query: explicit visible-key lists for each branch, softmax, gated sum."""
    q, k, v, k_cmp, v_cmp = inputs.q, inputs.k, inputs.v, inputs.k_cmp, inputs.v_cmp
    heads, dim = q.shape[1:]
    group = heads // k.shape[1]
    scale = 1 / math.sqrt(dim)
    out = torch.zeros_like(q)
    cu, cu_cmp = inputs.cu_seqlens.tolist(), inputs.cu_cmp.tolist()
    l, d, lsel, bq = config.block, config.stride, config.select_block, config.select_q_block

    def attend(t_global, h, keys, values):
        if len(keys) == 0:
            return torch.zeros(dim, dtype=q.dtype), None
        scores = torch.stack([q[t_global, h] @ key for key in keys]) * scale
        probs = torch.softmax(scores, 0)
        return sum(p * val for p, val in zip(probs, values)), probs

    for b in range(len(cu) - 1):
        start, length, c0 = cu[b], cu[b + 1] - cu[b], cu_cmp[b]
        num_cmp = cu_cmp[b + 1] - c0
        num_sel = -(-length // lsel)
        # cmp branch, keeping full-row probabilities for the selection
        o_cmp = torch.zeros(length, heads, dim, dtype=q.dtype)
        p_cmp = torch.zeros(length, heads, max(num_cmp, 1), dtype=torch.float64)
        for t in range(length):
            visible = [i for i in range(num_cmp) if not config.causal or i * d + l - 1 <= t]
            for h in range(heads):
                g = h // group
                o, p = attend(start + t, h, [k_cmp[c0 + i, g] for i in visible], [v_cmp[c0 + i, g] for i in visible])
                o_cmp[t, h] = o
                for i, pi in zip(visible, p if p is not None else []):
                    p_cmp[t, h, i] = pi
        # selection per (tile, kv head)
        selected = {}
        for tile in range(-(-length // bq)):
            tokens = range(tile * bq, min((tile + 1) * bq, length))
            last = tokens[-1]
            for g in range(k.shape[1]):
                scored = []
                for j in range(num_sel):
                    if config.causal and j * lsel > last:
                        continue
                    overlap = [i for i in range(num_cmp) if i * d < (j + 1) * lsel and i * d + l > j * lsel]
                    score = sum(float(p_cmp[t, h, i]) for t in tokens for h in range(g * group, (g + 1) * group)
                                for i in overlap)
                    scored.append((-score, j))
                selected[tile, g] = {j for _, j in sorted(scored)[: config.top_n]}
        for t in range(length):
            for h in range(heads):
                g = h // group

                def visible(s):
                    return not config.causal or s <= t

                slc = [s for s in range(length) if s // lsel in selected[t // bq, g] and visible(s)]
                jrn = [s for s in range(length) if bool(inputs.anchor_mask[start + s]) and visible(s)]
                if config.causal:
                    win = [s for s in range(length) if t - config.window < s <= t]
                else:
                    win = [s for s in range(length) if abs(t - s) < config.window]
                gate = inputs.gates[start + t, h]
                total = gate[0] * o_cmp[t, h]
                for gi, keys in ((1, slc), (2, jrn), (3, win)):
                    o, _ = attend(start + t, h, [k[start + s, g] for s in keys], [v[start + s, g] for s in keys])
                    total = total + gate[gi] * o
                out[start + t, h] = total
    return out


configs = st.builds(
    lambda block_mult, stride, sel_mult, top_n, bq, window, causal: JSAConfig(
        block=stride * block_mult, stride=stride, select_block=stride * sel_mult, top_n=top_n,
        select_q_block=bq, window=window, causal=causal),
    block_mult=st.integers(1, 3), stride=st.sampled_from([1, 2, 4]), sel_mult=st.integers(1, 3),
    top_n=st.integers(1, 4), bq=st.sampled_from([1, 3, 4, 8]), window=st.integers(1, 9), causal=st.booleans())


@settings(max_examples=25, deadline=None)
@given(config=configs, lengths=st.lists(st.integers(0, 23), min_size=1, max_size=3),
       heads_kv=st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1)]), seed=st.integers(0, 2**16))
def test_reference_equals_brute_force(config, lengths, heads_kv, seed):
    heads, kv_heads = heads_kv
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=8, seed=seed)
    out = jsa_attention(*inputs.attention_args(), config)
    torch.testing.assert_close(out, brute_force_jsa(inputs, config), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lengths", [[1], [7], [97], [1, 7, 33]])
@pytest.mark.parametrize("causal", [False, True])
def test_awkward_lengths_equal_brute_force(lengths, causal):
    config = JSAConfig(block=8, stride=4, select_block=8, top_n=2, select_q_block=16, window=5, causal=causal)
    inputs = make_inputs(lengths, config, heads=2, kv_heads=1, dim=8, seed=len(lengths))
    torch.testing.assert_close(jsa_attention(*inputs.attention_args(), config), brute_force_jsa(inputs, config),
                               rtol=1e-10, atol=1e-10)


def _sdpa_per_sequence(inputs, causal):
    outs = []
    group = inputs.q.shape[1] // inputs.k.shape[1]
    for start, end in zip(inputs.cu_seqlens[:-1].tolist(), inputs.cu_seqlens[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1) for x in (inputs.q, inputs.k, inputs.v))
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("branch", ["slc", "jrn", "win"])
def test_sanity_identities_equal_full_attention(causal, heads, kv_heads, branch):
    """top_n >= blocks, window >= T, all tokens anchors: each branch is full attention."""
    lengths = [1, 40, 97]
    config = JSAConfig(block=8, stride=4, select_block=16, top_n=100, select_q_block=8, window=200, causal=causal)
    inputs = make_inputs(lengths, config, heads=heads, kv_heads=kv_heads, dim=16, anchor_rate=1.0)
    gates = torch.zeros_like(inputs.gates)
    gates[..., ("cmp", "slc", "jrn", "win").index(branch)] = 1
    inputs.gates = gates
    torch.testing.assert_close(jsa_attention(*inputs.attention_args(), config), _sdpa_per_sequence(inputs, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_jagged_batch_equals_loop_over_sequences(causal):
    config = JSAConfig(block=8, stride=4, select_block=8, top_n=2, select_q_block=8, window=6, causal=causal)
    lengths = [5, 0, 64, 31, 1]
    inputs = make_inputs(lengths, config, heads=4, kv_heads=2)
    batched = jsa_attention(*inputs.attention_args(), config)
    for b, (start, end) in enumerate(zip(inputs.cu_seqlens[:-1].tolist(), inputs.cu_seqlens[1:].tolist())):
        c0, c1 = inputs.cu_cmp[b].item(), inputs.cu_cmp[b + 1].item()
        single = jsa_attention(
            inputs.q[start:end], inputs.k[start:end], inputs.v[start:end], inputs.k_cmp[c0:c1],
            inputs.v_cmp[c0:c1], inputs.gates[start:end], inputs.anchor_mask[start:end],
            cu_from_lengths([end - start]), cu_from_lengths([c1 - c0]), config)
        torch.testing.assert_close(batched[start:end], single, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_wider_values_are_independent_value_streams(causal):
    """v = [v1 | v2] (and v_cmp likewise) pools both streams with the same probabilities."""
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3, causal=causal)
    inputs = make_inputs([13, 1, 30], config, heads=4, kv_heads=2, dim=8, value_dim=11)
    args = list(inputs.attention_args())
    both = jsa_attention(*args, config)
    for columns in (slice(0, 8), slice(8, 11)):
        args[2], args[4] = inputs.v[..., columns], inputs.v_cmp[..., columns]
        torch.testing.assert_close(both[..., columns], jsa_attention(*args, config), rtol=0, atol=1e-13)


def test_empty_anchor_set_gives_zero_jrn_branch():
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=1, select_q_block=4, window=3, causal=True)
    inputs = make_inputs([9, 17], config, anchor_rate=0.0)
    gates = torch.zeros_like(inputs.gates)
    gates[..., 2] = 1
    inputs.gates = gates
    assert not inputs.anchor_mask.any()
    assert torch.equal(jsa_attention(*inputs.attention_args(), config), torch.zeros_like(inputs.q))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_through_compression_and_attention(causal):
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=1, select_q_block=4, window=3, causal=causal)
    inputs = make_inputs([6, 11], config, heads=2, kv_heads=1, dim=4, anchor_rate=0.3)
    leaves = [inputs.q, inputs.k, inputs.v, inputs.weight_k, inputs.pe_k, inputs.weight_v, inputs.pe_v,
              inputs.gates]

    def run(q, k, v, weight_k, pe_k, weight_v, pe_v, gates):
        k_cmp, cu_cmp = jsa_compress(k, weight_k, pe_k, inputs.cu_seqlens, config.block, config.stride)
        v_cmp, _ = jsa_compress(v, weight_v, pe_v, inputs.cu_seqlens, config.block, config.stride)
        return jsa_attention(q, k, v, k_cmp, v_cmp, gates, inputs.anchor_mask, inputs.cu_seqlens, cu_cmp, config)

    # Selection is not differentiated: keep perturbations small enough not to change it.
    assert torch.autograd.gradcheck(run, [x.clone().requires_grad_() for x in leaves], eps=1e-6, atol=1e-6)


def test_linear_compression_positional_embedding_of_keys_gets_zero_gradient():
    """SPEC §1: pe_k shifts every compressed key of a sequence equally; softmax ignores it."""
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=1, select_q_block=4, window=3)
    inputs = make_inputs([13, 20], config)
    pe_k = inputs.pe_k.clone().requires_grad_()
    pe_v = inputs.pe_v.clone().requires_grad_()
    k_cmp, cu_cmp = jsa_compress(inputs.k, inputs.weight_k, pe_k, inputs.cu_seqlens, 4, 2)
    v_cmp, _ = jsa_compress(inputs.v, inputs.weight_v, pe_v, inputs.cu_seqlens, 4, 2)
    out = jsa_attention(inputs.q, inputs.k, inputs.v, k_cmp, v_cmp, inputs.gates, inputs.anchor_mask,
                        inputs.cu_seqlens, cu_cmp, config)
    out.square().sum().backward()
    assert pe_k.grad.abs().max() < 1e-12
    assert pe_v.grad.abs().max() > 1e-3


def test_compress_matches_definition():
    cu = cu_from_lengths([3, 10])
    x = torch.randn(13, 2, 3, dtype=torch.float64)
    weight = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    pe = torch.randn(2, 4, 3, dtype=torch.float64)
    out, cu_cmp = jsa_compress(x, weight, pe, cu, block=4, stride=3)
    assert cu_cmp.tolist() == [0, 0, 3]  # length 3 < block; length 10: blocks at 0, 3, 6
    for i in range(3):
        for h in range(2):
            expected = sum((x[3 + i * 3 + r, h] + pe[h, r]) @ weight[h, r] for r in range(4))
            torch.testing.assert_close(out[i, h], expected)
