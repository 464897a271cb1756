"""The recommender recipe: constant token slots dropped, history masking, exhaustive full ranking
against beam search, GRACE's head_dim and presets, the inverse-sqrt schedule."""
import math

import numpy as np
import pytest
import torch

from sparserec.data import Targets, build_interaction_data
from sparserec.evaluate import drop_history, evaluate_popularity, evaluate_sasrec, exhaustive_rankings, grace_rankings
from sparserec.generate import Trie
from sparserec.models import GRACE, GRACEConfig, SASRec, SASRecConfig
from sparserec.tokenize import ItemTokenizer, RQVAEConfig, TokenizerConfig
from sparserec.train import warmup_inverse_sqrt

TINY_RQVAE = RQVAEConfig.fast(levels=2, codebook_size=4, latent_dim=4, hidden_dims=(8,), epochs=3)
NAN = float("nan")


def single_behavior_data(users=6, items=12, length=5, seed=0):
    """One behavior, no prices, one brand: behavior, price band and brand are constant slots."""
    rng = np.random.default_rng(seed)
    attributes = {f"i{i}": (("shoes", "hats")[i % 2], NAN, "acme", f"item {i}") for i in range(items)}
    events = [(f"u{u}", f"i{rng.integers(items)}") for u in range(users) for _ in range(length)]
    return build_interaction_data("single", [u for u, _ in events], [i for _, i in events], [0] * len(events),
                                  list(range(len(events))), ("view",), attributes, target_behavior=None)


@pytest.fixture(scope="module")
def single():
    data = single_behavior_data()
    embeddings = torch.randn(data.num_items, 6, generator=torch.Generator().manual_seed(0))
    full = ItemTokenizer.fit(data, TokenizerConfig.fast(rqvae=TINY_RQVAE), embeddings=embeddings, progress=False)
    return data, full, full.with_drop_constant(True)


def test_constant_slots_are_dropped(single):
    data, full, compact = single
    assert full.layout == ["behavior", "product_type", "price_band", "brand", "sid_1", "sid_2", "collision"]
    assert compact.layout == ["product_type", "sid_1", "sid_2", "collision"]
    assert (full.tokens_per_interaction, compact.tokens_per_interaction) == (7, 4)
    assert not compact.behavior_token and compact.anchor_offset == 0
    # The dropped columns are exactly the constant ones: the remaining paths are the full ones without them.
    torch.testing.assert_close(compact.item_paths(), full.item_paths()[:, [0, 3, 4, 5]])
    assert len({tuple(p) for p in compact.item_paths().tolist()}) == data.num_items
    assert compact.decode_paths(compact.item_paths()).tolist() == list(range(data.num_items))
    items, behaviors = data.history(0)
    torch.testing.assert_close(compact.interaction_tokens(items, behaviors), compact.item_paths()[items])
    tokens, anchors = compact.history_tokens(items, behaviors)
    assert tokens.shape == (4 * len(items),)
    assert anchors.reshape(-1, 4)[:, 1:].sum() == 0 and anchors[0]  # anchors sit on product-type tokens
    assert compact.with_cot(False).layout == ["sid_1", "sid_2", "collision"]


def test_multi_behavior_data_keeps_its_behavior_token(single):
    data, full, _ = single
    attributes = {f"i{i}": ("shoes", float(i), None, "") for i in range(4)}
    multi = build_interaction_data("multi", ["u"] * 4, [f"i{i}" for i in range(4)], [0, 1, 0, 1], range(4),
                                   ("click", "buy"), attributes, target_behavior="buy")
    tokenizer = ItemTokenizer.fit(multi, TokenizerConfig.fast(rqvae=TINY_RQVAE, price_bands=2),
                                  embeddings=torch.randn(4, 6), progress=False, drop_constant=True)
    # product type "shoes" everywhere and no brand: both dropped; behavior and price kept.
    assert tokenizer.layout == ["behavior", "price_band", "sid_1", "sid_2", "collision"]


def test_drop_history_and_masked_popularity():
    ranked = torch.tensor([[5, 3, 1, 2, -1], [4, 0, 2, 1, 3]])
    kept = drop_history(ranked, [np.array([3, 2]), np.array([9])], 3)
    assert kept.tolist() == [[5, 1, -1], [4, 0, 2]]
    # Popularity with masking never recommends a user's own item.
    data = single_behavior_data(users=20, items=8, length=6)
    targets = Targets(np.arange(20), data.user_ptr[1:] - 1)
    train_end = data.user_ptr[1:] - 1
    plain = evaluate_popularity(data, train_end, targets, ks=(1, 5))["all"]
    masked = evaluate_popularity(data, train_end, targets, ks=(1, 5), mask_history=True)["all"]
    assert plain["count"] == masked["count"] == 20
    assert plain["hr@5"] != masked["hr@5"]


