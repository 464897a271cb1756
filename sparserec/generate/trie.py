"""The trie of every valid item token path, in CSR form on the device (SPEC §4): the data structure.

Its op (`sparserec.ops.trie_build`, `sparserec.ops.trie_beam_step`) and their PyTorch reference
(`sparserec.reference.trie`) live with the other ops; this module builds on them, never the other
way round.

Layout (all int64):
  child_ptr (num_nodes + 1,)  children of node n are the nodes child_ptr[n]:child_ptr[n+1]
  node_token (num_nodes,)     the token on the edge into each node (-1 for the root, node 0)
  leaf_item (num_items,)      item id of leaf node level_start[depth] + i
  level_start (depth + 2,)    nodes holding column l's tokens: level_start[l+1]:level_start[l+2]

Nodes are numbered level by level in the sorted order of their paths, so a node's children are one
contiguous, token-sorted run and no child-index array is needed. Every path has the same depth,
so every leaf is an item and every item a leaf. The compiled kernels read the children of any
node as one contiguous run, so no dense child table is kept: for the root it would hold the same
run (nodes 1..level_start[2]) indexed by token.

Arrays that do not come from the builder (`Trie.load`, `Trie.from_arrays`) are checked against
every invariant above (`check_trie_arrays`) before any kernel reads them.
"""
import os

import torch

from ..ops.trie import trie_build

_ARRAYS = ("child_ptr", "node_token", "leaf_item", "level_start")


class Trie:
    """Trie of item token paths. paths: (num_items, depth) integer ids; row i is item i's path.

    Built on the CPU (the compiled builder, else the PyTorch one) and moved to `device`.
    """

    def __init__(self, paths, device=None):
        device = _checked_device(device)
        self._set(*trie_build(_checked_paths(paths)), device=device)

    @classmethod
    def from_arrays(cls, child_ptr, node_token, leaf_item, level_start, device=None) -> "Trie":
        """A trie of given CSR arrays, checked first (ValueError/TypeError naming the broken invariant)."""
        device = _checked_device(device)
        arrays = check_trie_arrays(child_ptr, node_token, leaf_item, level_start)
        trie = cls.__new__(cls)
        trie._set(*arrays, device=device)
        return trie

    def _set(self, child_ptr, node_token, leaf_item, level_start, device):
        device = torch.device("cpu") if device is None else torch.device(device)
        self.child_ptr = child_ptr.to(device)
        self.node_token = node_token.to(device)
        self.leaf_item = leaf_item.to(device)
        self.level_start = level_start.to(device)
        # Static facts, kept on the host so that using them never synchronises with the device.
        starts = level_start.tolist()
        self.depth = len(starts) - 2
        self.num_items = leaf_item.numel()
        self.num_nodes = node_token.numel()
        self.first_leaf = starts[self.depth]
        self.vocab_size = int(node_token.max()) + 1  # log-probs need at least this many columns
        fanout = child_ptr[1:] - child_ptr[:-1]
        self.max_fanout = tuple(int(fanout[starts[level]:starts[level + 1]].max()) for level in range(self.depth))

    @property
    def device(self) -> torch.device:
        return self.child_ptr.device

    def item_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """Item id of each node (any shape); -1 for a node that is not a leaf, or not a node."""
        is_leaf = (nodes >= self.first_leaf) & (nodes < self.num_nodes)
        leaf = torch.where(is_leaf, nodes - self.first_leaf, 0)
        return torch.where(is_leaf, self.leaf_item[leaf], -1)

    def to(self, device) -> "Trie":
        trie = Trie.__new__(Trie)
        trie._set(*(getattr(self, name) for name in _ARRAYS), device=_checked_device(device))
        return trie

    def save(self, path) -> None:
        torch.save({name: getattr(self, name).cpu() for name in _ARRAYS}, path)

    @classmethod
    def load(cls, path, device=None) -> "Trie":
        """A trie saved by `save`; a missing, truncated or inconsistent file is a ValueError naming it."""
        if not os.path.isfile(path):
            raise ValueError(f"trie file not found: {path}")
        try:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises RuntimeError, EOFError, pickle errors ...
            raise ValueError(f"{path} cannot be read as a trie (truncated or corrupt?): "
                             f"{type(error).__name__}: {error}") from None
        if not isinstance(arrays, dict) or any(name not in arrays for name in _ARRAYS):
            raise ValueError(f"{path} is not a saved Trie: expected a dict of {list(_ARRAYS)}")
        try:
            return cls.from_arrays(*(arrays[name] for name in _ARRAYS), device=device)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{path}: {error}") from None

    def __repr__(self) -> str:
        return (f"Trie(num_items={self.num_items}, depth={self.depth}, num_nodes={self.num_nodes}, "
                f"max_fanout={self.max_fanout}, device={self.device})")


