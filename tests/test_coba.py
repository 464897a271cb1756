"""sparserec.tokenize.coba: S²GR's CoBa RQ-VAE — the training-only co-occurrence graph, neighbour
propagation, the uniformity loss, usage-balanced assignment, and the tokenizer's `method="coba"`."""
import math

import pytest
import torch

import sparserec.tokenize.tokenizer as tokenizer_module
from sparserec.data import build_interaction_data, default_split
from sparserec.tokenize import (CoBaConfig, ItemTokenizer, RQVAEConfig, TokenizerConfig, cooccurrence_graph, propagate,
                                train_rqvae, uniformity_loss)
from sparserec.tokenize.coba import balanced_codes, update_usage

# u: a b c d a (train: a b c), v: b a d (train: b a); items in id order a b c d.
EVENTS = [("u", "a"), ("u", "b"), ("u", "c"), ("u", "d"), ("u", "a"), ("v", "b"), ("v", "a"), ("v", "d")]
TINY_RQVAE = RQVAEConfig.fast(levels=2, codebook_size=4, latent_dim=4, hidden_dims=(8,), epochs=6)


def tiny_data():
    users, items = zip(*EVENTS)
    return build_interaction_data("coba", users, items, [0] * len(items), range(len(items)), ("click",),
                                  {name: (None, float("nan"), None, name) for name in "abcd"})


def test_graph_counts_training_pairs_only():
    data = tiny_data()
    train_end = data.user_ptr[:-1] + [3, 2]
    graph = cooccurrence_graph(data, train_end, window=2).to_dense()
    a, b, c, d = range(4)
    expected = torch.zeros(4, 4)
    for i, j, count in ((a, b, 2), (b, c, 1), (a, c, 1)):  # u: a-b, b-c, a-c (window 2); v: b-a
        expected[i, j] = expected[j, i] = count
    assert torch.equal(graph, expected)
    assert cooccurrence_graph(data, window=1).to_dense()[c, d] == 1  # u's c-d pair once every row counts


def test_propagation_averages_neighbours_and_keeps_isolated_items():
    graph = torch.tensor([[0.0, 3, 1, 0], [3, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).to_sparse()
    x = torch.tensor([[4.0, 0], [0, 8], [8, 4], [1, 1]])
    one = propagate(x, graph, steps=1, mix=0.5)
    neighbours_of_0 = (3 * x[1] + 1 * x[2]) / 4
    torch.testing.assert_close(one[0], 0.5 * x[0] + 0.5 * neighbours_of_0)
    torch.testing.assert_close(one[1], 0.5 * x[1] + 0.5 * x[0])
    torch.testing.assert_close(one[3], x[3])
    torch.testing.assert_close(propagate(x, graph, steps=2, mix=0.5), propagate(one, graph, steps=1, mix=0.5))
    assert torch.equal(propagate(x, graph, steps=0, mix=0.5), x)
    assert torch.equal(propagate(x, graph, steps=3, mix=0.0), x)


def test_uniformity_loss_by_hand_and_its_gradient_spreads_codewords():
    opposite = torch.tensor([[2.0, 0], [-5, 0]])  # unit vectors at squared distance 4
    assert uniformity_loss(opposite).item() == pytest.approx(-8.0)
    square = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])  # pairs at squared distance 2 (8) and 4 (4)
    assert uniformity_loss(square).item() == pytest.approx(math.log((8 * math.exp(-4) + 4 * math.exp(-8)) / 12))
    codebook = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]], requires_grad=True)
    optimizer = torch.optim.SGD([codebook], lr=0.05)
    before = torch.nn.functional.pdist(torch.nn.functional.normalize(codebook.detach(), dim=1)).min()
    for _ in range(20):
        optimizer.zero_grad()
        uniformity_loss(codebook).backward()
        optimizer.step()
    after = torch.nn.functional.pdist(torch.nn.functional.normalize(codebook.detach(), dim=1)).min()
    assert after > before + 0.1


def test_balanced_assignment_shifts_ties_to_under_used_codes():
    distances = torch.tensor([[1.0, 1.0, 5.0], [1.0, 1.2, 5.0], [1.0, 3.0, 0.5]])
    uniform = torch.full((3,), 1 / 3)
    assert torch.equal(balanced_codes(distances, uniform, balance=2.0), distances.argmin(1))  # no usage yet
    assert torch.equal(balanced_codes(distances, torch.tensor([0.9, 0.05, 0.05]), balance=0.0), distances.argmin(1))
    skewed = torch.tensor([0.9, 0.05, 0.05])
    assert balanced_codes(distances, skewed, balance=0.1).tolist() == [1, 1, 2]
    usage = update_usage(uniform, torch.tensor([0, 0, 0, 1]), decay=0.5)
    torch.testing.assert_close(usage, torch.tensor([0.5 / 3 + 0.375, 0.5 / 3 + 0.125, 0.5 / 3]))
    assert usage.sum().item() == pytest.approx(1.0)


