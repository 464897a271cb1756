"""The item trie (sparserec.generate.Trie) and one constrained beam step (sparserec.ops.trie_beam_step):
the compiled builder and kernels (C++, CUDA) against their PyTorch twins in sparserec.reference.trie,
the result order (ties included), fake tensors, opcheck and bad input."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import sparserec.ops.trie as ops_trie
from sparserec import EXTENSION_ERROR, has_extension
from sparserec.generate import Trie
from sparserec.ops import trie_beam_step
from sparserec.reference.trie import build_trie_csr
from sparserec.reference.trie import trie_beam_step as reference_step

needs_extension = pytest.mark.skipif(not has_extension(), reason=f"sparserec._C is not built: {EXTENSION_ERROR}")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops_trie._compiled_kernel_serves("trie_beam_step", torch.device("cuda"))),
    reason="needs a CUDA device and sparserec._C built with CUDA")
NEG_INF = float("-inf")


def random_paths(num_items, depth, codes, seed):
    """Distinct random paths in random item order (fewer than num_items when codes**depth is small)."""
    gen = torch.Generator().manual_seed(seed)
    paths = torch.unique(torch.randint(0, codes, (num_items, depth), generator=gen), dim=0)
    return paths[torch.randperm(len(paths), generator=gen)]


def random_step_inputs(trie, batch, beams, seed, extra_vocab=0, ties=False):
    """Log-probs (with some -inf), beam scores (some -inf) and nodes (some outside the trie)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = trie.vocab_size + extra_vocab
    log_probs = torch.randn(batch, beams, vocab, generator=gen).log_softmax(-1)
    if ties:  # few distinct values: many equal scores
        log_probs = -torch.randint(0, 3, (batch, beams, vocab), generator=gen).float()
    log_probs[torch.rand(batch, beams, vocab, generator=gen) < 0.1] = NEG_INF
    scores = -torch.randint(0, 3, (batch, beams), generator=gen).float()
    scores[torch.rand(batch, beams, generator=gen) < 0.25] = NEG_INF
    nodes = torch.randint(-1, trie.num_nodes + 1, (batch, beams), generator=gen)
    return log_probs, scores, nodes


def walk(trie, path):
    """The node reached from the root along `path`, read from the CSR arrays one child run at a time."""
    node = 0
    for token in path:
        first, last = trie.child_ptr[node].item(), trie.child_ptr[node + 1].item()
        run = trie.node_token[first:last].tolist()
        assert run == sorted(set(run)), "children must be token-sorted and distinct"
        node = first + run.index(token)
    return node


# ---------------------------------------------------------------------------------------------- trie


@pytest.mark.parametrize("num_items,depth,codes", [(1, 1, 5), (7, 1, 10), (40, 3, 4), (300, 4, 6)])
def test_every_item_path_leads_to_its_leaf(num_items, depth, codes):
    paths = random_paths(num_items, depth, codes, seed=num_items)
    trie = Trie(paths)
    leaves = torch.tensor([walk(trie, path) for path in paths.tolist()])
    assert torch.equal(trie.item_of(leaves), torch.arange(len(paths)))
    assert trie.depth == depth and trie.num_items == len(paths)
    assert trie.vocab_size == int(paths.max()) + 1
    assert trie.item_of(torch.arange(trie.first_leaf)).eq(-1).all()
    assert trie.item_of(torch.tensor([-1, trie.num_nodes])).tolist() == [-1, -1]
    fanout = trie.child_ptr[1:] - trie.child_ptr[:-1]
    assert fanout[trie.first_leaf:].eq(0).all()
    assert trie.max_fanout[0] == len(paths[:, 0].unique())


def test_paths_from_lists_and_numpy():
    paths = [[2, 0], [1, 3], [1, 1]]
    for given_paths in (paths, np.array(paths, dtype=np.int32), torch.tensor(paths, dtype=torch.int16)):
        trie = Trie(given_paths)
        assert trie.item_of(torch.tensor([walk(trie, p) for p in paths])).tolist() == [0, 1, 2]


