"""The trie of every valid item token path, in CSR form on the device (SPEC §4).

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
"""
import torch

from .._ext import has_extension
from ..reference.trie import build_trie_csr

_ARRAYS = ("child_ptr", "node_token", "leaf_item", "level_start")


class Trie:
    """Trie of item token paths. paths: (num_items, depth) integer ids; row i is item i's path.

    Built on the CPU (the compiled builder, else the PyTorch one) and moved to `device`.
    """

    def __init__(self, paths, device=None):
        paths = _checked_paths(paths)
        build = torch.ops.sparserec.trie_build if has_extension() else build_trie_csr
        self._set(*build(paths), device=device)

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
        trie._set(*(getattr(self, name) for name in _ARRAYS), device=device)
        return trie

    def save(self, path) -> None:
        torch.save({name: getattr(self, name).cpu() for name in _ARRAYS}, path)

    @classmethod
    def load(cls, path, device=None) -> "Trie":
        arrays = torch.load(path, map_location="cpu", weights_only=True)
        trie = cls.__new__(cls)
        trie._set(*(arrays[name] for name in _ARRAYS), device=device)
        return trie

    def __repr__(self) -> str:
        return (f"Trie(num_items={self.num_items}, depth={self.depth}, num_nodes={self.num_nodes}, "
                f"max_fanout={self.max_fanout}, device={self.device})")


def _checked_paths(paths) -> torch.Tensor:
    if not isinstance(paths, torch.Tensor):
        try:
            paths = torch.as_tensor(paths)
        except (ValueError, TypeError) as error:
            raise ValueError("paths must be a (num_items, depth) array of token ids, every item's path of "
                             f"the same depth (pad or add tokens to make them equal): {error}") from None
    if paths.dtype.is_floating_point or paths.dtype.is_complex or paths.dtype == torch.bool:
        raise TypeError(f"paths must hold integer token ids, got {paths.dtype}")
    if paths.dim() != 2:
        raise ValueError("paths must be 2-D (num_items, depth), every item's path of the same depth, "
                         f"got shape {tuple(paths.shape)}")
    if paths.shape[0] == 0 or paths.shape[1] == 0:
        raise ValueError(f"paths must hold at least one item of depth >= 1, got shape {tuple(paths.shape)}")
    return paths.to(device="cpu", dtype=torch.long)  # the builders check the values
