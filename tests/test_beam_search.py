"""sparserec.generate.beam_search: the whole constrained decode loop against exhaustive scoring of
every item and an independent brute-force beam search written here in plain Python."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparserec.ops.trie as ops_trie
from sparserec.generate import Trie, beam_search

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops_trie._compiled_kernel_serves("trie_beam_step", torch.device("cuda"))),
    reason="needs a CUDA device and sparserec._C built with CUDA")


class PrefixModel:
    """A deterministic stand-in for a decoder: each batch row's next-token log-probs are a fixed
    random function of the tokens generated so far. Its state (the prefix of every row) is
    reordered by parent_rows exactly as a KV cache would be."""

    def __init__(self, batch_size, beam_size, vocab, seed=0, ties=False, device="cpu"):
        self.batch_size, self.beam_size, self.vocab = batch_size, beam_size, vocab
        self.seed, self.ties, self.device = seed, ties, device
        self.prefixes = None
        self.calls = 0

    def log_probs(self, batch_row, prefix):
        gen = torch.Generator().manual_seed(hash((self.seed, batch_row, prefix)) % 2**62)
        if self.ties:  # three distinct values: many equal sums
            return -torch.randint(0, 3, (self.vocab,), generator=gen).float()
        return torch.randn(self.vocab, generator=gen).log_softmax(0)

    def __call__(self, tokens, parent_rows):
        self.calls += 1
        if tokens is None:
            assert parent_rows is None
            self.prefixes = [() for _ in range(self.batch_size * self.beam_size)]
        else:
            assert tokens.shape == (self.batch_size * self.beam_size, 1) and tokens.min() >= 0
            self.prefixes = [self.prefixes[row] + (token,)
                             for row, token in zip(parent_rows.tolist(), tokens[:, 0].tolist())]
        rows = [self.log_probs(row // self.beam_size, prefix) for row, prefix in enumerate(self.prefixes)]
        return torch.stack(rows).to(self.device)

    def path_score(self, batch_row, path):
        """Summed log-probs of a token path, added in float32 in decode order."""
        score = np.float32(0.0)
        for t, token in enumerate(path):
            score = score + self.log_probs(batch_row, tuple(path[:t])).numpy()[token]
        return score


def brute_force_beam_search(model, batch_row, paths, beam_size, prefix_tokens=None):
    """Plain-Python beam search over a dict trie: [(item, score)] best first, each item once.

    Ties go to the lower parent beam, then the lower token; float32 sums, as the kernels."""
    root = {}
    for item, path in enumerate(paths):
        node = root
        for token in path[:-1]:
            node = node.setdefault(token, {})
        node[path[-1]] = item
    if prefix_tokens is not None:
        root = {token: root for token in prefix_tokens}
    beams = [(np.float32(0.0), (), root)]
    for _ in range(len(paths[0]) + (prefix_tokens is not None)):
        candidates = []
        for parent, (score, prefix, node) in enumerate(beams):
            log_probs = model.log_probs(batch_row, prefix).numpy()
            for token in sorted(node):
                candidate = score + log_probs[token]
                if candidate > -np.inf:
                    candidates.append((candidate, parent, token))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        beams = [(score, beams[parent][1] + (token,), beams[parent][2][token])
                 for score, parent, token in candidates[:beam_size]]
    results, seen = [], set()
    for score, _, item in beams:
        if item not in seen:
            seen.add(item)
            results.append((item, float(score)))
    return results


def random_paths(num_items, depth, codes, seed):
    gen = torch.Generator().manual_seed(seed)
    paths = torch.unique(torch.randint(0, codes, (num_items, depth), generator=gen), dim=0)
    return paths[torch.randperm(len(paths), generator=gen)]


def run(paths, batch_size, beam_size, seed=0, ties=False, prefix_tokens=None, normalize=False, device="cpu"):
    trie = Trie(paths, device=device)
    vocab = max(trie.vocab_size, max(prefix_tokens or [0]) + 1) + 1
    model = PrefixModel(batch_size, beam_size, vocab, seed, ties, device)
    items, scores = beam_search(model, trie, batch_size, beam_size, prefix_tokens=prefix_tokens, normalize=normalize)
    assert items.shape == scores.shape == (batch_size, beam_size)
    assert model.calls == trie.depth + (prefix_tokens is not None)
    return model, items.cpu(), scores.cpu()


def as_pairs(items, scores):
    return [(item, score) for item, score in zip(items.tolist(), scores.tolist()) if item >= 0]


@pytest.mark.parametrize("num_items,depth,codes,batch_size", [(1, 1, 3, 1), (9, 1, 9, 2), (60, 3, 5, 3),
                                                               (150, 4, 4, 1)])
def test_beam_at_least_items_equals_exhaustive_scoring(num_items, depth, codes, batch_size):
    paths = random_paths(num_items, depth, codes, seed=num_items)
    beam_size = len(paths) + 3
    model, items, scores = run(paths, batch_size, beam_size, seed=depth)
    for row in range(batch_size):
        exhaustive = sorted(((item, float(model.path_score(row, path))) for item, path in enumerate(paths.tolist())),
                            key=lambda pair: -pair[1])
        assert as_pairs(items[row], scores[row]) == exhaustive
        assert items[row, len(paths):].eq(-1).all() and scores[row, len(paths):].eq(float("-inf")).all()


@settings(max_examples=40, deadline=None)
@given(num_items=st.integers(1, 120), depth=st.integers(1, 4), codes=st.integers(1, 6), batch_size=st.integers(1, 3),
       beam_size=st.integers(1, 9), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_small_beams_equal_brute_force(num_items, depth, codes, batch_size, beam_size, ties, seed):
    paths = random_paths(num_items, depth, codes, seed)
    model, items, scores = run(paths, batch_size, beam_size, seed, ties)
    for row in range(batch_size):
        assert as_pairs(items[row], scores[row]) == brute_force_beam_search(model, row, paths.tolist(), beam_size)


@settings(max_examples=25, deadline=None)
@given(num_items=st.integers(1, 60), depth=st.integers(1, 3), beam_size=st.integers(1, 8), ties=st.booleans(),
       seed=st.integers(0, 2**16))
def test_prefix_step_equals_brute_force_and_deduplicates(num_items, depth, beam_size, ties, seed):
    paths = random_paths(num_items, depth, 4, seed)
    prefix_tokens = [9, 5, 7]  # e.g. behavior tokens, outside the item codes
    model, items, scores = run(paths, 2, beam_size, seed, ties, prefix_tokens=prefix_tokens)
    for row in range(2):
        expected = brute_force_beam_search(model, row, paths.tolist(), beam_size, prefix_tokens)
        assert as_pairs(items[row], scores[row]) == expected
        found = [item for item in items[row].tolist() if item >= 0]
        assert len(found) == len(set(found)) and items[row, len(found):].eq(-1).all()


def test_every_result_is_a_real_item_and_items_are_distinct():
    paths = random_paths(2000, 4, 16, seed=11)
    _, items, scores = run(paths, batch_size=4, beam_size=30, seed=11)
    assert items.ge(0).all() and items.lt(len(paths)).all()
    for row in items.tolist():
        assert len(set(row)) == len(row)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_ties_are_deterministic():
    paths = random_paths(300, 3, 8, seed=12)
    first = run(paths, 2, 10, seed=12, ties=True)
    second = run(paths, 2, 10, seed=12, ties=True)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_beams_run_out_of_candidates():
    paths = [[0, 0, 1], [0, 1, 1], [3, 2, 0]]  # 3 items, beam 8: every step leaves empty slots
    model, items, scores = run(torch.tensor(paths), batch_size=2, beam_size=8)
    assert items[:, 3:].eq(-1).all() and scores[:, 3:].eq(float("-inf")).all()
    assert sorted(items[:, :3].flatten().tolist()) == [0, 0, 1, 1, 2, 2]


def test_normalize_scores_are_constrained_probabilities():
    paths = random_paths(40, 2, 8, seed=13)
    _, items, scores = run(paths, batch_size=1, beam_size=len(paths), normalize=True)
    # Renormalised over valid children at every step, the item probabilities sum to 1.
    torch.testing.assert_close(scores.exp().sum(), torch.tensor(1.0))
    assert sorted(items[0].tolist()) == list(range(len(paths)))


def test_fallback_without_kernels_gives_the_same_result(monkeypatch):
    paths = random_paths(500, 3, 10, seed=14)
    _, items, scores = run(paths, 3, 12, seed=14)
    monkeypatch.setattr(ops_trie, "_compiled_kernel_serves", lambda op, device: False)
    _, items_fallback, scores_fallback = run(paths, 3, 12, seed=14)
    assert torch.equal(items, items_fallback) and torch.equal(scores, scores_fallback)


def test_bad_arguments():
    trie = Trie([[0, 1], [1, 0]])
    model = PrefixModel(1, 2, 3)
    with pytest.raises(TypeError, match="step_fn must be callable"):
        beam_search(None, trie, 1, 2)
    with pytest.raises(TypeError, match="trie must be"):
        beam_search(model, [[0, 1]], 1, 2)
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        beam_search(model, trie, 1, 0)
    with pytest.raises(ValueError, match="beam_size=1000000000 is larger than the trie's 2 items"):
        beam_search(model, trie, 1, 10**9)  # refused before allocating (B, 10**9) scores
    with pytest.raises(ValueError, match=r"\(B\*K, V\) or \(B, K, V\) with B\*K = 4"):
        beam_search(model, trie, 2, 2)  # the model was made for batch 1
    with pytest.raises(ValueError, match="prefix_tokens must be distinct"):
        beam_search(model, trie, 1, 2, prefix_tokens=[2, 2])
    with pytest.raises(TypeError, match="prefix_tokens must be integer token ids"):
        beam_search(model, trie, 1, 2, prefix_tokens=[0.5])
    with pytest.raises(ValueError, match="prefix_tokens must be non-negative"):
        beam_search(model, trie, 1, 2, prefix_tokens=[-1, 2])
    with pytest.raises(ValueError, match="prefix_tokens must be a non-empty 1-D"):
        beam_search(model, trie, 1, 2, prefix_tokens=[])


# ---- forced (thinking) steps ------------------------------------------------------------------

class ForcedPrefixModel(PrefixModel):
    """PrefixModel fed several tokens per call: its log-probs depend on everything it was fed,
    forced tokens included, as a decoder's do."""

    def __call__(self, tokens, parent_rows):
        self.calls += 1
        rows = self.batch_size * self.beam_size
        if parent_rows is None:
            fed = [()] * rows if tokens is None else [tuple(row) for row in tokens.tolist()]
            self.prefixes = fed
        else:
            assert tokens.shape[0] == rows and tokens.min() >= 0
            self.prefixes = [self.prefixes[row] + tuple(fed)
                             for row, fed in zip(parent_rows.tolist(), tokens.tolist())]
        return torch.stack([self.log_probs(row // self.beam_size, prefix)
                            for row, prefix in enumerate(self.prefixes)]).to(self.device)


class GeneratedView:
    """The same model seen from the generated tokens only: the forced tokens of each depth are
    inserted into the context before its token is scored (what brute force and exhaustive
    scoring must reproduce). offset: generated tokens before the item path (a prefix token)."""

    def __init__(self, model, forced, offset=0):
        self.model, self.forced, self.offset = model, forced, offset

    def fed(self, generated):
        fed = ()
        for position in range(len(generated) + 1):
            fed += tuple(self.forced.get(position - self.offset, ()))
            if position < len(generated):
                fed += (generated[position],)
        return fed

    def log_probs(self, batch_row, generated):
        return self.model.log_probs(batch_row, self.fed(generated))

    def path_score(self, batch_row, path):
        score = np.float32(0.0)
        for t, token in enumerate(path):
            score = score + self.log_probs(batch_row, tuple(path[:t])).numpy()[token]
        return score


def random_forced(depth, vocab_from, seed):
    """Forced tokens at a random subset of depths (each 1-2 tokens, ids above the path codes)."""
    gen = np.random.default_rng(seed)
    return {d: [int(t) for t in gen.integers(vocab_from, vocab_from + 4, gen.integers(1, 3))]
            for d in range(depth) if gen.random() < 0.6}


def run_forced(paths, forced, batch_size, beam_size, seed=0, ties=False, prefix_tokens=None, spare_tokens=5):
    trie = Trie(paths)
    vocab = max(trie.vocab_size, max(prefix_tokens or [0]) + 1) + spare_tokens
    model = ForcedPrefixModel(batch_size, beam_size, vocab, seed, ties)
    items, scores = beam_search(model, trie, batch_size, beam_size, prefix_tokens=prefix_tokens,
                                forced_tokens=forced)
    assert model.calls == trie.depth + (prefix_tokens is not None)  # forced steps ride along, no extra call
    return model, items, scores


@settings(max_examples=30, deadline=None)
@given(num_items=st.integers(1, 80), depth=st.integers(1, 4), codes=st.integers(1, 5), batch_size=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_forced_steps_with_every_item_equal_exhaustive_scoring(num_items, depth, codes, batch_size, seed):
    paths = random_paths(num_items, depth, codes, seed)
    forced = random_forced(depth, codes + 1, seed)
    model, items, scores = run_forced(paths, forced, batch_size, len(paths), seed)
    view = GeneratedView(model, forced)
    for row in range(batch_size):
        exhaustive = sorted(((item, float(view.path_score(row, path))) for item, path in enumerate(paths.tolist())),
                            key=lambda pair: -pair[1])
        # The log-probs are random functions of the whole context: equal scores mean every forced
        # token reached the model at its place.
        assert as_pairs(items[row], scores[row]) == exhaustive


@settings(max_examples=30, deadline=None)
@given(num_items=st.integers(1, 80), depth=st.integers(1, 4), codes=st.integers(1, 5), beam_size=st.integers(1, 7),
       ties=st.booleans(), prefix=st.booleans(), seed=st.integers(0, 2**16))
def test_forced_steps_with_small_beams_equal_brute_force(num_items, depth, codes, beam_size, ties, prefix, seed):
    paths = random_paths(num_items, depth, codes, seed)
    prefix_tokens = [codes + 9, codes + 7] if prefix else None
    forced = random_forced(depth, codes + 1, seed)
    model, items, scores = run_forced(paths, forced, 2, beam_size, seed, ties, prefix_tokens)
    view = GeneratedView(model, forced, offset=int(prefix))
    for row in range(2):
        expected = brute_force_beam_search(view, row, paths.tolist(), beam_size, prefix_tokens)
        assert as_pairs(items[row], scores[row]) == expected


def test_no_forced_tokens_is_the_plain_search_and_bad_ones_are_refused():
    paths = random_paths(40, 3, 4, seed=2)
    _, items, scores = run(paths, 2, 6, seed=2)
    _, forced_items, forced_scores = run_forced(paths, {}, 2, 6, seed=2, spare_tokens=1)  # run's vocabulary
    assert torch.equal(items, forced_items) and torch.equal(scores, forced_scores)
    trie, model = Trie(paths), ForcedPrefixModel(1, 2, 10)
    for forced, error, message in (([5], TypeError, "must be a mapping"), ({3: [5]}, ValueError, r"in \[0, 3\)"),
                                   ({-1: [5]}, ValueError, "path depths"), ({0: []}, ValueError, "non-empty"),
                                   ({0: [-2]}, ValueError, "non-negative"), ({0: [[1, 2]]}, ValueError, "1-D"),
                                   ({0: [0.5]}, ValueError, "integer")):
        with pytest.raises(error, match=message):
            beam_search(model, trie, 1, 2, forced_tokens=forced)
    assert model.calls == 0  # refused before the model is called


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("prefix_tokens", [None, [9, 5, 7]])
def test_cuda_equals_cpu(prefix_tokens):
    paths = random_paths(3000, 4, 12, seed=15)
    _, items, scores = run(paths, 3, 20, seed=15, prefix_tokens=prefix_tokens)
    _, items_cuda, scores_cuda = run(paths, 3, 20, seed=15, prefix_tokens=prefix_tokens, device="cuda")
    assert torch.equal(items_cuda, items) and torch.equal(scores_cuda, scores)