def check_trie_arrays(child_ptr, node_token, leaf_item, level_start):
    """The four CSR arrays, checked against every invariant of the layout, as CPU int64 tensors.

    These are what make the kernels' reads safe: offsets monotone and in bounds, each level's
    children exactly the next level, tokens distinct and sorted within each run, leaves childless,
    leaf_item a permutation of the items.
    """
    arrays = {}
    for name, array in zip(_ARRAYS, (child_ptr, node_token, leaf_item, level_start)):
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(array).__name__}")
        if array.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {array.dtype}")
        if array.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
        arrays[name] = array.detach().to("cpu").contiguous()
    child_ptr, node_token, leaf_item, level_start = (arrays[name] for name in _ARRAYS)

    num_nodes = node_token.numel()
    if level_start.numel() < 3:
        raise ValueError(f"level_start must hold depth + 2 >= 3 entries, got {level_start.numel()}")
    depth = level_start.numel() - 2
    if level_start[0] != 0 or level_start[1] != 1 or level_start[-1] != num_nodes:
        raise ValueError(f"level_start must start 0, 1 (the root) and end at num_nodes = {num_nodes}, got "
                         f"{level_start.tolist()[:4]}...{level_start[-1].item()}")
    if not bool((level_start[1:] > level_start[:-1]).all()):
        raise ValueError(f"level_start must be strictly increasing (every level holds a node), got {level_start.tolist()}")
    if child_ptr.numel() != num_nodes + 1:
        raise ValueError(f"child_ptr must hold num_nodes + 1 = {num_nodes + 1} entries, got {child_ptr.numel()}")
    if not bool((child_ptr[1:] >= child_ptr[:-1]).all()):
        at = int((child_ptr[1:] < child_ptr[:-1]).nonzero()[0])
        raise ValueError(f"child_ptr must be non-decreasing, but child_ptr[{at}] = {int(child_ptr[at])} > "
                         f"child_ptr[{at + 1}] = {int(child_ptr[at + 1])}")
    first_leaf = int(level_start[depth])
    for level in range(depth + 1):
        begin, end = int(level_start[level]), int(level_start[level + 1])
        expected = (int(level_start[level + 1]), int(level_start[level + 2])) if level < depth else (num_nodes, num_nodes)
        if (int(child_ptr[begin]), int(child_ptr[end])) != expected:
            raise ValueError(f"the children of level {level}'s nodes {begin}..{end - 1} must be the nodes "
                             f"{expected[0]}..{expected[1] - 1}, but child_ptr gives {int(child_ptr[begin])}.."
                             f"{int(child_ptr[end]) - 1}")
    inner = child_ptr[1:first_leaf + 1] - child_ptr[:first_leaf]
    if first_leaf and not bool((inner > 0).all()):
        raise ValueError(f"node {int((inner <= 0).nonzero()[0])} is not a leaf but has no children "
                         "(every path must reach the last level)")
    if node_token[0] != -1:
        raise ValueError(f"node_token[0] (the root) must be -1, got {int(node_token[0])}")
    if num_nodes > 1 and not bool((node_token[1:] >= 0).all()):
        at = 1 + int((node_token[1:] < 0).nonzero()[0])
        raise ValueError(f"node_token must be non-negative below the root, got {int(node_token[at])} at node {at}")
    # Within a run the tokens rise strictly: node n + 1 is n's sibling unless a new run starts at it.
    starts_run = torch.zeros(num_nodes, dtype=torch.bool)
    starts_run[child_ptr[:first_leaf]] = True
    same_run = ~starts_run[2:]
    if not bool((node_token[2:][same_run] > node_token[1:-1][same_run]).all()):
        at = 2 + int((same_run & (node_token[2:] <= node_token[1:-1])).nonzero()[0])
        raise ValueError(f"children must have distinct tokens in ascending order, but node {at} has token "
                         f"{int(node_token[at])} after its sibling's {int(node_token[at - 1])}")
    num_leaves = num_nodes - first_leaf
    if leaf_item.numel() != num_leaves:
        raise ValueError(f"leaf_item must hold one item per leaf ({num_leaves}), got {leaf_item.numel()}")
    if not torch.equal(torch.sort(leaf_item).values, torch.arange(num_leaves)):
        raise ValueError(f"leaf_item must be a permutation of the item ids 0..{num_leaves - 1}")
    return child_ptr, node_token, leaf_item, level_start


def _checked_device(device):
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device or its name, got {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (use device='cpu', or "
                         "device='cuda' if torch.cuda.is_available() else 'cpu')")
    return device


def _checked_paths(paths) -> torch.Tensor:
    if not isinstance(paths, torch.Tensor):
        try:
            paths = torch.as_tensor(paths)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError("paths must be a (num_items, depth) array of token ids, every item's path of "
                             f"the same depth (pad or add tokens to make them equal): {error}") from None
    if paths.numel() == 0:
        raise ValueError(f"paths must hold at least one item of depth >= 1, got shape {tuple(paths.shape)}")
    if paths.dtype.is_floating_point or paths.dtype.is_complex or paths.dtype == torch.bool:
        raise TypeError(f"paths must hold integer token ids, got {paths.dtype}")
    if paths.dim() != 2:
        raise ValueError("paths must be 2-D (num_items, depth), every item's path of the same depth, "
                         f"got shape {tuple(paths.shape)}")
    return paths.to(device="cpu", dtype=torch.long)  # the builders check the values
