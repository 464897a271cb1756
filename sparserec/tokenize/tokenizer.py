"""ItemTokenizer: items and interactions as token sequences (SPEC §3), plus the jrn anchors.

Tokens of one interaction, in order (`cot=False` drops the three CoT tokens):

    [behavior] [product type] [price band] [brand] [SID_1] ... [SID_k] [collision]

Anchors (the jrn branch's keys) mark the product-type token of every interaction whose product
type differs from the previous interaction's, and of the first one; with `cot=False` the
behavior token of those interactions. A missing product type is a value of its own (UNK). When the
catalogue has no product types at all (mbht-retail), the journey key is the item's SID_1 code
(its coarsest semantic cluster) instead, so journeys still shift.

`drop_constant=True` leaves out the slots that carry no information on this dataset: the behavior
token when the data has one behavior (Amazon Beauty), and each CoT slot whose value is the same for
every item (Beauty has no prices: its price slot is always UNK). On Beauty that is 6 tokens per
interaction instead of 8: a quarter less encoder work, and a decoder that no longer spends steps
predicting constants. Without a behavior token the decoder target starts at the first CoT (or
SID) token and evaluation gives it no behavior token; the anchor is then the interaction's first
token when the product type is dropped too.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..data.interactions import InteractionData, journey_shifts
from .coba import CoBaConfig, cooccurrence_graph, propagate
from .cot import CoTAttributes, fit_cot_attributes
from .embeddings import item_embeddings
from .rqvae import RQVAEConfig, codebook_clusters, collision_index, train_rqvae
from .vocab import COT_SLOTS, SPECIAL_TOKENS, Vocabulary

CACHE_FORMAT = 2  # 2: fitted in one thread (format-1 caches depended on the thread count)
TOKENIZER_METHODS = ("rqvae", "coba")


@dataclass(frozen=True)
class TokenizerConfig:
    """embedding: "collab" | "text" | "text+collab" (see `sparserec.tokenize.embeddings`).
    method: "rqvae" (TIGER's RQ-VAE) or "coba" (S²GR's CoBa RQ-VAE with `coba`'s settings, `coba.py`)."""

    embedding: str = "collab"
    collab_dim: int = 64
    collab_window: int = 10
    price_bands: int = 8
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    method: str = "rqvae"
    coba: CoBaConfig = field(default_factory=CoBaConfig)

    def __post_init__(self):
        if self.method not in TOKENIZER_METHODS:
            raise ValueError(f"tokenizer method must be one of {TOKENIZER_METHODS}, got {self.method!r}")

    @classmethod
    def fast(cls, **overrides) -> "TokenizerConfig":
        """The RQ-VAE's fast setting (tests, CPU demos)."""
        return cls(**{"rqvae": RQVAEConfig.fast(), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "TokenizerConfig":
        rqvae = dict(state["rqvae"], hidden_dims=tuple(state["rqvae"]["hidden_dims"]))
        # Tokenizers saved before CoBa existed were plain RQ-VAEs: the defaults fill method and coba.
        return cls(**dict(state, rqvae=RQVAEConfig(**rqvae), coba=CoBaConfig(**state.get("coba", {}))))


class PackedHistories(NamedTuple):
    """Many users' histories packed back to back (flash-attn varlen layout)."""

    tokens: torch.Tensor  # (T_total,) int64
    cu_seqlens: torch.Tensor  # (B + 1,) int32 offsets of each user's tokens
    anchor_mask: torch.Tensor  # (T_total,) bool


class ItemTokenizer:
    """Fitted token tables of a catalogue. Build with `fit`, cache with `save` / `load`.

    item_cot (num_items, 3): CoT slot indices (0 = UNK); sids (num_items, k): RQ-VAE codes;
    collision (num_items,): the collision index; journey_key (num_items,): what anchors compare;
    codebooks (levels, codebook_size, latent_dim): the RQ-VAE's codewords (None in tokenizers saved
    before they were kept), which S²GR's thinking steps cluster.
    """

    def __init__(self, vocab: Vocabulary, item_ids, item_cot, sids, collision, journey_key,
                 config: TokenizerConfig, stats: dict, cot: bool = True, drop_constant: bool = False,
                 codebooks: torch.Tensor | None = None):
        self.vocab = vocab
        self.item_ids = tuple(item_ids)
        self.item_cot = torch.as_tensor(item_cot, dtype=torch.int64)
        self.sids = torch.as_tensor(sids, dtype=torch.int64)
        self.collision = torch.as_tensor(collision, dtype=torch.int64)
        self.journey_key = torch.as_tensor(journey_key, dtype=torch.int64)
        self.config = config
        self.stats = dict(stats)
        self.codebooks = None if codebooks is None else torch.as_tensor(codebooks, dtype=torch.float32)
        self.cot = cot
        self.drop_constant = drop_constant
        self._build_paths()

    def _build_paths(self):
        vocab = self.vocab
        # A constant column never tells two items apart, so dropping it keeps every path unique.
        constant = [bool((self.item_cot[:, i] == self.item_cot[0, i]).all()) for i in range(len(COT_SLOTS))]
        self.cot_slots = tuple(slot for slot, same in zip(COT_SLOTS, constant) if not (self.drop_constant and same))
        self.behavior_token = not (self.drop_constant and vocab.slot_sizes["behavior"] == 1)
        path = [vocab.token(f"sid_{l + 1}", self.sids[:, l]) for l in range(self.levels)]
        path.append(vocab.token("collision", self.collision))
        cot_tokens = [vocab.token(slot, self.item_cot[:, COT_SLOTS.index(slot)]) for slot in self.cot_slots]
        self._sid_paths = torch.stack(path, dim=1)
        self._cot_paths = torch.stack(cot_tokens + path, dim=1)
        self._item_of_cot_path = {tuple(p): i for i, p in enumerate(self._cot_paths.tolist())}
        self._item_of_sid_path = {tuple(p): i for i, p in enumerate(self._sid_paths.tolist())}

    # ---- construction and caching -------------------------------------------------------------

    @classmethod
    def fit(cls, data: InteractionData, config: TokenizerConfig = TokenizerConfig(), train_end=None,
            embeddings: torch.Tensor | None = None, cache_dir: str | None = None, progress: bool = True,
            cot: bool = True, drop_constant: bool = False) -> "ItemTokenizer":
        """Fits CoT attributes, item embeddings (unless given) and the RQ-VAE on `data`.

        train_end: `DataSplit.train_end`; collaborative embeddings then see training events only.
        cache_dir: reuse a tokenizer fitted on the same data, split and config (else fit and save).
        """
        cache_path = None
        if cache_dir is not None:
            cache_path = os.path.join(cache_dir, f"tokenizer-{_fingerprint(data, config, train_end, embeddings)}.pt")
            if os.path.isfile(cache_path):
                return cls.load(cache_path, cot=cot, drop_constant=drop_constant)
        attributes = fit_cot_attributes(data.items, config.price_bands)
        with _one_thread():
            if embeddings is None:
                embeddings = item_embeddings(data, config.embedding, train_end, config.collab_dim,
                                             config.collab_window, config.rqvae.seed, progress)
            if embeddings.shape[0] != data.num_items:
                raise ValueError(f"embeddings must have one row per item ({data.num_items}), got {embeddings.shape[0]}")
            coba = config.coba if config.method == "coba" else None
            if coba is not None:
                graph = cooccurrence_graph(data, train_end, coba.window)
                embeddings = propagate(embeddings, graph, coba.steps, coba.mix)
            rqvae, sids, stats = train_rqvae(embeddings, config.rqvae, progress, coba)
        collision = collision_index(sids)
        item_cot = attributes.encode(data.items)
        journey_key = item_cot[:, 0] if attributes.product_types else sids[:, 0].numpy()
        tokenizer = cls(_vocabulary(data, attributes, config, int(collision.max()) + 1), data.items.ids, item_cot,
                        sids, collision, journey_key, config, stats, cot, drop_constant, rqvae.codebooks.detach())
        if cache_path is not None:
            tokenizer.save(cache_path)
        return tokenizer

    def save(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({
            "format": CACHE_FORMAT, "vocab": self.vocab.state_dict(), "item_ids": list(self.item_ids),
            "item_cot": self.item_cot, "sids": self.sids, "collision": self.collision,
            "journey_key": self.journey_key, "config": self.config.to_dict(), "stats": self.stats,
            "codebooks": self.codebooks,
        }, f"{path}.{os.getpid()}.tmp")
        # Atomic: torchrun ranks fitting the same tokenizer never read a half-written cache.
        os.replace(f"{path}.{os.getpid()}.tmp", path)

    @classmethod
    def load(cls, path: str, cot: bool = True, drop_constant: bool = False) -> "ItemTokenizer":
        state = torch.load(path, weights_only=True)
        if state.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: tokenizer cache format {state.get('format')}, expected {CACHE_FORMAT}")
        return cls(Vocabulary.from_state_dict(state["vocab"]), state["item_ids"], state["item_cot"], state["sids"],
                   state["collision"], state["journey_key"], TokenizerConfig.from_dict(state["config"]),
                   state["stats"], cot, drop_constant, state.get("codebooks"))

    def with_cot(self, cot: bool) -> "ItemTokenizer":
        """The same tables with the CoT tokens kept (True) or dropped (False)."""
        view = copy.copy(self)
        view.cot = cot
        return view

    def with_drop_constant(self, drop_constant: bool) -> "ItemTokenizer":
        """The same tables with the dataset's constant slots left out (True) or kept (False)."""
        view = copy.copy(self)
        view.drop_constant = drop_constant
        view._build_paths()
        return view

    def thinking_targets(self, clusters: int, seed: int = 0):
        """S²GR's thinking targets (`sparserec.models.grace.ThinkingObjective`): (cluster of each
        item's code per level (num_items, levels) int64, the clusters' centroids (levels, clusters,
        latent_dim), each item's quantised latent = the sum of its codewords (num_items, latent_dim))."""
        if self.codebooks is None:
            raise ValueError("this tokenizer was saved without its RQ-VAE codebooks (before S²GR thinking "
                             "existed): fit it again")
        centroids, code_cluster = codebook_clusters(self.codebooks, clusters, seed=seed)
        levels = torch.arange(self.levels)
        return (code_cluster[levels, self.sids], centroids, self.codebooks[levels, self.sids].sum(1))

    # ---- layout --------------------------------------------------------------------------------

    @property
    def levels(self) -> int:
        return self.sids.shape[1]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def tokens_per_interaction(self) -> int:
        return int(self.behavior_token) + self.path_depth

    @property
    def path_depth(self) -> int:
        """Tokens after the behavior token: [CoT] SID_1..SID_k collision."""
        return (len(self.cot_slots) if self.cot else 0) + self.levels + 1

    @property
    def layout(self) -> list:
        """Slot names of one interaction's tokens, in order."""
        return ((["behavior"] if self.behavior_token else []) + (list(self.cot_slots) if self.cot else [])
                + [f"sid_{l + 1}" for l in range(self.levels)] + ["collision"])

    @property
    def anchor_offset(self) -> int:
        """Position of the anchor token inside an interaction: the product type when it is in the
        layout, else the first token (behavior, or the first path token without one)."""
        return self.layout.index("product_type") if "product_type" in self.layout else 0

    def item_paths(self) -> torch.Tensor:
        """(num_items, path_depth) int64 token paths of the whole catalogue; row i is item i.
        `[SID_1..SID_k, collision]`, prefixed by `[product type, price band, brand]` when cot.
        Every row is distinct: this is what `sparserec.generate.Trie(paths)` is built from."""
        return (self._cot_paths if self.cot else self._sid_paths).clone()

    def decode_paths(self, paths) -> torch.Tensor:
        """(n,) int64 item ids of (n, path_depth) token paths; -1 where a path is no item's."""
        paths = torch.as_tensor(paths, dtype=torch.int64)
        if paths.dim() != 2 or paths.shape[1] != self.path_depth:
            raise ValueError(f"paths must be (n, path_depth={self.path_depth}), got {tuple(paths.shape)}")
        item_of = self._item_of_cot_path if self.cot else self._item_of_sid_path
        return torch.tensor([item_of.get(tuple(p), -1) for p in paths.tolist()], dtype=torch.int64)

    # ---- interactions and histories ------------------------------------------------------------

    def behavior_tokens(self, behaviors) -> torch.Tensor:
        return self.vocab.token("behavior", torch.as_tensor(behaviors, dtype=torch.int64))

    def interaction_tokens(self, items, behaviors) -> torch.Tensor:
        """(n, tokens_per_interaction) int64: each row `[behavior] [CoT...] [SID...] [collision]` —
        the encoder's per-event tokens and the decoder's target layout alike."""
        items = torch.as_tensor(items, dtype=torch.int64)
        behaviors = torch.as_tensor(behaviors, dtype=torch.int64)
        if items.shape != behaviors.shape or items.dim() != 1:
            raise ValueError(f"items and behaviors must be 1-D of equal length, got {tuple(items.shape)} and "
                             f"{tuple(behaviors.shape)}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise ValueError(f"item ids must be in [0, {self.num_items}), got [{int(items.min())}, {int(items.max())}]")
        paths = (self._cot_paths if self.cot else self._sid_paths)[items]
        if not self.behavior_token:
            return paths
        return torch.cat([self.behavior_tokens(behaviors).unsqueeze(1), paths], dim=1)

    def history_tokens(self, items, behaviors):
        """One user's history: (token ids (n_tokens,) int64, anchor_mask (n_tokens,) bool)."""
        tokens = self.interaction_tokens(items, behaviors)
        shift = journey_shifts(self.journey_key[torch.as_tensor(items, dtype=torch.int64)].numpy())
        anchor_mask = torch.zeros(tokens.shape, dtype=torch.bool)
        anchor_mask[:, self.anchor_offset] = torch.from_numpy(shift)
        return tokens.reshape(-1), anchor_mask.reshape(-1)

    def batch_history_tokens(self, histories, max_interactions: int | None = None) -> PackedHistories:
        """Packs many users' histories: `histories` is an iterable of (items, behaviors) pairs, e.g.
        `data.history(u, end)`. max_interactions keeps each user's most recent events (anchors are
        recomputed on what is kept, so the first kept event is an anchor)."""
        tokens, masks, lengths = [], [], [0]
        for items, behaviors in histories:
            if max_interactions is not None:
                items, behaviors = items[-max_interactions:], behaviors[-max_interactions:]
            history, mask = self.history_tokens(items, behaviors)
            tokens.append(history)
            masks.append(mask)
            lengths.append(history.shape[0])
        if not tokens:
            raise ValueError("batch_history_tokens needs at least one history")
        cu_seqlens = torch.tensor(np.cumsum(lengths), dtype=torch.int32)
        return PackedHistories(torch.cat(tokens), cu_seqlens, torch.cat(masks))

    def describe(self, tokens) -> list:
        return self.vocab.describe(tokens)


def _vocabulary(data: InteractionData, attributes: CoTAttributes, config: TokenizerConfig,
                collision_size: int) -> Vocabulary:
    sizes = {
        "special": len(SPECIAL_TOKENS),
        "behavior": len(data.behaviors),
        "product_type": 1 + len(attributes.product_types),
        "price_band": 1 + attributes.num_price_bands,
        "brand": 1 + len(attributes.brands),
    }
    sizes.update({f"sid_{l + 1}": config.rqvae.codebook_size for l in range(config.rqvae.levels)})
    sizes["collision"] = collision_size
    names = {"behavior": data.behaviors, "product_type": attributes.product_types, "brand": attributes.brands,
             "price_band": attributes.band_names()}
    return Vocabulary(sizes, names)


@contextlib.contextmanager
def _one_thread():
    """Float sums split over threads round differently, and RQ-VAE training amplifies that into
    other codes (1 vs 2 threads changed 3,344 of the embedded data's 3,426 SIDs), so the tokenizer
    is fitted in one thread: the same data, config and seed give the same IDs on any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fingerprint(data: InteractionData, config: TokenizerConfig, train_end, embeddings) -> str:
    """16 hex digits identifying the inputs of `fit` (the data, split, config and embeddings)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT, data.name, list(data.behaviors), config.to_dict()], sort_keys=True,
                             default=str).encode())
    items = data.items
    digest.update(json.dumps([items.ids, items.product_type, items.brand, items.text]).encode())
    for array in (items.price, data.user_ptr, data.item, data.behavior, data.timestamp):
        digest.update(np.ascontiguousarray(array).tobytes())
    if train_end is not None:
        digest.update(np.ascontiguousarray(train_end, dtype=np.int64).tobytes())
    if embeddings is not None:
        digest.update(embeddings.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

