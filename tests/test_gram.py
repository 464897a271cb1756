"""GRAM (issue 13): lexical IDs, TF-IDF naming, the item-encoding cache, constrained generation, CLI checks."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from sparserec.cli import main, parse_args
from sparserec.data import build_interaction_data, default_split
from sparserec.models import SASRec, SASRecConfig
from sparserec.models.gram import (EOS, GRAM, GRAMConfig, ItemEncodingCache, build_tables, gram_examples, gram_loss,
                                   gram_rankings, item_fields, similar_items)
from sparserec.pipeline import Prepared, save_run
from sparserec.tokenize.lexical import LexicalConfig, build_lexical_ids, item_words, name_siblings

BRANDS = ("acme", "lumo", "verde")
KINDS = (("nail", "polish"), ("face", "cream"), ("hair", "shampoo"), ("lip", "gloss"))
COLOURS = ("red", "pink", "mango", "mint", "coral", "amber", "ivory", "plum")


@pytest.fixture(scope="module")
def toy():
    """30 items with Amazon-style text, 24 users of 4..9 events, a GRAM over them (random weights)."""
    rng = np.random.default_rng(0)
    attributes = {}
    for i in range(30):
        kind = KINDS[i % 4]
        text = (f"product type: Beauty > {kind[0].title()}. brand: {BRANDS[i % 3]}. "
                f"keywords: {COLOURS[i % 8]} {kind[1]} {COLOURS[(i * 3) % 8]}.")
        attributes[f"i{i}"] = (f"Beauty > {kind[0]}", float("nan"), BRANDS[i % 3], text)
    users, items, times = [], [], []
    for user in range(24):
        for step in range(4 + user % 6):
            users.append(f"u{user}")
            items.append(f"i{(user * 7 + step * (1 + user % 4)) % 30 if step % 3 else int(rng.integers(30))}")
            times.append(step)
    data = build_interaction_data("toy", users, items, [0] * len(items), times, ("review",), attributes)
    words = item_words(data.items.text)
    # Items of one kind share a direction (plus noise), so k-means finds the kinds.
    embeddings = torch.randn(data.num_items, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    for item in range(data.num_items):
        embeddings[item, ["nail", "face", "hair", "lip"].index(words[item][1])] += 3.0
    ids = build_lexical_ids(embeddings, words, LexicalConfig(max_cluster=5, max_depth=2, branching=4))
    neighbours = torch.stack([(torch.arange(2) + item + 1) % data.num_items for item in range(data.num_items)])
    tables = build_tables(ids, item_fields(data.items), neighbours, max_prompt_tokens=24)
    torch.manual_seed(0)
    config = GRAMConfig(vocab_size=len(tables.vocabulary), num_items=data.num_items,
                        prompt_length=tables.item_prompts.shape[1], path_depth=tables.item_paths.shape[1],
                        passages=3, max_user_tokens=40, d_model=32, num_heads=2, encoder_layers=1,
                        decoder_layers=1, d_ff=64, dropout=0.0)
    model = GRAM(config).set_tables(tables).eval()
    return data, ids, tables, model


def test_lexical_ids_are_unique_word_paths(toy):
    data, ids, tables, _ = toy
    assert len(set(ids.names)) == data.num_items and ids.stats["unique"]
    assert all(1 <= len(name) <= 3 for name in ids.names)  # max_depth 2 cluster levels + the item's word
    assert ids.stats["leaf_size_max"] < 5 or ids.stats["max_depth"] == 3
    # The first level splits the four kinds apart and names each by its kind's word.
    words = item_words(data.items.text)
    first = {words[item][1]: set() for item in range(data.num_items)}
    for item, name in enumerate(ids.names):
        first[words[item][1]].add(name[0])
    assert all(len(names) == 1 for names in first.values())
    assert len({next(iter(names)) for names in first.values()}) == 4
    # Paths are distinct rows, EOS-padded to one depth: what the trie is built from.
    assert tables.item_paths.unique(dim=0).shape[0] == data.num_items
    assert tables.item_paths.shape[1] == ids.depth
    short = torch.tensor([len(name) < ids.depth for name in ids.names])
    assert bool((tables.item_paths[short, -1] == EOS).all())


def test_lexical_ids_of_identical_items_get_suffixes():
    words = [["soap", "mild"]] * 6
    ids = build_lexical_ids(torch.zeros(6, 4), words, LexicalConfig(max_cluster=2, max_depth=3))
    assert len(set(ids.names)) == 6
    assert ids.stats["leaf_clusters"] == 1  # identical embeddings cannot be split
    assert ids.stats["suffixed"] == 4 and ids.stats["collisions"] == 5
    assert sorted(name[0] for name in ids.names) == ["mild", "mild~2", "mild~3", "mild~4", "mild~5", "soap"]


def test_tfidf_naming_prefers_words_that_tell_siblings_apart():
    documents = [["soap", "mild", "mango"], ["soap", "mild", "lavender"], ["soap", "shampoo"]]
    names, collisions, suffixed = name_siblings(documents)
    assert names == ["mango", "lavender", "shampoo"]  # "soap" is in every sibling: its idf is the lowest
    assert (collisions, suffixed) == (0, 0)
    # Term frequency counts: a word repeated in one sibling's items wins over a rarer single one.
    names, _, _ = name_siblings([["red", "red", "red", "blue"], ["green", "blue"]])
    assert names == ["red", "green"]
    # A clash: a sibling whose best word is taken takes its next word, else its best word with a suffix.
    names, collisions, suffixed = name_siblings([["red"], ["red", "x"], ["red"]])
    assert names == ["red", "x", "red~2"] and (collisions, suffixed) == (1, 1)
    names, collisions, suffixed = name_siblings([["red", "red", "blue"], ["red", "red", "green"]])
    assert names == ["red", "green"] and (collisions, suffixed) == (1, 0)


def test_item_words_drop_labels_stopwords_and_numbers():
    assert item_words(["product type: Makeup > Nails. brand: Acme. keywords: the red 16 oz polish."]) == \
        [["makeup", "nails", "acme", "red", "polish"]]


def test_cache_gives_the_scores_of_re_encoding_and_follows_the_weights(toy, tmp_path):
    data, _, _, model = toy
    targets = default_split(data).test
    cache = ItemEncodingCache(str(tmp_path))
    items, scores = gram_rankings(model, data, targets, beam_size=10, progress=False)
    cached_items, cached_scores = gram_rankings(model, data, targets, beam_size=10, progress=False,
                                                item_encoder=cache.encoder(model))
    assert torch.equal(items, cached_items)
    torch.testing.assert_close(cached_scores, scores, rtol=0, atol=1e-5)
    first = cache.path(model)
    assert os.path.isfile(first)
    # The cached table is exactly what the encoder computes for every item.
    table = np.load(first, mmap_mode="r")
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(np.array(table[:7])), model.encode_items(torch.arange(7)),
                                   rtol=0, atol=1e-6)
    # A weight change gives another key, a rebuilt file, and the new weights' results.
    changed = GRAM(model.config)
    changed.load_state_dict(model.state_dict())
    changed.eval()
    with torch.no_grad():
        changed.encoder_layers[0].ffn.up.weight.mul_(1.5)
    assert cache.path(changed) != first
    new_items, new_scores = gram_rankings(changed, data, targets, beam_size=10, progress=False,
                                          item_encoder=cache.encoder(changed))
    assert os.path.isfile(cache.path(changed))
    _, fresh_scores = gram_rankings(changed, data, targets, beam_size=10, progress=False)
    torch.testing.assert_close(new_scores, fresh_scores, rtol=0, atol=1e-5)
    assert not torch.allclose(new_scores, scores)
    # A decoder-only change keeps the key: the item encodings do not depend on the decoder.
    before = cache.path(changed)
    with torch.no_grad():
        changed.decoder_layers[0].ffn.up.weight.mul_(2.0)
    assert cache.path(changed) == before


def test_constrained_generation_yields_every_item_once(toy):
    data, _, _, model = toy
    targets = default_split(data).test
    items, scores = gram_rankings(model, data, targets, beam_size=data.num_items, progress=False)
    for row in items:
        assert sorted(row.tolist()) == list(range(data.num_items))  # valid, distinct, exhaustive
    assert bool(torch.isfinite(scores).all()) and bool((scores[:, 1:] <= scores[:, :-1] + 1e-6).all())


def test_training_step_lowers_the_loss(toy):
    data, _, _, model = toy
    trained = GRAM(model.config)
    trained.load_state_dict(model.state_dict())
    examples = gram_examples(trained, data, default_split(data).train_targets(data))
    batch = examples.collate([examples[i] for i in range(len(examples))])
    assert batch["user_tokens"].shape[1] <= model.config.max_user_tokens
    assert bool((batch["passage_items"][:, 0] >= 0).all())
    optimizer = torch.optim.Adam(trained.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = gram_loss(trained, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_similar_items_come_from_a_saved_sasrec_run(toy, tmp_path):
    data = toy[0]
    torch.manual_seed(0)
    sasrec = SASRec(SASRecConfig(num_items=data.num_items, d_model=16, num_heads=2, layers=1))
    save_run(str(tmp_path / "sasrec"), sasrec, Prepared("toy", data, default_split(data), None), {"dataset": "toy"})
    neighbours = similar_items(str(tmp_path / "sasrec"), data, 3)
    vectors = torch.nn.functional.normalize(sasrec.item_embedding.weight[:data.num_items].detach(), dim=1)
    similarity = (vectors @ vectors.T).fill_diagonal_(-2.0)
    assert neighbours.shape == (data.num_items, 3)
    assert not bool((neighbours == torch.arange(data.num_items)[:, None]).any())  # never the item itself
    torch.testing.assert_close(similarity.gather(1, neighbours), similarity.topk(3, dim=1).values)
    with pytest.raises(ValueError, match="need a trained SASRec run directory"):
        similar_items(str(tmp_path / "missing"), data, 3)
    with pytest.raises(ValueError, match="trained on other data"):
        similar_items(str(tmp_path / "sasrec"), dataclasses.replace(data, item=data.item[::-1].copy()), 3)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gram", "--gram-c", "1"], "must be at least 2"),
    (["--model", "gram", "--gram-l", "0"], "must be at least 1"),
    (["--model", "gram", "--gram-k", "-1"], "must be at least 0"),
    (["--model", "gram", "--gram-passages", "x"], "must be an integer"),
    (["--model", "gram", "--gram-k", "2"], "needs --gram-sasrec-run"),
    (["--model", "grace", "--gram-passages", "2"], "applies to --model gram only"),
    (["--model", "gram", "--gram-k", "0", "--disable-branch", "win"], "does not apply to --model gram"),
])
def test_cli_rejects_bad_gram_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["train", "--dataset", "amazon-beauty"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_train_refuses_a_missing_sasrec_run_before_any_work(tmp_path, capsys):
    code = main(["train", "--model", "gram", "--dataset", "amazon-beauty", "--gram-sasrec-run", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "no SASRec run there" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # refused before the run directory was made


def test_cli_accepts_gram_options():
    args = parse_args(["train", "--model", "gram", "--gram-k", "0", "--gram-c", "8", "--gram-passages", "2"])
    assert (args.model, args.gram_c, args.gram_passages, args.d_model) == ("gram", 8, 2, 128)
