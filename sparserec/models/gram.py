"""GRAM (arXiv 2506.01673): lexical item IDs and multi-granular late fusion, with cached item encodings.

Items are named by word paths (`sparserec.tokenize.lexical`), and everything the model reads or
writes is words of one vocabulary: ID words, the words of the item text, and a few field tokens.

Encoder inputs, each passage encoded on its own by the same encoder (positions restart at 0):
  - the coarse user prompt: the IDs of the history, newest first, `[SEP]`-separated;
  - one fine prompt per history item, for the `passages` newest items:
    `[ID] id words [SIMILAR] ids of its k most similar items [TITLE] ... [BRAND] ... [CATEGORIES] ...`
    (at most `max_prompt_tokens`; the similar items come from a trained SASRec's item embeddings).
Each encoded passage then gets a passage-position embedding (0: the user prompt, j: the j-th newest
item), and the decoder (GRACE's: causal self-attention + cross-attention, KV cache) cross-attends
to their concatenation and generates the target's ID words, constrained by the trie of all IDs.

An item prompt's encoding does not depend on the user, so inference reads it from an
`ItemEncodingCache`: a memory-mapped file of every item's encoded prompt, keyed by a hash of the
encoder's weights (and the prompts), rebuilt when they change. The paper fine-tunes a pretrained
T5-small; no pretrained weights can be fetched here, so this model is trained from scratch.
"""
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .. import runs
from ..data import InteractionData, Targets, data_fingerprint, fingerprint_changes
from ..generate import Trie, beam_search
from ..metrics import per_behavior_metrics
from ..tokenize.lexical import LexicalConfig, LexicalIDs, cached_lexical_ids, item_words
from .grace import GRACE, DecoderLayer, Memory, TransformerShape
from .layers import Attention, FeedForward, sequence_loss
from .sasrec import SASRec, SASRecConfig

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "[SEP]", "[ID]", "[SIMILAR]", "[TITLE]", "[BRAND]",
                  "[CATEGORIES]")
PAD, BOS, EOS, UNK, SEP = range(5)
FIELD = {name: SPECIAL_TOKENS.index(f"[{name.upper()}]") for name in ("id", "similar", "title", "brand", "categories")}
# Amazon's item text: "product type: A > B. brand: X. keywords: ..." (sparserec.data.amazon).
TEXT_FIELDS = re.compile(r"product type: (?P<categories>.*?)\. brand: (?P<brand>.*?)\.(?: keywords: (?P<title>.*)\.)?$")


# ---- collaborative semantics --------------------------------------------------------------------

def similar_items(sasrec_run: str, data: InteractionData, k: int) -> torch.Tensor:
    """(num_items, k) int64: each item's k most similar other items by cosine similarity of the item
    embeddings of the trained SASRec in run directory `sasrec_run`, most similar first."""
    if not 0 <= k < data.num_items:
        raise ValueError(f"k must be in [0, {data.num_items}), got {k}")
    if not os.path.isfile(os.path.join(sasrec_run, runs.RUN_FILE)):
        raise ValueError(f"GRAM's collaborative semantics need a trained SASRec run directory, and {sasrec_run!r} "
                         f"holds no {runs.RUN_FILE}: train one (sparserec train --model sasrec --dataset {data.name} "
                         "--out DIR) and pass --gram-sasrec-run DIR, or --gram-k 0 to go without similar items")
    run = runs.read_run(sasrec_run)
    if run.get("model") != "sasrec":
        raise ValueError(f"{sasrec_run} holds a {run.get('model')!r} run, not a SASRec run")
    changes = fingerprint_changes(runs.run_field(run, sasrec_run, "fingerprints").get("data", {}), data_fingerprint(data))
    if changes:
        raise ValueError(f"the SASRec run {sasrec_run} was trained on other data: {'; '.join(changes)}")
    model = SASRec(SASRecConfig(**runs.run_field(run, sasrec_run, "model_config")))
    model.load_state_dict(runs.load_file(os.path.join(sasrec_run, runs.MODEL_FILE), "the SASRec weights"))
    vectors = nn.functional.normalize(model.item_embedding.weight[:data.num_items].detach().float(), dim=1)
    neighbours = []
    for start in range(0, data.num_items, 2048):
        similarity = vectors[start:start + 2048] @ vectors.T
        similarity[torch.arange(similarity.shape[0]), torch.arange(start, start + similarity.shape[0])] = -2.0
        neighbours.append(similarity.topk(k, dim=1).indices)
    return torch.cat(neighbours)


# ---- vocabulary and prompts ---------------------------------------------------------------------