@needs_extension
@settings(max_examples=60, deadline=None)
@given(num_items=st.integers(1, 400), depth=st.integers(1, 5), codes=st.sampled_from([1, 2, 3, 17, 256, 2**40]),
       seed=st.integers(0, 2**16))
def test_compiled_builder_equals_twin(num_items, depth, codes, seed):
    paths = random_paths(num_items, depth, codes, seed)
    for compiled, twin in zip(torch.ops.sparserec.trie_build(paths), build_trie_csr(paths)):
        assert torch.equal(compiled, twin)


@needs_extension
def test_compiled_builder_resolves_columns_beyond_64_bits():
    # Tokens up to 2^40 need 41 bits per column: only the first column packs into the sort key.
    paths = random_paths(500, 3, 2**40, seed=1)
    paths[:, 0] = paths[:, 0] % 2  # many rows tie on the packed column
    for compiled, twin in zip(torch.ops.sparserec.trie_build(paths), build_trie_csr(paths)):
        assert torch.equal(compiled, twin)


def test_save_load_roundtrip(tmp_path):
    trie = Trie(random_paths(200, 3, 8, seed=3))
    trie.save(tmp_path / "trie.pt")
    loaded = Trie.load(tmp_path / "trie.pt")
    for name in ("child_ptr", "node_token", "leaf_item", "level_start"):
        assert torch.equal(getattr(loaded, name), getattr(trie, name))
    assert (loaded.depth, loaded.max_fanout, loaded.vocab_size) == (trie.depth, trie.max_fanout, trie.vocab_size)