def test_sasrec_history_masking_scores_history_items_out():
    data = single_behavior_data(users=10, items=12, length=6)
    targets = Targets(np.arange(10), data.user_ptr[1:] - 1)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=data.num_items, d_model=16, num_heads=2, dropout=0.0, max_length=3))
    histories = [data.history(u, end=p)[0] for u, p in zip(targets.user, targets.position)]
    masked = evaluate_sasrec(model, data, targets, ks=(1, 5), mask_history=True)["all"]
    # By hand: top 5 of the scores with every past item (also those beyond max_length) at -inf.
    inputs = torch.full((10, 3), model.pad_id)
    for row, items in enumerate(histories):
        inputs[row, : min(3, len(items))] = torch.from_numpy(items[-3:])
    scores = model.eval().score(inputs)
    for row, items in enumerate(histories):
        scores[row, torch.from_numpy(items)] = -math.inf
    top = scores.topk(5).indices
    hits = (top == torch.from_numpy(targets.items(data))[:, None]).any(1).double().mean().item()
    assert masked["hr@5"] == pytest.approx(hits)


def tiny_grace(tokenizer, **overrides):
    torch.manual_seed(0)
    values = dict(vocab_size=tokenizer.vocab.size, d_model=16, num_heads=2, d_ff=32, dropout=0.0,
                  attention="dense", encoder_layers=1, decoder_layers=1, max_positions=64, max_target_positions=8)
    return GRACE(GRACEConfig(**{**values, **overrides})).double().eval()


@pytest.mark.parametrize("drop_constant", [False, True])
def test_exhaustive_ranking_equals_a_beam_as_wide_as_the_catalogue(single, drop_constant):
    """With beam >= number of items the beam search is exact (SPEC §4), so it must agree with
    scoring every item's full path."""
    data, full, compact = single
    tokenizer = compact if drop_constant else full
    model = tiny_grace(tokenizer, head_dim=8, num_heads=3)  # heads x head_dim (24) != d_model (16)
    targets = Targets(np.arange(4), data.user_ptr[1:5] - 1)
    width = data.num_items
    trie = Trie(tokenizer.item_paths())
    beam = grace_rankings(model, tokenizer, data, targets, trie, "behavior_specific", beam_size=width,
                          max_interactions=8, progress=False)
    exhaustive = exhaustive_rankings(model, tokenizer, data, targets, "behavior_specific", top=width,
                                     max_interactions=8, item_chunk=5, progress=False)
    assert torch.equal(beam, exhaustive)


def test_top_k_overlap():
    from sparserec.evaluate import top_k_overlap

    ranked = torch.tensor([[1, 2, 3, 4], [5, -1, -1, -1]])
    reference = torch.tensor([[2, 1, 9, 3], [6, 5, 7, 8]])
    assert top_k_overlap(ranked, reference, 2).tolist() == [1.0, 0.5]
    assert top_k_overlap(ranked, reference, 4).tolist() == [0.75, 0.25]


def test_inverse_sqrt_schedule():
    multiplier = warmup_inverse_sqrt(100)
    assert multiplier(0) == pytest.approx(0.01) and multiplier(99) == pytest.approx(1.0)
    assert multiplier(399) == pytest.approx(0.5) and multiplier(9999) == pytest.approx(0.1)


def test_tiger_preset_builds_and_counts_its_history():
    from sparserec.pipeline import GRACE_PRESETS, Prepared, build_model

    data = single_behavior_data()
    embeddings = torch.randn(data.num_items, 6, generator=torch.Generator().manual_seed(0))
    tokenizer = ItemTokenizer.fit(data, TokenizerConfig.fast(rqvae=TINY_RQVAE), embeddings=embeddings,
                                  progress=False, drop_constant=True)
    prepared = Prepared("single", data, None, tokenizer)
    preset = GRACE_PRESETS["tiger"]
    options = {key: value for key, value in preset["model"].items() if key != "max_history"}
    model = build_model("grace", prepared, max_history=3, d_model=128, num_heads=6, encoder_layers=4,
                        decoder_layers=4, **options)
    assert model.config.max_positions == 3 * tokenizer.tokens_per_interaction
    assert model.decoder_layers[0].self_attention.q_proj.weight.shape == (6 * 64, 128)