def item_fields(items) -> list:
    """Per item {"title", "brand", "categories"}: lists of words (Amazon's text is split into its
    fields; other text is all title, with the brand and product type from the item table)."""
    fields = []
    for text, brand, product_type in zip(items.text, items.brand, items.product_type):
        match = TEXT_FIELDS.match(text or "")
        if match:
            parts = {name: match.group(name) or "" for name in ("title", "brand", "categories")}
        else:
            parts = {"title": text or "", "brand": brand or "", "categories": product_type or ""}
        fields.append({name: item_words([value])[0] for name, value in parts.items()})
    return fields


@dataclass
class GRAMTables:
    """vocabulary: token strings (id = index); item_paths (num_items, depth): each item's ID words,
    padded with EOS; item_prompts (num_items, P): each item's fine prompt, padded with PAD."""

    vocabulary: list
    item_paths: torch.Tensor
    item_prompts: torch.Tensor


def build_tables(ids: LexicalIDs, fields: list, neighbours: torch.Tensor | None,
                 max_prompt_tokens: int = 128, min_count: int = 2) -> GRAMTables:
    """The word vocabulary (special tokens, every ID word, every text word seen >= min_count times)
    and each item's ID path and fine prompt (unknown words: [UNK])."""
    counts = {}
    for item in fields:
        for words in item.values():
            for word in words:
                counts[word] = counts.get(word, 0) + 1
    id_words = ids.words()
    known = set(id_words)
    vocabulary = list(SPECIAL_TOKENS) + id_words + sorted(w for w, c in counts.items() if c >= min_count
                                                          and w not in known)
    index = {word: i for i, word in enumerate(vocabulary)}
    depth = ids.depth
    paths = torch.full((len(ids.names), depth), EOS, dtype=torch.int64)
    for item, name in enumerate(ids.names):
        paths[item, :len(name)] = torch.tensor([index[word] for word in name])
    prompts = []
    for item, item_field in enumerate(fields):
        tokens = [FIELD["id"]] + [index[word] for word in ids.names[item]]
        if neighbours is not None and neighbours.shape[1]:
            tokens.append(FIELD["similar"])
            for rank, other in enumerate(neighbours[item].tolist()):
                tokens += ([SEP] if rank else []) + [index[word] for word in ids.names[other]]
        for name in ("title", "brand", "categories"):
            if item_field[name]:
                tokens += [FIELD[name]] + [index.get(word, UNK) for word in item_field[name]]
        prompts.append(tokens[:max_prompt_tokens])
    width = max(len(tokens) for tokens in prompts)
    item_prompts = torch.full((len(prompts), width), PAD, dtype=torch.int64)
    for item, tokens in enumerate(prompts):
        item_prompts[item, :len(tokens)] = torch.tensor(tokens)
    return GRAMTables(vocabulary, paths, item_prompts)