@pytest.mark.parametrize("builder", ["compiled", "twin"])
def test_bad_paths(builder, monkeypatch):
    if builder == "compiled" and not has_extension():
        pytest.skip(f"sparserec._C is not built: {EXTENSION_ERROR}")
    if builder == "twin":
        monkeypatch.setattr(ops_trie, "_compiled_kernel_serves", lambda op, device: False)
    with pytest.raises(ValueError, match="items 0 and 2 have the same path"):
        Trie([[1, 2], [0, 0], [1, 2]])
    with pytest.raises(ValueError, match="non-negative token ids, got -3 at item 1, level 0"):
        Trie([[1, 2], [-3, 0]])
    with pytest.raises(ValueError, match="same depth"):
        Trie([[1, 2], [3]])
    with pytest.raises(ValueError, match="same depth"):
        Trie(torch.arange(4))
    with pytest.raises(ValueError, match="at least one item"):
        Trie(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one item"):
        Trie(torch.zeros(3, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        Trie([[1.5, 2.0]])


# ---------------------------------------------------------------------------------------- the step


def test_step_takes_the_best_valid_children():
    # Items: (0,1) (0,2) (1,0) (2,2); two beams at node "0" and node "1".
    trie = Trie([[0, 1], [0, 2], [1, 0], [2, 2]])
    node_0, node_1 = walk(trie, [0]), walk(trie, [1])
    log_probs = torch.tensor([[[-9.0, -1.0, -2.0], [-0.5, -9.0, -9.0]]])
    scores, parents, tokens, nodes = trie_beam_step(
        log_probs, torch.tensor([[0.0, -1.0]]), torch.tensor([[node_0, node_1]]), trie, beam_size=4)
    assert scores.tolist() == [[-1.0, -1.5, -2.0, NEG_INF]]
    assert parents.tolist() == [[0, 1, 0, -1]] and tokens.tolist() == [[1, 0, 2, -1]]
    assert trie.item_of(nodes).tolist() == [[0, 2, 1, -1]]


def test_ties_go_to_the_lower_parent_then_the_lower_token():
    trie = Trie([[a, b] for a in range(3) for b in range(3)])
    log_probs = torch.zeros(1, 3, 3)
    nodes = torch.tensor([[walk(trie, [2]), walk(trie, [0]), walk(trie, [1])]])
    scores, parents, tokens, _ = trie_beam_step(log_probs, torch.zeros(1, 3), nodes, trie, beam_size=5)
    assert parents.tolist() == [[0, 0, 0, 1, 1]] and tokens.tolist() == [[0, 1, 2, 0, 1]]
    assert scores.eq(0).all()


def test_dead_beams_and_minus_inf_children_contribute_nothing():
    trie = Trie([[0], [1], [2]])
    log_probs = torch.tensor([[[NEG_INF, -1.0, -2.0], [0.0, 0.0, 0.0]]])
    scores, parents, tokens, _ = trie_beam_step(log_probs, torch.tensor([[0.0, NEG_INF]]),
                                                torch.zeros(1, 2, dtype=torch.long), trie, beam_size=3)
    assert scores.tolist() == [[-1.0, -2.0, NEG_INF]]
    assert parents.tolist() == [[0, 0, -1]] and tokens.tolist() == [[1, 2, -1]]


def test_normalize_renormalises_over_valid_children():
    trie = Trie([[0], [2]])
    log_probs = torch.tensor([[[0.3, 0.5, 0.2]]]).log()
    scores, _, tokens, _ = trie_beam_step(log_probs, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long),
                                          trie, beam_size=2, normalize=True)
    assert tokens.tolist() == [[0, 2]]
    torch.testing.assert_close(scores.exp(), torch.tensor([[0.6, 0.4]]))


def test_leaves_have_no_children():
    trie = Trie([[0, 1], [1, 1]])
    leaf = walk(trie, [0, 1])
    scores, parents, _, _ = trie_beam_step(torch.zeros(1, 1, 2), torch.zeros(1, 1), torch.tensor([[leaf]]), trie, 2)
    assert scores.eq(NEG_INF).all() and parents.eq(-1).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_fanout_bound_does_not_change_results(normalize):
    trie = Trie(random_paths(300, 3, 7, seed=5))
    args = random_step_inputs(trie, batch=3, beams=6, seed=5)
    tight = reference_step(*args, trie.child_ptr, trie.node_token, 8, normalize, max_fanout=max(trie.max_fanout))
    loose = reference_step(*args, trie.child_ptr, trie.node_token, 8, normalize, max_fanout=3 * max(trie.max_fanout))
    for a, b in zip(tight, loose):
        assert torch.equal(a, b)


step_cases = dict(num_items=st.integers(1, 300), depth=st.integers(1, 4), codes=st.integers(1, 12),
                  batch=st.integers(1, 4), beams=st.integers(1, 7), beam_size=st.integers(1, 12),
                  extra_vocab=st.integers(0, 3), ties=st.booleans(), seed=st.integers(0, 2**16))


@needs_extension
@settings(max_examples=150, deadline=None)
@given(**step_cases)
def test_cpu_kernel_equals_reference(num_items, depth, codes, batch, beams, beam_size, extra_vocab, ties, seed):
    trie = Trie(random_paths(num_items, depth, codes, seed))
    args = random_step_inputs(trie, batch, beams, seed, extra_vocab, ties)
    compiled = torch.ops.sparserec.trie_beam_step(*args, trie.child_ptr, trie.node_token, beam_size, False)
    expected = reference_step(*args, trie.child_ptr, trie.node_token, beam_size)
    for a, b in zip(compiled, expected):
        assert torch.equal(a, b)
    # normalize: the log-sum-exp is summed in another order, so scores agree to rounding.
    compiled = torch.ops.sparserec.trie_beam_step(*args, trie.child_ptr, trie.node_token, beam_size, True)
    expected = reference_step(*args, trie.child_ptr, trie.node_token, beam_size, normalize=True)
    torch.testing.assert_close(compiled[0], expected[0])
    if not ties:
        for a, b in zip(compiled[1:], expected[1:]):
            assert torch.equal(a, b)


def test_fallback_without_kernels_equals_reference(monkeypatch):
    trie = Trie(random_paths(300, 3, 9, seed=2))
    args = random_step_inputs(trie, batch=2, beams=5, seed=2)
    monkeypatch.setattr(ops_trie, "_compiled_kernel_serves", lambda op, device: False)
    for a, b in zip(trie_beam_step(*args, trie, 6), reference_step(*args, trie.child_ptr, trie.node_token, 6)):
        assert torch.equal(a, b)


@needs_extension
def test_opcheck():
    trie = Trie(random_paths(200, 3, 6, seed=4))
    for normalize in (False, True):
        args = random_step_inputs(trie, batch=3, beams=4, seed=4)
        torch.library.opcheck(torch.ops.sparserec.trie_beam_step.default,
                              (*args, trie.child_ptr, trie.node_token, 5, normalize))
    torch.library.opcheck(torch.ops.sparserec.trie_build.default, (random_paths(50, 3, 4, seed=4),))


@needs_extension
def test_fake_tensors_give_output_shapes():
    trie = Trie(random_paths(100, 3, 6, seed=6))
    with FakeTensorMode() as mode:
        log_probs = mode.from_tensor(torch.zeros(5, 4, trie.vocab_size))
        scores = mode.from_tensor(torch.zeros(5, 4))
        nodes = mode.from_tensor(torch.zeros(5, 4, dtype=torch.long))
        outputs = torch.ops.sparserec.trie_beam_step(
            log_probs, scores, nodes, mode.from_tensor(trie.child_ptr), mode.from_tensor(trie.node_token), 7, False)
    assert [tuple(t.shape) for t in outputs] == [(5, 7)] * 4
    assert [t.dtype for t in outputs] == [torch.float32] + [torch.int64] * 3


def test_bad_step_inputs():
    trie = Trie([[0, 1], [1, 2]])
    log_probs, scores, nodes = torch.zeros(2, 3, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="log_probs must have 3 dimensions"):
        trie_beam_step(log_probs[0], scores, nodes, trie, 2)
    with pytest.raises(TypeError, match="log_probs must have dtype"):
        trie_beam_step(log_probs.double(), scores, nodes, trie, 2)
    with pytest.raises(TypeError, match="nodes must have dtype"):
        trie_beam_step(log_probs, scores, nodes.int(), trie, 2)
    with pytest.raises(ValueError, match=r"must be \(B, K\) = \(2, 3\)"):
        trie_beam_step(log_probs, scores[:, :2], nodes, trie, 2)
    with pytest.raises(ValueError, match="V=2 columns, but the trie uses tokens up to 2"):
        trie_beam_step(log_probs[..., :2], scores, nodes, trie, 2)
    with pytest.raises(TypeError, match="trie must be a sparserec.generate.Trie"):
        trie_beam_step(log_probs, scores, nodes, trie.child_ptr, 2)
    for beam_size in (0, True, 2.0):
        with pytest.raises(ValueError, match="beam_size must be a positive int"):
            trie_beam_step(log_probs, scores, nodes, trie, beam_size)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        trie_beam_step(log_probs, scores, nodes, trie, 2, normalize=1)
    with pytest.raises(ValueError, match="one device"):
        trie_beam_step(log_probs.to("meta"), scores.to("meta"), nodes.to("meta"), trie, 2)


@needs_extension
def test_raw_op_checks_its_inputs():
    trie = Trie([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="beam_scores must be"):
        torch.ops.sparserec.trie_beam_step(torch.zeros(2, 3, 3), torch.zeros(3), torch.zeros(2, 3, dtype=torch.long),
                                           trie.child_ptr, trie.node_token, 2, False)
    with pytest.raises(ValueError, match="beam_size must be positive"):
        torch.ops.sparserec.trie_beam_step(torch.zeros(2, 3, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long),
                                           trie.child_ptr, trie.node_token, 0, False)


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
@settings(max_examples=100, deadline=None)
@given(**step_cases)
def test_cuda_kernel_equals_cpu(num_items, depth, codes, batch, beams, beam_size, extra_vocab, ties, seed):
    trie = Trie(random_paths(num_items, depth, codes, seed))
    args = random_step_inputs(trie, batch, beams, seed, extra_vocab, ties)
    cuda_trie = trie.to("cuda")
    for normalize in (False, True):
        on_cpu = trie_beam_step(*args, trie, beam_size, normalize)
        on_cuda = trie_beam_step(*(t.cuda() for t in args), cuda_trie, beam_size, normalize)
        if normalize:  # expf/logf and the warp's summation order differ from the CPU's
            torch.testing.assert_close(on_cuda[0].cpu(), on_cpu[0])
            if ties:
                continue
        for a, b in zip(on_cuda[int(normalize):], on_cpu[int(normalize):]):
            assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("beams,beam_size", [(1, 1), (50, 50), (100, 300), (1024, 1024)])
def test_cuda_kernel_large_rows(beams, beam_size):
    # Many candidates per row: the shared buffer fills and is cut back many times.
    trie = Trie(random_paths(20000, 3, 64, seed=beams))
    args = random_step_inputs(trie, batch=3, beams=beams, seed=beams)
    nodes = torch.randint(0, trie.level_start[2].item(), (3, beams))  # roots' children: fan-out 64
    args = (args[0], args[1], nodes)
    on_cpu = trie_beam_step(*args, trie, beam_size)
    on_cuda = trie_beam_step(*(t.cuda() for t in args), trie.to("cuda"), beam_size)
    for a, b in zip(on_cuda, on_cpu):
        assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
@needs_cuda
def test_cuda_step_is_graph_capturable():
    trie = Trie(random_paths(5000, 3, 32, seed=8)).to("cuda")
    log_probs, scores, nodes = (t.cuda() for t in random_step_inputs(trie, batch=4, beams=8, seed=8))
    expected = trie_beam_step(log_probs, scores, nodes, trie, 8)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = trie_beam_step(log_probs, scores, nodes, trie, 8)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- arrays from outside the builder

ARRAY_NAMES = ("child_ptr", "node_token", "leaf_item", "level_start")


def arrays_of(trie):
    return [getattr(trie, name).clone() for name in ARRAY_NAMES]


def test_from_arrays_accepts_every_built_trie():
    for seed, (num_items, depth, codes) in enumerate([(1, 1, 3), (5, 1, 9), (60, 3, 4), (400, 4, 7)]):
        trie = Trie(random_paths(num_items, depth, codes, seed))
        again = Trie.from_arrays(*arrays_of(trie))
        assert (again.depth, again.num_items, again.max_fanout) == (trie.depth, trie.num_items, trie.max_fanout)


@pytest.mark.parametrize("name,index,value,message", [
    ("child_ptr", 0, 2, "children of level 0"),
    ("child_ptr", 3, 10**12, "non-decreasing"),
    ("child_ptr", 3, -7, "non-decreasing"),
    ("child_ptr", -1, 99, "children of level"),
    ("node_token", 0, 5, "the root"),
    ("node_token", 2, -4, "non-negative"),
    ("node_token", 2, 0, "ascending order"),
    ("leaf_item", 0, 1, "permutation"),
    ("leaf_item", 0, -1, "permutation"),
    ("level_start", 1, 2, "start 0, 1"),
    ("level_start", 2, 1, "strictly increasing"),
])
def test_from_arrays_names_the_broken_invariant(name, index, value, message):
    trie = Trie([[0, 1], [0, 2], [1, 0], [2, 2]])  # node 1 has children 4, 5 (tokens 1, 2)
    arrays = dict(zip(ARRAY_NAMES, arrays_of(trie)))
    arrays[name][index] = value
    with pytest.raises(ValueError, match=message):
        Trie.from_arrays(*arrays.values())


def test_from_arrays_checks_types_and_shapes():
    trie = Trie([[0, 1], [1, 2]])
    arrays = arrays_of(trie)
    with pytest.raises(TypeError, match="child_ptr must be int64"):
        Trie.from_arrays(arrays[0].int(), *arrays[1:])
    with pytest.raises(TypeError, match="node_token must be a torch.Tensor"):
        Trie.from_arrays(arrays[0], arrays[1].tolist(), *arrays[2:])
    with pytest.raises(ValueError, match="leaf_item must be 1-D"):
        Trie.from_arrays(*arrays[:2], arrays[2][None], arrays[3])
    with pytest.raises(ValueError, match="child_ptr must hold num_nodes"):
        Trie.from_arrays(arrays[0][:-1], *arrays[1:])
    with pytest.raises(ValueError, match="level_start must hold depth"):
        Trie.from_arrays(*arrays[:3], arrays[3][:2])
    with pytest.raises(ValueError, match="one item per leaf"):
        Trie.from_arrays(*arrays[:2], arrays[2][:1], arrays[3])


@settings(max_examples=200, deadline=None)
@given(num_items=st.integers(1, 60), depth=st.integers(1, 3), codes=st.integers(1, 6), seed=st.integers(0, 2**16),
       edits=st.lists(st.tuples(st.sampled_from(ARRAY_NAMES), st.integers(0, 10**6), st.integers(-3, 80)),
                      min_size=1, max_size=3))
def test_corrupted_arrays_are_refused_or_safe(num_items, depth, codes, seed, edits):
    """Random edits of a valid trie's arrays: either a ValueError, or a trie on which every item
    path still leads to its leaf and the step runs (compiled equal to the reference)."""
    trie = Trie(random_paths(num_items, depth, codes, seed))
    arrays = dict(zip(ARRAY_NAMES, arrays_of(trie)))
    for name, index, value in edits:
        arrays[name][index % arrays[name].numel()] = value
    try:
        edited = Trie.from_arrays(*arrays.values())
    except ValueError:
        return
    # Accepted: the arrays are a valid trie (possibly of other paths); walk every leaf back up.
    for leaf in range(edited.first_leaf, edited.num_nodes):
        walk(edited, _path_to(edited, leaf))
    args = random_step_inputs(edited, batch=2, beams=3, seed=seed)
    result = trie_beam_step(*args, edited, 4)
    expected = reference_step(*args, edited.child_ptr, edited.node_token, 4)
    for a, b in zip(result, expected):
        assert torch.equal(a, b)


def _path_to(trie, node):
    """The tokens from the root to `node`, found by searching each parent's run."""
    path = []
    while node != 0:
        parent = int(torch.searchsorted(trie.child_ptr, torch.tensor(node), right=True)) - 1
        assert trie.child_ptr[parent] <= node < trie.child_ptr[parent + 1]
        path.append(int(trie.node_token[node]))
        node = parent
    return path[::-1]


@needs_extension
@settings(max_examples=200, deadline=None)
@given(num_nodes=st.integers(1, 12), vocab=st.integers(1, 6), beams=st.integers(1, 4), beam_size=st.integers(1, 6),
       normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_raw_kernel_never_reads_out_of_bounds(num_nodes, vocab, beams, beam_size, normalize, seed):
    """Arbitrary CSR arrays straight into the raw op (no Trie checks): no crash, and the result
    equals the reference, which drops child runs outside [0, num_nodes] the same way."""
    gen = torch.Generator().manual_seed(seed)
    child_ptr = torch.randint(-3, num_nodes + 4, (num_nodes + 1,), generator=gen)
    node_token = torch.randint(-2, vocab + 2, (num_nodes,), generator=gen)
    log_probs = torch.randn(2, beams, vocab, generator=gen)
    scores = torch.zeros(2, beams)
    nodes = torch.randint(-1, num_nodes + 2, (2, beams), generator=gen)
    compiled = torch.ops.sparserec.trie_beam_step(log_probs, scores, nodes, child_ptr, node_token, beam_size,
                                                  normalize)
    expected = reference_step(log_probs, scores, nodes, child_ptr, node_token, beam_size, normalize,
                              max_fanout=num_nodes + 8)
    torch.testing.assert_close(compiled[0], expected[0])
    for a, b in zip(compiled[1:], expected[1:]):
        assert torch.equal(a, b)


def test_load_names_a_broken_file(tmp_path):
    trie = Trie(random_paths(50, 3, 5, seed=9))
    path = tmp_path / "trie.pt"
    trie.save(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=f"{path} cannot be read as a trie"):
        Trie.load(path)
    with pytest.raises(ValueError, match="trie file not found"):
        Trie.load(tmp_path / "missing.pt")
    torch.save({"child_ptr": trie.child_ptr}, path)
    with pytest.raises(ValueError, match="is not a saved Trie"):
        Trie.load(path)
    arrays = {name: getattr(trie, name).clone() for name in ARRAY_NAMES}
    arrays["child_ptr"][2] = 10**9  # what used to segfault the C++ step
    torch.save(arrays, path)
    with pytest.raises(ValueError, match=f"{path}: child_ptr must be non-decreasing"):
        Trie.load(path)


def test_misleading_messages_fixed():
    with pytest.raises(ValueError, match="at least one item"):
        Trie([])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trie([[0, 1]], device="cuda")
    with pytest.raises(ValueError, match="device must be a torch device"):
        Trie([[0, 1]], device="tpu9")


def test_huge_beam_size_is_refused_before_allocating():
    trie = Trie(random_paths(50, 2, 9, seed=1))
    log_probs, scores, nodes = torch.zeros(1, 2, trie.vocab_size), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=f"beam_size=1000000000 is larger than the trie's {trie.num_items} items"):
        trie_beam_step(log_probs, scores, nodes, trie, 10**9)
    assert trie_beam_step(log_probs, scores, nodes, trie, ops_trie.MAX_PADDED_BEAMS)[0].shape == (1, 1024)
    if has_extension():
        with pytest.raises(ValueError, match="beam_size=1000000000 is larger"):
            torch.ops.sparserec.trie_beam_step(log_probs, scores, nodes, trie.child_ptr, trie.node_token, 10**9, False)


@pytest.mark.gpu
@needs_cuda
@settings(max_examples=100, deadline=None)
@given(num_nodes=st.integers(1, 12), vocab=st.integers(1, 6), beams=st.integers(1, 4), beam_size=st.integers(1, 6),
       normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_raw_cuda_kernel_never_reads_out_of_bounds(num_nodes, vocab, beams, beam_size, normalize, seed):
    """As test_raw_kernel_never_reads_out_of_bounds, on the CUDA kernel against the CPU one (run it
    under `make gpu-sanitize` to have memcheck confirm no out-of-bounds access)."""
    gen = torch.Generator().manual_seed(seed)
    child_ptr = torch.randint(-3, num_nodes + 4, (num_nodes + 1,), generator=gen)
    node_token = torch.randint(-2, vocab + 2, (num_nodes,), generator=gen)
    args = (torch.randn(2, beams, vocab, generator=gen), torch.zeros(2, beams),
            torch.randint(-1, num_nodes + 2, (2, beams), generator=gen), child_ptr, node_token)
    on_cpu = torch.ops.sparserec.trie_beam_step(*args, beam_size, normalize)
    on_cuda = torch.ops.sparserec.trie_beam_step(*(t.cuda() for t in args), beam_size, normalize)
    torch.testing.assert_close(on_cuda[0].cpu(), on_cpu[0])
    for a, b in zip(on_cuda[1:], on_cpu[1:]):
        assert torch.equal(a.cpu(), b)
