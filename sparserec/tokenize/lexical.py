"""GRAM's semantic-to-lexical item IDs (arXiv 2506.01673): a path of words per item.

Hierarchical k-means over item embeddings: the root holds every item; a cluster of at least
`max_cluster` (c) items whose depth is below `max_depth` (l) is split into `branching` clusters,
recursively. The items of a leaf cluster then become its children, one node each. Every node is
named by the word of its items' text with the highest TF-IDF against its siblings (each sibling's
words are one document), so an item's ID reads like "nail-polish-red" and shares its tokens with
the item text the model also reads.

Names are unique among siblings, so paths are unique: siblings choose in descending order of their
best score, each taking its highest-scoring word no earlier sibling took; a node left without an
untaken word (or with no word at all) takes its best word with a deterministic suffix ("red~2").
`stats` counts both: `collisions` (nodes whose top word a sibling had already taken) and
`suffixed` (nodes that needed the suffix).

    ids = build_lexical_ids(embeddings, item_words(data.items.text), LexicalConfig(max_cluster=20))
    ids.names[i]   # ("nail", "polish", "red")
    ids.stats      # depth, cluster sizes, collisions, suffixed, vocabulary size
"""
import dataclasses
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

# Field labels of the package's item text ("product type: ... brand: ... keywords: ...") and words too
# common to tell anything apart; neither ever names a node.
LABEL_PATTERN = re.compile(r"\b(product type|brand|keywords|categories|title):")
STOPWORDS = frozenset("""a an and are as at be by for from in is it of on or the to with this that these your you
unknown categories oz fl ml pack count set new""".split())
WORD_PATTERN = re.compile(r"[a-z][a-z0-9]+")
SUFFIX = "~"  # "red~2": the second sibling named red


