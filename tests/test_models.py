"""GRACE and SASRec: shapes, learning, KV-cache decoding, beam reordering, ablations; the catalogue loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from sparserec import JSAConfig
from sparserec.generate import Trie, beam_search
from sparserec.models import (GRACE, GRACEConfig, SASRec, SASRecConfig, linear_cross_entropy, recommend, sequence_loss,
                              shift_right)
from tolerance import assert_close_to_reference

VOCAB = 24
JSA = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3)


def tiny_grace(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    values = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, dropout=0.0, jsa=JSA,
                  jsa_backend="reference", encoder_layers=1, decoder_layers=2, max_positions=64,
                  max_target_positions=8)
    return GRACE(GRACEConfig(**{**values, **overrides})).to(dtype).eval()


def random_histories(lengths, generator=None):
    """Packed histories of random non-special tokens: tokens, cu_seqlens, anchor_mask (~1 in 4)."""
    lengths = torch.as_tensor(lengths)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(cu_seqlens[-1])
    tokens = torch.randint(3, VOCAB, (total,), generator=generator)
    return tokens, cu_seqlens, torch.rand(total, generator=generator) < 0.25


@pytest.mark.parametrize("attention", ["jsa", "dense"])
def test_forward_shapes(attention):
    model = tiny_grace(attention=attention)
    tokens, cu_seqlens, anchors = random_histories([11, 1, 17])
    memory = model.encode(tokens, cu_seqlens, anchors)
    assert memory.states.shape == (3, 17, 32) and memory.valid.sum(1).tolist() == [11, 1, 17]
    logits = model(tokens, cu_seqlens, anchors, torch.randint(3, VOCAB, (3, 5)))
    assert logits.shape == (3, 5, VOCAB) and logits.isfinite().all()


def test_jsa_and_dense_differ_and_dense_ignores_anchors():
    tokens, cu_seqlens, anchors = random_histories([11, 7])
    decoder_input = torch.randint(3, VOCAB, (2, 4))
    jsa, dense = tiny_grace(attention="jsa"), tiny_grace(attention="dense")
    assert not torch.allclose(jsa(tokens, cu_seqlens, anchors, decoder_input),
                              dense(tokens, cu_seqlens, anchors, decoder_input))
    torch.testing.assert_close(dense(tokens, cu_seqlens, anchors, decoder_input),
                               dense(tokens, cu_seqlens, ~anchors, decoder_input))


def test_disabled_branches_change_outputs_and_keep_parameters():
    tokens, cu_seqlens, anchors = random_histories([13, 9])
    decoder_input = torch.randint(3, VOCAB, (2, 4))
    full = tiny_grace()
    ablated = tiny_grace(disabled_branches=("jrn",))
    ablated.load_state_dict(full.state_dict())  # same parameter names: checkpoints load across ablations
    assert not torch.allclose(full(tokens, cu_seqlens, anchors, decoder_input),
                              ablated(tokens, cu_seqlens, anchors, decoder_input))


def test_only_anchor_branch_without_anchors_mixes_no_tokens():
    """With cmp, slc and win off and no anchors, the encoder attention outputs 0: a token's state
    depends on itself alone."""
    model = tiny_grace(disabled_branches=("cmp", "slc", "win"))
    tokens, cu_seqlens, _ = random_histories([10])
    no_anchors = torch.zeros_like(tokens, dtype=torch.bool)
    changed = tokens.clone()
    changed[0] = 3 if tokens[0] != 3 else 4
    before = model.encode(tokens, cu_seqlens, no_anchors).states
    after = model.encode(changed, cu_seqlens, no_anchors).states
    torch.testing.assert_close(before[:, 1:], after[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_incremental_decoding_equals_teacher_forcing():
    model = tiny_grace()
    tokens, cu_seqlens, anchors = random_histories([12, 5, 9])
    decoder_input = torch.randint(3, VOCAB, (3, 6))
    full = model(tokens, cu_seqlens, anchors, decoder_input)
    cache = model.new_cache(model.encode(tokens, cu_seqlens, anchors))
    first_two = model.decode(decoder_input[:, :2], cache)  # a multi-token prefix, then one at a time
    steps = [model.decode_step(decoder_input[:, t], cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat([first_two, torch.stack(steps, dim=1)], dim=1), full)


def test_last_only_decoding_equals_full_decoding():
    """last_only skips the last layer's work for all but the last position; its state and the cache it
    leaves (the next token's logits) must match decoding every position."""
    model = tiny_grace()
    tokens, cu_seqlens, anchors = random_histories([12, 5, 9])
    memory = model.encode(tokens, cu_seqlens, anchors)
    prefix, after = torch.randint(3, VOCAB, (3, 4)), torch.randint(3, VOCAB, (3,))
    full_cache, last_cache = model.new_cache(memory), model.new_cache(memory)
    full = model.decoder_states(prefix, full_cache)
    last = model.decoder_states(prefix, last_cache, last_only=True)
    assert last.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(model.decode_step(after, last_cache), model.decode_step(after, full_cache))


def test_reorder_cache_follows_parent_rows():
    model = tiny_grace()
    batch, beams = 2, 3
    tokens, cu_seqlens, anchors = random_histories([9, 14])
    memory = model.encode(tokens, cu_seqlens, anchors)
    history = torch.randint(3, VOCAB, (batch * beams, 3))
    cache = model.new_cache(memory, beams)
    model.decode(history, cache)
    parent_rows = torch.tensor([2, 2, 0, 4, 3, 3])  # rows of the same request
    cache.reorder(parent_rows)
    next_tokens = torch.randint(3, VOCAB, (batch * beams,))
    incremental = model.decode_step(next_tokens, cache)

    reordered = torch.cat([history[parent_rows], next_tokens[:, None]], dim=1)
    fresh = model.decode(reordered, model.new_cache(memory, beams))[:, -1]
    torch.testing.assert_close(incremental, fresh)


def test_beam_search_with_every_item_equals_exhaustive_scoring():
    model = tiny_grace()
    generator = torch.Generator().manual_seed(3)
    paths = torch.unique(torch.randint(3, 7, (12, 3), generator=generator), dim=0)
    trie = Trie(paths)
    tokens, cu_seqlens, anchors = random_histories([10, 6], generator)
    items, scores = recommend(model, trie, tokens, cu_seqlens, anchors, beam_size=len(paths))

    num_items = len(paths)
    all_paths = paths.repeat(2, 1)  # every item for each of the 2 requests
    histories = (tokens, cu_seqlens, anchors)
    memory = model.encode(*histories)
    repeated = type(memory)(memory.states.repeat_interleave(num_items, 0), memory.valid.repeat_interleave(num_items, 0))
    logits = model.decode(shift_right(all_paths, 1), model.new_cache(repeated))
    exhaustive = logits.log_softmax(-1).gather(2, all_paths[:, :, None]).sum((1, 2)).view(2, num_items)
    expected = exhaustive.sort(dim=1, descending=True)
    torch.testing.assert_close(scores, expected.values.float())
    assert torch.equal(items, expected.indices)


def test_start_tokens_are_fed_before_generation():
    model = tiny_grace()
    tokens, cu_seqlens, anchors = random_histories([8])
    behavior = torch.tensor([[5]])
    step_fn = model.make_step_fn(model.encode(tokens, cu_seqlens, anchors), beam_size=2, start_tokens=behavior)
    log_probs = step_fn(None, None)
    expected = model(tokens, cu_seqlens, anchors, torch.tensor([[1, 5]]))[:, -1].float().log_softmax(-1)
    torch.testing.assert_close(log_probs, expected.expand(2, -1))
    step_fn = model.make_step_fn(model.encode(tokens, cu_seqlens, anchors), beam_size=2, start_tokens=behavior)
    items, _ = beam_search(step_fn, Trie(torch.tensor([[3, 4], [4, 3]])), 1, 2)
    assert sorted(items[0].tolist()) == [0, 1]


def test_copy_task_loss_decreases():
    """Teacher forcing learns to copy each history's last three tokens in a few dozen steps."""
    model = tiny_grace(dtype=torch.float32, decoder_layers=1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        tokens, cu_seqlens, anchors = random_histories(torch.randint(4, 7, (16,), generator=generator), generator)
        targets = torch.stack([tokens[end - 3:end] for end in cu_seqlens[1:].tolist()])
        loss = sequence_loss(model(tokens, cu_seqlens, anchors, shift_right(targets, 1)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_config_checks_and_round_trip():
    config = GRACEConfig(vocab_size=VOCAB, disabled_branches=["slc"], jsa=JSA)
    assert GRACEConfig.from_dict(config.to_dict()) == config and config.num_kv_heads == config.num_heads
    with pytest.raises(ValueError, match="attention must be one of"):
        GRACEConfig(vocab_size=VOCAB, attention="flash")
    with pytest.raises(ValueError, match="bidirectional"):
        GRACEConfig(vocab_size=VOCAB, jsa=JSAConfig(causal=True))
    with pytest.raises(ValueError, match="disabled_branches must be among"):
        GRACEConfig(vocab_size=VOCAB, disabled_branches=("window",))
    with pytest.raises(ValueError, match="attention='jsa' only"):
        GRACEConfig(vocab_size=VOCAB, attention="dense", disabled_branches=("win",))
    model = tiny_grace()
    tokens, cu_seqlens, anchors = random_histories([3, 0])
    with pytest.raises(ValueError, match="history lengths"):
        model.encode(tokens, cu_seqlens, anchors)
    tokens, cu_seqlens, anchors = random_histories([3])
    with pytest.raises(ValueError, match="max_target_positions"):
        model(tokens, cu_seqlens, anchors, torch.ones(1, 9, dtype=torch.long))


def tiny_sasrec(seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(num_items=30, d_model=16, num_heads=2, dropout=0.0, max_length=10)
    return SASRec(SASRecConfig(**{**values, **overrides})).eval()


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_sasrec_scores_and_loss(head):
    model = tiny_sasrec(head=head)
    pad = model.pad_id
    histories = torch.tensor([[3, 7, 9, pad, pad], [1, 2, 3, 4, 5]])
    logits = model(histories)
    assert logits.shape == (2, 5, 30)
    # Right padding never reaches a real position, and scores are read at the last real one.
    torch.testing.assert_close(logits[0, :3], model(histories[:1, :3])[0])
    torch.testing.assert_close(model.score(histories), torch.stack([logits[0, 2], logits[1, 4]]))

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    next_items = torch.tensor([[7, 9, 11, pad, pad], [2, 3, 4, 5, 6]])
    losses = []
    for _ in range(30):
        loss = model(histories, next_items)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_sasrec_starts_near_uniform(head):
    """N(0, 0.02) init: starting logits are near 0, so the first loss is ln(num_items) (N(0, 1)
    embeddings with a tied head started at several times that)."""
    num_items = 5000
    model = tiny_sasrec(num_items=num_items, d_model=64, max_length=20, head=head)
    inputs = torch.randint(0, num_items, (8, 20), generator=torch.Generator().manual_seed(1))
    next_items = torch.randint(0, num_items, (8, 20), generator=torch.Generator().manual_seed(2))
    assert model(inputs).std() < 0.5
    assert abs(model(inputs, next_items).item() - math.log(num_items)) < 0.05
    assert model.item_embedding.weight[model.pad_id].abs().max() == 0  # padding embeds to zero


def test_sasrec_loss_counts_real_positions_only():
    model = tiny_sasrec()
    pad = model.pad_id
    inputs = torch.tensor([[3, 7, 9, pad, pad], [1, 2, 3, 4, 5]])
    next_items = torch.tensor([[7, 9, 11, pad, pad], [2, 3, 4, 5, pad]])
    real = next_items != pad
    by_hand = torch.nn.functional.cross_entropy(model(inputs)[real], next_items[real])
    torch.testing.assert_close(model(inputs, next_items), by_hand)
    # What sits at padded positions (inputs there, or more padding columns) changes nothing.
    garbage = inputs.clone()
    garbage[0, 3:] = torch.tensor([5, 6])
    torch.testing.assert_close(model(garbage, next_items), by_hand)
    wider = torch.cat([inputs, torch.full((2, 3), pad)], dim=1)
    torch.testing.assert_close(model(wider, torch.cat([next_items, torch.full((2, 3), pad)], dim=1)), by_hand)
    # score() equals the full logits' row at each history's last real position.
    torch.testing.assert_close(model.score(wider), torch.stack([model(inputs)[0, 2], model(inputs)[1, 4]]))


def test_sasrec_rejects_bad_input():
    model = tiny_sasrec()
    with pytest.raises(ValueError, match="max_length"):
        model(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one item"):
        model.score(torch.full((1, 3), model.pad_id))
    with pytest.raises(ValueError, match="head must be one of"):
        SASRecConfig(num_items=3, head="shared")


def test_packed_dense_attention_equals_padded_masked_sdpa():
    from sparserec.models.layers import PackedDenseSelfAttention, pad_packed

    torch.manual_seed(0)
    layer = PackedDenseSelfAttention(16, num_heads=4, num_kv_heads=2).eval()
    cu_seqlens = torch.tensor([0, 1, 8, 8 + 97])
    x = torch.randn(105, 16, dtype=torch.float64)
    layer.double()
    padded, valid = pad_packed(x, cu_seqlens)
    expected = layer.attention(padded, *layer.attention.keys_values(padded), attn_mask=valid[:, None, None, :])[valid]
    torch.testing.assert_close(layer(x, cu_seqlens), expected)


def linear_ce_and_grads(loss_fn, x, weight, targets, upstream=2.5):
    """The loss and the gradients of upstream * loss for copies of x and weight."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(x, weight, targets)
    (upstream * loss).backward()
    return loss.detach(), x.grad, weight.grad


def two_op_cross_entropy(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight).to(torch.promote_types(x.dtype, torch.float32)), targets)


@pytest.mark.parametrize("rows", [1, 7, 97, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_against_the_two_op_reference(rows, dtype):
    """Loss, dx and dW against F.cross_entropy(F.linear(...)) in float64, within the tolerance rule of
    the same reference in `dtype`, at blocks of one row, of a few rows (a partial last block) and
    all rows at once."""
    generator = torch.Generator().manual_seed(rows)
    vocab, width = 301, 16
    x = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    exact = linear_ce_and_grads(two_op_cross_entropy, x, weight, targets)
    same_dtype = linear_ce_and_grads(two_op_cross_entropy, x.to(dtype), weight.to(dtype), targets)
    for block_elements in (1, 3 * vocab, 1 << 20):
        fused = linear_ce_and_grads(lambda *a: linear_cross_entropy(*a, block_elements=block_elements),
                                    x.to(dtype), weight.to(dtype), targets)
        for name, out, ref, ref64 in zip(("loss", "dx", "dW"), fused, same_dtype, exact):
            assert out.dtype == (torch.float32 if name == "loss" else dtype)
            assert_close_to_reference(out, ref, ref64, atol=1e-6, name=f"{name}, {block_elements} logits a block")


def test_linear_cross_entropy_gradcheck_and_no_grad():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=generator)
    assert torch.autograd.gradcheck(lambda x, w: linear_cross_entropy(x, w, targets, block_elements=18), (x, weight))
    with torch.no_grad():  # the loss alone
        torch.testing.assert_close(linear_cross_entropy(x, weight, targets), two_op_cross_entropy(x, weight, targets))
    frozen = linear_ce_and_grads(lambda x, w, t: linear_cross_entropy(x, w.detach(), t), x.detach(), weight.detach(),
                                 targets)
    torch.testing.assert_close(frozen[1], linear_ce_and_grads(two_op_cross_entropy, x.detach(), weight.detach(),
                                                              targets)[1])
    assert frozen[2] is None


def test_linear_cross_entropy_rejects_bad_input():
    x, weight = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="x must be"):
        linear_cross_entropy(x, torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be int64"):
        linear_cross_entropy(x, weight, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="targets must be int64"):
        linear_cross_entropy(x, weight, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no rows"):
        linear_cross_entropy(x[:0], weight, torch.zeros(0, dtype=torch.long))
