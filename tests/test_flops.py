"""jsa_flops against pairs counted from the reference's own visibility masks."""
import pytest
import torch

from jsa_inputs import make_inputs
from sparserec import JSAConfig
from sparserec.flops import jsa_flops
from sparserec.reference import jsa_attention
from sparserec.reference.jsa import cmp_mask, token_masks


def pairs_from_reference_masks(inputs, config, selection):
    heads = inputs.q.shape[1]
    group = heads // inputs.k.shape[1]
    counts = dict.fromkeys(("cmp", "slc", "jrn", "win"), 0)
    cu, cu_cmp = inputs.cu_seqlens.tolist(), inputs.cu_cmp.tolist()
    for b in range(len(cu) - 1):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        queries = torch.arange(end - start)
        slc, jrn, win = token_masks(end - start, queries, config, inputs.anchor_mask[start:end], selection[start:end])
        counts["cmp"] += heads * int(cmp_mask(queries, cu_cmp[b + 1] - cu_cmp[b], config).sum())
        counts["slc"] += group * int(slc.sum())
        counts["jrn"] += heads * int(jrn.sum())
        counts["win"] += heads * int(win.sum())
    return counts


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[1], [7, 0, 97], [33, 64, 65]])
def test_exact_flops_equal_pairs_in_reference_masks(causal, lengths):
    config = JSAConfig(block=8, stride=4, select_block=8, top_n=3, select_q_block=16, window=5, causal=causal)
    inputs = make_inputs(lengths, config, heads=4, kv_heads=2, dim=16)
    _, selection = jsa_attention(*inputs.attention_args(), config, return_selection=True)
    flops = jsa_flops(lengths, config, heads=4, head_dim=16, kv_heads=2, anchor_mask=inputs.anchor_mask,
                      selection=selection)
    pairs = pairs_from_reference_masks(inputs, config, selection)
    assert flops.branches == {name: 4 * 16 * count for name, count in pairs.items()}
    assert flops.slc_exact
    upper = jsa_flops(lengths, config, heads=4, head_dim=16, kv_heads=2, anchor_mask=inputs.anchor_mask)
    assert not upper.slc_exact
    assert upper.branches["slc"] >= flops.branches["slc"]
    assert {k: v for k, v in upper.branches.items() if k != "slc"} == \
           {k: v for k, v in flops.branches.items() if k != "slc"}


def test_dense_and_compression_formulas():
    config = JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64)
    flops = jsa_flops([512], config, heads=8, head_dim=64)
    assert flops.dense == 4 * 64 * 8 * 512 * 512
    causal = jsa_flops([512], JSAConfig(causal=True), heads=8, head_dim=64)
    assert causal.dense == 4 * 64 * 8 * 512 * 513 // 2
    num_blocks = (512 - 32) // 16 + 1
    assert flops.compress == 2 * 8 * num_blocks * 2 * 32 * 64 * 64
    assert flops.useful == sum(flops.branches.values()) + flops.compress
    assert flops.savings == flops.dense / flops.useful
    # Values 16 wider than the keys: each pair's P·V and the V compression grow, the scores do not.
    wide = jsa_flops([512], config, heads=8, head_dim=64, value_dim=80)
    assert wide.dense == (2 * 64 + 2 * 80) * 8 * 512 * 512
    assert wide.compress == 8 * num_blocks * 2 * 32 * (64 * 64 + 80 * 80)
    for branch, count in flops.branches.items():
        assert wide.branches[branch] == count // (4 * 64) * (2 * 64 + 2 * 80)


def test_upper_bound_is_reached_by_some_selection():
    """With top_n >= blocks the bound is exact: every block is selected."""
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=100, select_q_block=4, window=2, causal=True)
    inputs = make_inputs([30], config, heads=2, kv_heads=2, dim=8)
    _, selection = jsa_attention(*inputs.attention_args(), config, return_selection=True)
    exact = jsa_flops([30], config, 2, 8, anchor_mask=inputs.anchor_mask, selection=selection)
    upper = jsa_flops([30], config, 2, 8, anchor_mask=inputs.anchor_mask)
    assert exact.branches == upper.branches


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        jsa_flops([4], JSAConfig(), heads=3, head_dim=8, kv_heads=2)
    with pytest.raises(ValueError, match="non-negative"):
        jsa_flops([-1], JSAConfig(), heads=2, head_dim=8)
    with pytest.raises(ValueError, match="anchor_mask must have one row per token"):
        jsa_flops([4, 5], JSAConfig(), heads=2, head_dim=8, anchor_mask=torch.zeros(8, dtype=torch.bool))