# ---- the model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GRAMConfig(TransformerShape):
    """num_items, prompt_length (P, tokens of each item prompt), path_depth (tokens of each ID):
    fixed by the tables. passages: item prompts fused per user (the newest history items; 0: the
    coarse prompt alone). max_user_tokens: length cap of the coarse prompt (oldest items dropped).
    The shape fields (TransformerShape) as GRACEConfig's (its decoder is GRACE's)."""

    vocab_size: int
    num_items: int
    prompt_length: int
    path_depth: int
    passages: int = 5
    max_user_tokens: int = 128
    decoder_start_token_id: int = BOS

    def __post_init__(self):
        super().__post_init__()
        for name in ("vocab_size", "num_items", "prompt_length", "path_depth", "max_user_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.passages < 0:
            raise ValueError(f"passages must be >= 0, got {self.passages}")

    @property
    def max_target_positions(self) -> int:
        return self.path_depth + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PassageEncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention + FFN over passages of different lengths.

    Tokens are packed (only the real ones, row-major over (passage, position)); only the attention
    itself sees them padded (N, L): prompts padded to the longest in a batch are mostly padding
    (Beauty's coarse prompts: ~30% real), and every matmul skips it."""

    def __init__(self, config: GRAMConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.self_attention = Attention(config.d_model, config.num_heads, config.num_kv_heads, config.dropout,
                                        config.head_dim)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def attend(self, h, valid):
        """Packed h (T, d_model) of the passages' real tokens valid (N, L) -> attention output (T, d_model)."""
        attention = self.self_attention

        def padded_heads(projected, heads):  # (T, heads*D) -> (N, heads, L, D), zeros at padding
            padded = projected.new_zeros(*valid.shape, projected.shape[-1])
            padded[valid] = projected
            return padded.unflatten(-1, (heads, attention.head_dim)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            padded_heads(attention.q_proj(h), attention.num_heads),
            padded_heads(attention.k_proj(h), attention.num_kv_heads),
            padded_heads(attention.v_proj(h), attention.num_kv_heads), attn_mask=valid[:, None, None, :],
            enable_gqa=True, dropout_p=attention.dropout if self.training else 0.0)
        return attention.out_proj(out.transpose(1, 2)[valid].flatten(1))

    def forward(self, x, valid):
        x = x + self.dropout(self.attend(self.attention_norm(x), valid))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class GRAM(nn.Module):
    # The decoder side is GRACE's, attribute for attribute (embedding, decoder_positions,
    # decoder_layers, decoder_norm, dropout, config.max_target_positions): its methods serve as they are.
    new_cache = GRACE.new_cache
    decode = GRACE.decode
    logits = GRACE.logits
    decoder_states = GRACE.decoder_states
    make_step_fn = GRACE.make_step_fn

    def __init__(self, config: GRAMConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.token_positions = nn.Embedding(max(config.prompt_length, config.max_user_tokens), config.d_model)
        self.passage_positions = nn.Embedding(config.passages + 1, config.d_model)
        self.decoder_positions = nn.Embedding(config.max_target_positions, config.d_model)
        self.encoder_layers = nn.ModuleList(PassageEncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.encoder_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.decoder_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)
        # The catalogue's tables travel with the weights (saved in model.pt): IDs and fine prompts.
        self.register_buffer("item_paths", torch.full((config.num_items, config.path_depth), EOS))
        self.register_buffer("item_prompts", torch.full((config.num_items, config.prompt_length), PAD))

    def set_tables(self, tables: GRAMTables) -> "GRAM":
        if tuple(tables.item_paths.shape) != tuple(self.item_paths.shape) or \
                tuple(tables.item_prompts.shape) != tuple(self.item_prompts.shape):
            raise ValueError(f"tables {tuple(tables.item_paths.shape)} / {tuple(tables.item_prompts.shape)} do not fit "
                             f"the config's {tuple(self.item_paths.shape)} / {tuple(self.item_prompts.shape)}")
        self.item_paths.copy_(tables.item_paths)
        self.item_prompts.copy_(tables.item_prompts)
        return self

    def encode_passages(self, tokens):
        """Padded passages (N, L) of token ids -> encoder states (N, L, d_model), zeros at padding;
        each passage alone."""
        valid = tokens != PAD
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)[valid]
        x = self.dropout(self.embedding(tokens[valid]) + self.token_positions(positions))
        for layer in self.encoder_layers:
            x = layer(x, valid)
        states = x.new_zeros(*tokens.shape, x.shape[-1])
        states[valid] = self.encoder_norm(x)
        return states

    def encode_items(self, items):
        """(M,) item ids -> their fine prompts' encodings (M, P, d_model), computed now."""
        return self.encode_passages(self.item_prompts[items])

    def encode(self, user_tokens, passage_items, item_encoder=None) -> Memory:
        """Coarse prompts (B, U) and the items of the fine prompts (B, n) (-1: none) -> the fused
        memory (B, U + n*P, d_model). item_encoder(items (M,)) -> (M, P, d_model): where the item
        encodings come from (default: `encode_items`; an `ItemEncodingCache` reads them from disk)."""
        memory = self.encode_passages(user_tokens) + self.passage_positions.weight[0]
        valid = user_tokens != PAD
        passages = passage_items.shape[1]
        if passages > self.config.passages:
            raise ValueError(f"{passages} item passages given, the model has positions for {self.config.passages}")
        if passages:
            present = passage_items >= 0
            unique, inverse = passage_items[present].unique(return_inverse=True)
            encoded = (item_encoder or self.encode_items)(unique) if len(unique) else None
            states = memory.new_zeros(*passage_items.shape, self.config.prompt_length, self.config.d_model)
            if encoded is not None:
                states[present] = encoded.to(memory.dtype)[inverse]
            states = states + self.passage_positions.weight[1:passages + 1, None, :]
            item_valid = present[..., None] & (self.item_prompts[passage_items.clamp(min=0)] != PAD)
            memory = torch.cat([memory, states.flatten(1, 2)], dim=1)
            valid = torch.cat([valid, item_valid.flatten(1)], dim=1)
        return Memory(memory, valid)

    def forward(self, user_tokens, passage_items, decoder_input_ids):
        """Teacher forcing: logits (B, L, vocab) of decoder inputs (B, L)."""
        memory = self.encode(user_tokens, passage_items)
        return self.logits(self.decoder_states(decoder_input_ids, self.new_cache(memory)))


# ---- the item-encoding cache --------------------------------------------------------------------

class ItemEncodingCache:
    """Every item's encoded fine prompt in a memory-mapped float32 file under `directory`,
    `gram-items-<key>.npy` (num_items, P, d_model), where key hashes the encoder's weights, the
    prompts and the shapes: a model whose encoder changed gets (and builds) another file.
    `encoder(model)` returns the `item_encoder` for `GRAM.encode`."""

    def __init__(self, directory: str, chunk: int = 256):
        self.directory, self.chunk = directory, chunk

    @staticmethod
    def key(model: GRAM) -> str:
        digest = hashlib.sha256(json.dumps([model.config.to_dict(), torch.__version__]).encode())
        encoder = {"embedding", "token_positions", "encoder_layers", "encoder_norm", "item_prompts"}
        for name, tensor in sorted(model.state_dict().items()):
            if name.split(".")[0] in encoder:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:20]

    def path(self, model: GRAM) -> str:
        return os.path.join(self.directory, f"gram-items-{self.key(model)}.npy")

    @torch.no_grad()
    def build(self, model: GRAM, progress: bool = False) -> str:
        """Encodes every item (eval mode) into the file of the model's current key, unless it exists."""
        path = self.path(model)
        if os.path.isfile(path):
            return path
        os.makedirs(self.directory, exist_ok=True)
        config = model.config
        was_training = model.training
        model.eval()
        try:
            table = np.lib.format.open_memmap(f"{path}.{os.getpid()}.tmp.npy", mode="w+", dtype=np.float32,
                                              shape=(config.num_items, config.prompt_length, config.d_model))
            device = model.item_prompts.device
            for start in tqdm(range(0, config.num_items, self.chunk), desc="encode items", disable=not progress):
                items = torch.arange(start, min(start + self.chunk, config.num_items), device=device)
                table[start:start + len(items)] = model.encode_items(items).float().cpu().numpy()
            table.flush()
            del table
            os.replace(f"{path}.{os.getpid()}.tmp.npy", path)  # atomic: a reader never sees a half-written file
        finally:
            model.train(was_training)
        return path

    def encoder(self, model: GRAM, progress: bool = False):
        """item_encoder(items) reading the memory-mapped encodings of the model's current weights."""
        table = np.load(self.build(model, progress), mmap_mode="r")
        device = model.item_prompts.device

        def item_encoder(items):
            return torch.from_numpy(np.ascontiguousarray(table[items.cpu().numpy()])).to(device)

        return item_encoder


# ---- examples, loss, rankings -------------------------------------------------------------------

class GRAMExamples(Dataset):
    """Next-item examples (user, target row); `collate` builds the prompts of their histories."""

    def __init__(self, data: InteractionData, item_paths: torch.Tensor, prompt_lengths: torch.Tensor,
                 targets: Targets, passages: int, max_user_tokens: int):
        if len(targets) == 0:
            raise ValueError("GRAMExamples needs at least one target")
        self.data, self.targets, self.passages, self.max_user_tokens = data, targets, passages, max_user_tokens
        self.item_paths, self.prompt_lengths = item_paths.cpu(), prompt_lengths.cpu()
        self.id_tokens = [[t for t in row if t != EOS] for row in self.item_paths.tolist()]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return int(self.targets.user[index]), int(self.targets.position[index])

    def user_prompt(self, history) -> list:
        """The history's IDs, newest first, [SEP]-separated, within max_user_tokens (whole IDs only)."""
        tokens = []
        for item in history[::-1]:
            piece = ([SEP] if tokens else []) + self.id_tokens[item]
            if len(tokens) + len(piece) > self.max_user_tokens:
                break
            tokens += piece
        return tokens

    def collate(self, examples) -> dict:
        """-> {user_tokens (B, U), passage_items (B, passages) newest first (-1: none), targets (B, depth),
        decoder_input_ids, items (B,), behaviors (B,)}."""
        users, rows = (np.asarray(column) for column in zip(*examples))
        prompts, passage_items = [], torch.full((len(rows), self.passages), -1, dtype=torch.int64)
        for row, (user, end) in enumerate(zip(users, rows)):
            history = self.data.history(user, end=end)[0]
            prompts.append(self.user_prompt(history))
            newest = history[::-1][:self.passages]
            passage_items[row, :len(newest)] = torch.from_numpy(newest.copy())
        user_tokens = torch.full((len(rows), max(map(len, prompts))), PAD, dtype=torch.int64)
        for row, tokens in enumerate(prompts):
            user_tokens[row, :len(tokens)] = torch.tensor(tokens)
        items = torch.from_numpy(self.data.item[rows]).long()
        targets = self.item_paths[items]
        return {"user_tokens": user_tokens, "passage_items": passage_items, "targets": targets,
                "decoder_input_ids": torch.cat([torch.full((len(rows), 1), BOS), targets[:, :-1]], dim=1),
                "items": items, "behaviors": torch.from_numpy(self.data.behavior[rows]).long()}

    def counts(self, batch) -> tuple:
        """(examples, encoder tokens: the coarse prompts' and the fine prompts' real tokens)."""
        present = batch["passage_items"][batch["passage_items"] >= 0]
        return (batch["targets"].shape[0],
                int((batch["user_tokens"] != PAD).sum()) + int(self.prompt_lengths[present].sum()))


def gram_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the target's ID words (and its EOS padding)."""
    return sequence_loss(model(batch["user_tokens"], batch["passage_items"], batch["decoder_input_ids"]),
                         batch["targets"])


def gram_examples(model: GRAM, data: InteractionData, targets: Targets) -> GRAMExamples:
    return GRAMExamples(data, model.item_paths, (model.item_prompts != PAD).sum(1), targets, model.config.passages,
                        model.config.max_user_tokens)


@torch.no_grad()
def gram_rankings(model: GRAM, data: InteractionData, targets: Targets, beam_size: int = 20, batch_size: int = 64,
                  item_encoder=None, progress: bool = True, trie: Trie | None = None):
    """(len(targets), beam_size) item ids and their scores, by trie-constrained beam search over the
    ID words (every result is a real item). item_encoder: see `GRAM.encode` (None: re-encode)."""
    device = model.item_paths.device
    trie = trie or Trie(model.item_paths, device=device)
    examples = gram_examples(model, data, targets)
    was_training = model.training
    model.eval()
    items, scores = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="evaluate gram", disable=not progress):
        batch = examples.collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        memory = model.encode(batch["user_tokens"].to(device), batch["passage_items"].to(device), item_encoder)
        ranked, score = beam_search(model.make_step_fn(memory, beam_size), trie, len(batch["items"]), beam_size)
        items.append(ranked.cpu())
        scores.append(score.cpu())
    model.train(was_training)
    return torch.cat(items), torch.cat(scores)


def evaluate_gram(model: GRAM, data: InteractionData, targets: Targets, beam_size: int = 20, ks=(5, 10),
                  cache_dir: str | None = None, mask_history: bool = False, history_margin: int = 10,
                  progress: bool = True, **options) -> dict:
    """Per-behavior HR@K / NDCG@K (next item; the behavior is not generated). cache_dir: read the
    item encodings from an `ItemEncodingCache` there (built first if the weights are new)."""
    from ..evaluate import drop_history, histories_of
    if beam_size < max(ks):
        raise ValueError(f"beam_size ({beam_size}) must be >= max(ks) ({max(ks)}) for a full-ranking top K")
    item_encoder = ItemEncodingCache(cache_dir).encoder(model, progress) if cache_dir else None
    width = beam_size + (history_margin if mask_history else 0)
    ranked, _ = gram_rankings(model, data, targets, width, item_encoder=item_encoder, progress=progress, **options)
    if mask_history:
        ranked = drop_history(ranked, histories_of(data, targets), max(ks))
    return per_behavior_metrics(ranked, torch.from_numpy(targets.items(data)).long(),
                                torch.from_numpy(targets.behaviors(data)).long(), data.behaviors, ks)


def build_gram(data: InteractionData, train_end, lexical: LexicalConfig = LexicalConfig(), embedding: str = "text",
               similar: int = 3, sasrec_run: str | None = None, max_prompt_tokens: int = 128,
               cache_dir: str | None = None, progress: bool = True, **options) -> GRAM:
    """A fresh GRAM for `data`: lexical IDs from `embedding` item embeddings, `similar` neighbours
    per item from the SASRec run `sasrec_run` (0: none), the word tables, and GRAMConfig `options`."""
    ids = cached_lexical_ids(data, lexical, embedding, train_end, cache_dir, progress)
    neighbours = similar_items(sasrec_run or "", data, similar) if similar else None
    tables = build_tables(ids, item_fields(data.items), neighbours, max_prompt_tokens)
    config = GRAMConfig(vocab_size=len(tables.vocabulary), num_items=data.num_items,
                        prompt_length=tables.item_prompts.shape[1], path_depth=tables.item_paths.shape[1], **options)
    return GRAM(config).set_tables(tables)
