"""S²GR's stepwise thinking on GRACE: the thinking tokens' layout, shapes, which loss term trains
which parameters, the k-means targets, and generation through the forced-step beam search (exact
against exhaustive scoring with the thinking steps in the context)."""
import pytest
import torch

from sparserec import JSAConfig
from sparserec.generate import Trie
from sparserec.models import GRACE, GRACEConfig, recommend, sequence_loss, shift_right
from sparserec.models.grace import ThinkConfig, ThinkingObjective
from sparserec.tokenize.rqvae import codebook_clusters

VOCAB, LEVELS, DIM, ITEMS = 24, 3, 4, 10
JSA = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3)


def thinking_grace(seed=0, **think):
    torch.manual_seed(seed)
    config = GRACEConfig(vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64, dropout=0.0, jsa=JSA,
                         jsa_backend="reference", encoder_layers=1, decoder_layers=2, max_positions=64,
                         max_target_positions=16, think=ThinkConfig(levels=LEVELS, dim=DIM, clusters=3, **think))
    return GRACE(config).double().eval()


def histories(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tokens = torch.randint(3, VOCAB, (int(cu_seqlens[-1]),), generator=generator)
    return tokens, cu_seqlens, torch.rand(tokens.shape[0], generator=generator) < 0.25


def targets_for(items, paths):
    """Decoder targets `[behavior 3] [path: CoT, SID_1..SID_3, collision]` of the given items."""
    return torch.cat([torch.full((len(items), 1), 3), paths[items]], dim=1)


def item_paths(seed=0):
    """ITEMS distinct paths [CoT, SID_1, SID_2, SID_3, collision] with tokens in [4, 9)."""
    generator = torch.Generator().manual_seed(seed)
    paths = torch.unique(torch.randint(4, 9, (4 * ITEMS, 5), generator=generator), dim=0)
    return paths[torch.randperm(len(paths), generator=generator)[:ITEMS]]


def objective(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ThinkingObjective(torch.randint(0, 3, (ITEMS, LEVELS), generator=generator),
                             torch.randn(LEVELS, 3, DIM, generator=generator, dtype=torch.float64),
                             torch.randn(ITEMS, DIM, generator=generator, dtype=torch.float64))


def batch_of(items, paths, lengths=(7, 3, 5, 9)):
    tokens, cu_seqlens, anchors = histories(lengths)
    items = torch.as_tensor(items)
    return {"tokens": tokens, "cu_seqlens": cu_seqlens, "anchor_mask": anchors, "items": items,
            "targets": targets_for(items, paths)}


def test_thinking_tokens_sit_before_each_sid_level_and_are_forced_there():
    model = thinking_grace()
    targets = torch.tensor([[3, 4, 10, 11, 12, 20], [3, 5, 13, 14, 15, 21]])
    think = [VOCAB, VOCAB + 1, VOCAB + 2]
    assert model.insert_thinking(targets).tolist() == [
        [3, 4, think[0], 10, think[1], 11, think[2], 12, 20], [3, 5, think[0], 13, think[1], 14, think[2], 15, 21]]
    # Item paths drop the behavior token: SID_1 is at depth 1 of [CoT, SID_1..SID_3, collision].
    assert model.forced_tokens(5) == {1: [think[0]], 2: [think[1]], 3: [think[2]]}
    assert model.forced_tokens(4) == {0: [think[0]], 1: [think[1]], 2: [think[2]]}  # no CoT (TIGER-like)
    with pytest.raises(ValueError, match="cannot end with 3 SIDs"):
        model.forced_tokens(3)
    with pytest.raises(ValueError, match="cannot end with 3 SIDs"):
        model.insert_thinking(targets[:, :3])
    assert model.embedding.num_embeddings == VOCAB + LEVELS


def test_forward_shapes_and_missing_thinking_tokens():
    model = thinking_grace()
    paths = item_paths()
    batch = batch_of([0, 3, 3, 7], paths)
    inputs = shift_right(model.insert_thinking(batch["targets"]), 1)
    logits, thoughts, interest = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"], inputs, think=True)
    assert logits.shape == (4, 6 + LEVELS, VOCAB + LEVELS)
    assert thoughts.shape == (4, LEVELS, DIM) and interest.shape == (4, DIM)
    plain = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"], inputs)
    torch.testing.assert_close(plain, logits)
    with pytest.raises(ValueError, match="thinking tokens in every decoder input"):
        model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"], shift_right(batch["targets"], 1), think=True)
    no_think = GRACE(GRACEConfig(vocab_size=VOCAB, d_model=32, num_heads=4, jsa=JSA, jsa_backend="reference"))
    with pytest.raises(ValueError, match="needs a model built with"):
        no_think(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"], inputs.clamp(max=VOCAB - 1), think=True)


def grads(model, weights):
    model.zero_grad()
    think = ThinkConfig(levels=LEVELS, dim=DIM, clusters=3, **weights)
    model.config = GRACEConfig(**{**model.config.__dict__, "think": think})
    objective()(model, batch_of([0, 3, 3, 7], item_paths())).backward()
    return {name: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for name, p in model.named_parameters()}


def test_each_loss_term_trains_its_parameters_and_the_regularizer_stops_at_v_g():
    model = thinking_grace()
    off = dict(align_weight=0.0, interest_weight=0.0, interest_reg=0.0)
    sid_only = grads(model, off)
    assert not any(sid_only[name] for name in sid_only if name.startswith(("think_heads", "interest_head")))
    assert sid_only["embedding.weight"] and sid_only["decoder_layers.0.self_attention.q_proj.weight"]
    align = grads(model, {**off, "align_weight": 1.0})
    assert all(align[f"think_heads.{l}.weight"] for l in range(LEVELS)) and not align["interest_head.0.weight"]
    holistic = grads(model, {**off, "interest_weight": 1.0})
    assert holistic["interest_head.0.weight"] and holistic["encoder_layers.0.ffn.up.weight"]
    assert not any(holistic[f"think_heads.{l}.weight"] for l in range(LEVELS))
    regularizer = grads(model, {**off, "interest_reg": 1.0})
    assert regularizer["think_heads.0.weight"] and not regularizer["think_heads.1.weight"]
    assert not regularizer["interest_head.0.weight"]  # stop-gradient on v_g


def test_loss_is_the_weighted_sum_of_its_terms():
    model = thinking_grace()
    paths, target = item_paths(), objective()
    batch = batch_of([0, 3, 3, 7], paths)
    extended = model.insert_thinking(batch["targets"])
    logits, thoughts, interest = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"],
                                       shift_right(extended, 1), think=True)
    sid = sequence_loss(logits, extended.masked_fill(extended >= VOCAB, -100))
    unit = torch.nn.functional.normalize
    thoughts, interest = unit(thoughts, dim=-1), unit(interest, dim=-1)
    align = sum(torch.nn.functional.cross_entropy(thoughts[:, l] @ unit(target.centroids[l], dim=-1).T / 0.1,
                                                  target.code_clusters[batch["items"], l]) for l in range(LEVELS))
    latents = unit(target.item_latents[batch["items"]], dim=-1)
    similarity = interest @ latents.T / 0.1
    similarity[1, 2] = similarity[2, 1] = float("-inf")  # rows 1 and 2 share their target item
    holistic = torch.nn.functional.cross_entropy(similarity, torch.arange(4))
    regularizer = (1 - (thoughts[:, 0] * interest).sum(-1)).mean()
    weights = dict(align_weight=0.3, interest_weight=0.2, interest_reg=0.5)
    model.config = GRACEConfig(**{**model.config.__dict__,
                                  "think": ThinkConfig(levels=LEVELS, dim=DIM, clusters=3, **weights)})
    expected = sid + 0.3 * align + 0.2 * holistic + 0.5 * regularizer
    torch.testing.assert_close(target(model, batch), expected.double())


def test_thinking_generation_equals_exhaustive_scoring_with_the_thinking_steps():
    model = thinking_grace(seed=1)
    paths = item_paths(seed=1)
    trie = Trie(paths)
    tokens, cu_seqlens, anchors = histories([6, 11], seed=1)
    calls = []
    decoder_states = model.decoder_states
    model.decoder_states = lambda ids, cache, **kw: calls.append(ids.shape[1]) or decoder_states(ids, cache, **kw)
    items, scores = recommend(model, trie, tokens, cu_seqlens, anchors, beam_size=ITEMS)
    # One decoder call per path token; the thinking tokens ride along (1 + 1 tokens) with the previous one.
    assert calls == [1, 2, 2, 2, 1]
    memory = model.encode(tokens, cu_seqlens, anchors)
    repeated = type(memory)(memory.states.repeat_interleave(ITEMS, 0), memory.valid.repeat_interleave(ITEMS, 0))
    with_thinking = model.insert_thinking(paths.repeat(2, 1))
    log_probs = model.decode(shift_right(with_thinking, 1), model.new_cache(repeated)).log_softmax(-1)
    token_scores = log_probs.gather(2, with_thinking[:, :, None])[:, :, 0].masked_fill(with_thinking >= VOCAB, 0)
    expected = token_scores.sum(1).view(2, ITEMS).sort(dim=1, descending=True)
    torch.testing.assert_close(scores, expected.values.float())
    assert torch.equal(items, expected.indices)


def test_codebook_clusters_and_thinking_config_checks():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    codebooks = (centres.repeat_interleave(4, 0) + 0.1 * torch.randn(2, 12, 2, generator=generator))
    centroids, cluster = codebook_clusters(codebooks, 3, seed=0)
    assert centroids.shape == (2, 3, 2) and cluster.shape == (2, 12)
    for level in range(2):  # the four codes around each centre share a cluster, whose centroid is that centre
        groups = cluster[level].view(3, 4)
        assert (groups == groups[:, :1]).all() and groups[:, 0].unique().numel() == 3
        assert torch.cdist(centres, centroids[level]).min(1).values.max() < 0.2
    assert torch.equal(codebook_clusters(codebooks, 3, seed=0)[1], cluster)
    with pytest.raises(ValueError, match="clusters"):
        codebook_clusters(codebooks, 13)
    config = thinking_grace().config
    assert GRACEConfig.from_dict(config.to_dict()) == config
    for bad, message in ((dict(levels=0), "levels"), (dict(clusters=1), "clusters"),
                         (dict(align_weight=-1.0), "align_weight"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=message):
            ThinkConfig(**{"levels": 3, "dim": 4, **bad})
    with pytest.raises(ValueError, match="thinking targets disagree"):
        ThinkingObjective(torch.zeros(ITEMS, 2, dtype=torch.long), torch.zeros(3, 3, DIM), torch.zeros(ITEMS, DIM))