def test_coba_training_tracks_usage_and_is_plain_rqvae_without_its_terms():
    x = torch.randn(120, 6, generator=torch.Generator().manual_seed(0))
    model, codes, stats = train_rqvae(x, TINY_RQVAE, progress=False, coba=CoBaConfig(balance=0.5, uniformity=0.1))
    assert torch.allclose(model.usage.sum(1), torch.ones(2)) and (model.usage > 0).any(1).all()
    assert not torch.allclose(model.usage, torch.full_like(model.usage, 0.25))
    assert set(stats) >= {"utilisation_level_1", "unique_level_1", "unique_level_2"}
    plain = train_rqvae(x, TINY_RQVAE, progress=False)[1]
    assert torch.equal(train_rqvae(x, TINY_RQVAE, progress=False, coba=CoBaConfig(balance=0, uniformity=0))[1], plain)
    assert torch.equal(train_rqvae(x, TINY_RQVAE, progress=False, coba=CoBaConfig())[1],
                       train_rqvae(x, TINY_RQVAE, progress=False, coba=CoBaConfig())[1])  # seeded


def test_coba_tokenizer_quantizes_propagated_embeddings_of_training_sequences(monkeypatch):
    data = tiny_data()
    split = default_split(data)
    embeddings = torch.randn(data.num_items, 6, generator=torch.Generator().manual_seed(1))
    seen = []
    fit_rqvae = tokenizer_module.train_rqvae

    def recording(x, config, progress, coba):
        seen.append((x.clone(), coba))
        return fit_rqvae(x, config, progress, coba)

    monkeypatch.setattr(tokenizer_module, "train_rqvae", recording)
    coba = CoBaConfig(window=2, steps=2, mix=0.5)
    tok = ItemTokenizer.fit(data, TokenizerConfig.fast(method="coba", coba=coba, rqvae=TINY_RQVAE),
                            train_end=split.train_end, embeddings=embeddings, progress=False)
    graph = cooccurrence_graph(data, split.train_end, window=2)
    torch.testing.assert_close(seen[0][0], propagate(embeddings, graph, 2, 0.5))
    assert seen[0][1] == coba
    ItemTokenizer.fit(data, TokenizerConfig.fast(rqvae=TINY_RQVAE), embeddings=embeddings, progress=False)
    assert torch.equal(seen[1][0], embeddings) and seen[1][1] is None
    assert tok.codebooks.shape == (2, 4, 4)
    assert {f"utilisation_level_{l}" for l in (1, 2)} | {f"unique_level_{l}" for l in (1, 2)} <= set(tok.stats)


def test_coba_config_round_trip_and_checks(tmp_path):
    data = tiny_data()
    config = TokenizerConfig.fast(method="coba", coba=CoBaConfig(window=3, balance=0.2), rqvae=TINY_RQVAE)
    tok = ItemTokenizer.fit(data, config, progress=False)
    tok.save(str(tmp_path / "tok.pt"))
    loaded = ItemTokenizer.load(str(tmp_path / "tok.pt"))
    assert loaded.config == config and torch.equal(loaded.codebooks, tok.codebooks)
    old = {key: value for key, value in config.to_dict().items() if key not in ("method", "coba")}
    assert TokenizerConfig.from_dict(old).method == "rqvae"  # saved before CoBa existed
    with pytest.raises(ValueError, match="tokenizer method"):
        TokenizerConfig(method="vq")
    for bad in (dict(window=0), dict(steps=-1), dict(mix=1.5), dict(uniformity=-1), dict(usage_decay=1.0)):
        with pytest.raises(ValueError, match="CoBa"):
            CoBaConfig(**bad)


def test_thinking_targets_follow_the_codes_and_codebooks():
    tok = ItemTokenizer.fit(tiny_data(), TokenizerConfig.fast(rqvae=TINY_RQVAE), progress=False)
    code_clusters, centroids, latents = tok.thinking_targets(clusters=2, seed=3)
    assert code_clusters.shape == (4, 2) and centroids.shape == (2, 2, 4) and latents.shape == (4, 4)
    for level in range(2):
        nearest = torch.cdist(tok.codebooks[level], centroids[level]).argmin(1)
        assert torch.equal(code_clusters[:, level], nearest[tok.sids[:, level]])
    torch.testing.assert_close(latents, tok.codebooks[0, tok.sids[:, 0]] + tok.codebooks[1, tok.sids[:, 1]])
    tok.codebooks = None  # as in a tokenizer saved before the codebooks were kept
    with pytest.raises(ValueError, match="without its RQ-VAE codebooks"):
        tok.thinking_targets(clusters=2)