@dataclass(frozen=True)
class LexicalConfig:
    """max_cluster (c): a cluster of at least c items is split further; max_depth (l): clusters are
    split at most l times along a path (IDs hold at most l + 1 words); branching: clusters per split;
    iterations: Lloyd steps of each k-means; seed: its k-means++ seeding."""

    max_cluster: int = 20
    max_depth: int = 3
    branching: int = 16
    iterations: int = 20
    seed: int = 0

    def __post_init__(self):
        for name, minimum in (("max_cluster", 2), ("max_depth", 1), ("branching", 2), ("iterations", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LexicalIDs:
    """names[i]: item i's ID, a tuple of words (1 to max_depth + 1 of them); stats: see module doc."""

    names: list
    stats: dict

    @property
    def depth(self) -> int:
        return max(len(name) for name in self.names)

    def words(self) -> list:
        """Every word that occurs in an ID, sorted."""
        return sorted({word for name in self.names for word in name})

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.{os.getpid()}.tmp", "w", encoding="utf-8") as file:
            json.dump({"names": [list(name) for name in self.names], "stats": self.stats}, file)
        os.replace(f"{path}.{os.getpid()}.tmp", path)

    @classmethod
    def load(cls, path: str) -> "LexicalIDs":
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
        return cls([tuple(name) for name in state["names"]], state["stats"])


def item_words(texts) -> list:
    """Each text's content words, in order (lower case, no field labels, stopwords or bare numbers)."""
    words = []
    for text in texts:
        text = LABEL_PATTERN.sub(" ", (text or "").lower())
        words.append([word for word in WORD_PATTERN.findall(text) if word not in STOPWORDS])
    return words


def kmeans(vectors: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) int64 cluster of each row: k-means++ seeding, then Lloyd steps (squared distance)."""
    n = vectors.shape[0]
    centers = [vectors[int(torch.randint(n, (1,), generator=generator))]]
    distance = ((vectors - centers[0]) ** 2).sum(1)
    for _ in range(1, clusters):
        if float(distance.sum()) <= 0:  # every row sits on a center already
            break
        centers.append(vectors[int(torch.multinomial(distance, 1, generator=generator))])
        distance = torch.minimum(distance, ((vectors - centers[-1]) ** 2).sum(1))
    centers = torch.stack(centers)
    assignment = torch.cdist(vectors, centers).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centers).index_add_(0, assignment, vectors)
        counts = torch.bincount(assignment, minlength=len(centers)).clamp(min=1)
        centers = torch.where((torch.bincount(assignment, minlength=len(centers)) > 0)[:, None],
                              sums / counts[:, None], centers)
        updated = torch.cdist(vectors, centers).argmin(1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


def name_siblings(documents: list) -> tuple:
    """Names of sibling nodes (each document: the list of words of the node's items), unique among
    them, and (collisions, suffixed) counts (module doc)."""
    counts = [Counter(words) for words in documents]
    frequency = Counter(word for count in counts for word in count)
    siblings = len(documents)
    ranked = []  # per node: (score, word) best first
    for count in counts:
        total = sum(count.values())
        scores = [((c / total) * (math.log((1 + siblings) / (1 + frequency[word])) + 1), word)
                  for word, c in count.items()]
        ranked.append(sorted(scores, key=lambda pair: (-pair[0], pair[1])))
    order = sorted(range(siblings), key=lambda node: (-(ranked[node][0][0] if ranked[node] else 0.0), node))
    names, taken = [None] * siblings, set()
    collisions = suffixed = 0
    for node in order:
        choices = [word for _, word in ranked[node]]
        if choices and choices[0] in taken:
            collisions += 1
        name = next((word for word in choices if word not in taken), None)
        if name is None:
            base = choices[0] if choices else "item"
            suffix = 2
            while f"{base}{SUFFIX}{suffix}" in taken:
                suffix += 1
            name = f"{base}{SUFFIX}{suffix}"
            suffixed += 1
        names[node] = name
        taken.add(name)
    return names, collisions, suffixed


def build_lexical_ids(embeddings: torch.Tensor, words: list, config: LexicalConfig = LexicalConfig()) -> LexicalIDs:
    """LexicalIDs of items with `embeddings` (n, d) and `words` (n lists of words, `item_words`)."""
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    if embeddings.dim() != 2 or embeddings.shape[0] != len(words) or embeddings.shape[0] < 1:
        raise ValueError(f"embeddings must be (num_items, d) with one row per item's words ({len(words)}), "
                         f"got {tuple(embeddings.shape)}")
    generator = torch.Generator().manual_seed(config.seed)
    names = [[] for _ in words]
    collisions = suffixed = 0
    leaf_sizes, clusters_per_level = [], Counter()
    # Breadth-first over clusters: (item indices, depth). The children of each split are named together.
    frontier = [(np.arange(len(words)), 0)]
    while frontier:
        members, depth = frontier.pop(0)
        if len(members) >= config.max_cluster and depth < config.max_depth:
            assignment = kmeans(embeddings[members], min(config.branching, len(members)), config.iterations,
                                generator).numpy()
            groups = [members[assignment == cluster] for cluster in np.unique(assignment)]
            if len(groups) > 1:  # identical embeddings cannot be split: the cluster stays a leaf
                labels, clashed, added = name_siblings([sum((words[i] for i in group), []) for group in groups])
                collisions, suffixed = collisions + clashed, suffixed + added
                clusters_per_level[depth + 1] += len(groups)
                for group, label in zip(groups, labels):
                    for item in group:
                        names[item].append(label)
                    frontier.append((group, depth + 1))
                continue
        # A leaf cluster: its items are its children.
        leaf_sizes.append(len(members))
        labels, clashed, added = name_siblings([words[i] for i in members])
        collisions, suffixed = collisions + clashed, suffixed + added
        for item, label in zip(members, labels):
            names[item].append(label)
    names = [tuple(name) for name in names]
    lengths = np.array([len(name) for name in names])
    sizes = np.array(leaf_sizes)
    stats = {"items": len(names), "unique": len(set(names)) == len(names), "max_depth": int(lengths.max()),
             "mean_depth": float(lengths.mean()), "depth_counts": {int(d): int((lengths == d).sum())
                                                                    for d in np.unique(lengths)},
             "clusters_per_level": {int(level): count for level, count in sorted(clusters_per_level.items())},
             "leaf_clusters": len(sizes), "leaf_size_mean": float(sizes.mean()), "leaf_size_max": int(sizes.max()),
             "leaf_size_min": int(sizes.min()), "collisions": collisions, "suffixed": suffixed,
             "id_words": len({word for name in names for word in name})}
    return LexicalIDs(names, stats)


def cached_lexical_ids(data, config: LexicalConfig, embedding: str = "text", train_end=None, cache_dir=None,
                       progress: bool = True) -> LexicalIDs:
    """`build_lexical_ids` of `data`'s items: embeddings of `embedding` kind (`item_embeddings`:
    "text" is MiniLM over the item text), words of the item text. With `cache_dir`, the IDs (and the
    embeddings, the slow part) are kept there, keyed by the items' text, the kind and the config."""
    from .embeddings import item_embeddings
    digest = hashlib.sha256(json.dumps([embedding, list(data.items.ids), list(data.items.text)]).encode())
    if "collab" in embedding:  # co-occurrence embeddings depend on the events and the split too
        for array in (data.user_ptr, data.item) + (() if train_end is None else (np.asarray(train_end),)):
            digest.update(np.ascontiguousarray(array).tobytes())
    key = digest.hexdigest()[:16]
    ids_key = hashlib.sha256(f"{key}{json.dumps(config.to_dict(), sort_keys=True)}".encode()).hexdigest()[:16]
    ids_path = cache_dir and os.path.join(cache_dir, f"gram-ids-{ids_key}.json")
    if ids_path and os.path.isfile(ids_path):
        return LexicalIDs.load(ids_path)
    embeddings_path = cache_dir and os.path.join(cache_dir, f"gram-embeddings-{key}.pt")
    if embeddings_path and os.path.isfile(embeddings_path):
        embeddings = torch.load(embeddings_path, weights_only=True)
    else:
        embeddings = item_embeddings(data, embedding, train_end, progress=progress)
        if embeddings_path:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(embeddings, f"{embeddings_path}.{os.getpid()}.tmp")
            os.replace(f"{embeddings_path}.{os.getpid()}.tmp", embeddings_path)
    ids = build_lexical_ids(embeddings, item_words(data.items.text), config)
    if ids_path:
        ids.save(ids_path)
    return ids
