"""GRACE: a T5-style encoder–decoder generative recommender with Journey-aware Sparse Attention.

Encoder: packed user histories (`tokens` (T_total,), `cu_seqlens` (B+1,), `anchor_mask`
(T_total,) bool, as `sparserec.tokenize` produces them) through pre-norm blocks whose
self-attention is `JourneySparseAttention` (bidirectional) or, for the ablation, dense SDPA with
the same packed interface. Decoder: dense causal self-attention plus cross-attention to the
encoder output, with a KV cache for incremental decoding and beam search.

Positions are learned absolute embeddings (RoPE would need access to q and k inside
JourneySparseAttention). Encoder positions count back from each history's newest token
(0 = newest), so left-truncated histories keep the positions of their recent tokens; decoder
positions count from the start token. The token embedding is shared with the output head
(T5: hidden states scaled by d_model^-0.5 before the tied projection).

Thinking (`GRACEConfig.think`, S²GR arXiv 2601.18664): the decoder takes one thinking step before
each SID level, a token of its own (ids vocab_size .. vocab_size + levels - 1) that is fed, never
predicted: training inserts it into the target, generation forces it (`beam_search`'s
forced_tokens), so it adds a decoder position but no score and no branching. The thinking step's
output (its hidden state, which also predicts the level's SID) is projected into the RQ-VAE latent
space and aligned with the centroid of the k-means cluster of the true code (`ThinkingObjective`);
a holistic-interest head reads the pooled encoder memory and is trained by in-batch InfoNCE against
the target item's latent, and the first thought is tied to it by lambda * (1 - cos(t_1, sg(v_g))).
"""
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSAConfig
from ..generate import Trie, beam_search
from ..nn import JourneySparseAttention
from ..reference.jsa import BRANCHES
from .layers import Attention, FeedForward, PackedDenseSelfAttention, causal_mask, pad_packed, sequence_loss

ATTENTION_KINDS = ("jsa", "dense")
# Sized for ~8 tokens per interaction: compress two interactions with a one-interaction stride,
# select four-interaction blocks, and keep the last four interactions in the window.
ENCODER_JSA = JSAConfig(block=16, stride=8, select_block=32, top_n=4, select_q_block=32, window=32)


@dataclass(frozen=True)
class ThinkConfig:
    """S²GR's stepwise thinking. levels: SID levels, one thinking step before each (the layout's
    last levels + 1 tokens are SID_1..SID_k and the collision token); dim: width of the alignment
    targets (the RQ-VAE latent); clusters: K_c, k-means clusters of each level's codewords;
    align_weight, interest_weight: weights of the alignment and holistic-interest InfoNCE losses;
    interest_reg: lambda of lambda * (1 - cos(t_1, sg(v_g))); temperature: of both InfoNCE losses."""

    levels: int
    dim: int
    clusters: int = 16
    align_weight: float = 0.1
    interest_weight: float = 0.1
    interest_reg: float = 0.1
    temperature: float = 0.1

    def __post_init__(self):
        for name in ("levels", "dim"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise ValueError(f"think.{name} must be a positive int, got {getattr(self, name)!r}")
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or self.clusters < 2:
            raise ValueError(f"think.clusters (K_c) must be an int >= 2, got {self.clusters!r}")
        for name in ("align_weight", "interest_weight", "interest_reg"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 <= getattr(self, name) < float("inf")):
                raise ValueError(f"think.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"think.temperature must be a finite number > 0, got {self.temperature!r}")


@dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """The encoder-decoder's shape, shared by GRACEConfig and GRAM's config (keyword-only fields).

    num_kv_heads: grouped-query attention (None = num_heads). head_dim: each head's width (None =
    d_model // num_heads; else attention runs num_heads * head_dim wide, projected from and to
    d_model, as T5's d_kv)."""

    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 512
    activation: str = "gelu"
    dropout: float = 0.1

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}), "
                             "or head_dim given")


@dataclass(frozen=True)
class GRACEConfig(TransformerShape):
    """Shape (TransformerShape) and options of a GRACE model.

    attention: "jsa" | "dense" encoder
    self-attention. jsa / jsa_backend / jsa_compress: JourneySparseAttention's config (must be
    bidirectional), backend and compression. disabled_branches: JSA branches ("cmp", "slc",
    "jrn", "win") whose gate is fixed to 0 (ablations). max_positions: longest encoder history in
    tokens; max_target_positions: longest decoder input. decoder_start_token_id: the token that
    starts every decoder input (the vocabulary's BOS). think: S²GR's thinking steps (None: off).
    """

    vocab_size: int
    attention: str = "jsa"
    jsa: JSAConfig = ENCODER_JSA
    jsa_backend: str = "auto"
    jsa_compress: str = "mlp"
    disabled_branches: tuple = ()
    max_positions: int = 2048
    max_target_positions: int = 32
    decoder_start_token_id: int = 1
    think: ThinkConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "disabled_branches", tuple(self.disabled_branches))
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not isinstance(self.jsa, JSAConfig):
            raise TypeError(f"jsa must be a JSAConfig, got {type(self.jsa).__name__}")
        if self.jsa.causal:
            raise ValueError("the GRACE encoder is bidirectional: jsa.causal must be False")
        unknown = set(self.disabled_branches) - set(BRANCHES)
        if unknown:
            raise ValueError(f"disabled_branches must be among {BRANCHES}, got {sorted(unknown)}")
        if self.disabled_branches and self.attention != "jsa":
            raise ValueError("disabled_branches applies to attention='jsa' only")
        if self.think is not None and not isinstance(self.think, ThinkConfig):
            raise TypeError(f"think must be a ThinkConfig or None, got {type(self.think).__name__}")
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ValueError(f"decoder_start_token_id ({self.decoder_start_token_id}) is outside the "
                             f"vocabulary (size {self.vocab_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GRACEConfig":
        think = values.get("think")
        return cls(**{**values, "jsa": JSAConfig(**values["jsa"]), "think": think and ThinkConfig(**think)})


class BranchMaskedGate(nn.Linear):
    """JSA's gate projection with the logits of disabled branches pinned to -inf (sigmoid: exactly 0)."""

    def __init__(self, gate_proj: nn.Linear, num_heads: int, disabled_branches: tuple):
        super().__init__(gate_proj.in_features, gate_proj.out_features, bias=gate_proj.bias is not None)
        self.load_state_dict(gate_proj.state_dict())
        # Gate logits are laid out (heads, 4 branches), matching JourneySparseAttention's view.
        disabled = torch.tensor([branch in disabled_branches for branch in BRANCHES]).repeat(num_heads)
        self.register_buffer("disabled", disabled, persistent=False)

    def forward(self, x):
        return super().forward(x).masked_fill(self.disabled, float("-inf"))


class Widened(nn.Module):
    """A packed self-attention module run at width `inner`, between Linear(d_model→inner) and
    Linear(inner→d_model): JSA with heads × head_dim ≠ d_model (its own projections are square)."""

    def __init__(self, d_model: int, inner: int, attention: nn.Module):
        super().__init__()
        self.up = nn.Linear(d_model, inner, bias=False)
        self.attention = attention
        self.down = nn.Linear(inner, d_model, bias=False)

    def forward(self, x, cu_seqlens, anchor_mask=None, plan=None):
        return self.down(self.attention(self.up(x), cu_seqlens=cu_seqlens, anchor_mask=anchor_mask, plan=plan))

    def plan(self, cu_seqlens, anchor_mask, dtype=None):
        return self.attention.plan(cu_seqlens, anchor_mask, dtype)


def encoder_self_attention(config: GRACEConfig) -> nn.Module:
    if config.attention == "dense":
        return PackedDenseSelfAttention(config.d_model, config.num_heads, config.num_kv_heads, config.dropout,
                                        config.head_dim)
    width = config.num_heads * config.head_dim if config.head_dim else config.d_model
    attention = JourneySparseAttention(width, config.num_heads, config.num_kv_heads, config=config.jsa,
                                       backend=config.jsa_backend, compress=config.jsa_compress, bias=False)
    if config.disabled_branches:
        attention.gate_proj = BranchMaskedGate(attention.gate_proj, config.num_heads, config.disabled_branches)
    return attention if width == config.d_model else Widened(config.d_model, width, attention)


class EncoderLayer(nn.Module):
    def __init__(self, config: GRACEConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.self_attention = encoder_self_attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cu_seqlens, anchor_mask, plan=None):
        attended = self.self_attention(self.attention_norm(x), cu_seqlens=cu_seqlens, anchor_mask=anchor_mask,
                                       plan=plan)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Memory(NamedTuple):
    """Encoder output, padded for cross-attention: states (B, S, d_model), valid (B, S) bool."""

    states: torch.Tensor
    valid: torch.Tensor


class DecoderCache:
    """Decoder state of B requests × `beams` rows (row = request * beams + beam).

    cross[i]: layer i's cross-attention keys/values of the encoder memory, computed once, per
    request (B, Hkv, S, D): beams of a request share them, so beam search never copies them.
    self_kv[i]: layer i's self-attention keys/values so far, per row (B*beams, Hkv, t, D).
    """

    def __init__(self, cross: list, memory_valid: torch.Tensor, beams: int):
        self.cross = cross
        self.memory_mask = memory_valid[:, None, None, :]
        self.batch_size, self.beams = memory_valid.shape[0], beams
        self.self_kv = [None] * len(cross)

    @property
    def length(self) -> int:
        """Decoder tokens consumed so far."""
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def extend(self, layer: int, keys, values):
        """Append a layer's new self-attention keys/values; return all of them."""
        if self.self_kv[layer] is not None:
            keys = torch.cat([self.self_kv[layer][0], keys], dim=2)
            values = torch.cat([self.self_kv[layer][1], values], dim=2)
        self.self_kv[layer] = (keys, values)
        return keys, values

    def reorder(self, parent_rows: torch.Tensor):
        """Beam search: row r continues row parent_rows[r] (B*beams,), a row of the same request."""
        if tuple(parent_rows.shape) != (self.batch_size * self.beams,):
            raise ValueError(f"parent_rows must be ({self.batch_size * self.beams},), got {tuple(parent_rows.shape)}")
        self.self_kv = [None if kv is None else (kv[0][parent_rows], kv[1][parent_rows]) for kv in self.self_kv]


class DecoderLayer(nn.Module):
    def __init__(self, config: GRACEConfig):
        super().__init__()
        heads, kv_heads = config.num_heads, config.num_kv_heads
        self.self_attention_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.self_attention = Attention(config.d_model, heads, kv_heads, config.dropout, config.head_dim)
        self.cross_attention_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.cross_attention = Attention(config.d_model, heads, kv_heads, config.dropout, config.head_dim)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: DecoderCache, layer: int, self_mask, last_only: bool = False):
        """last_only: return the last position alone; the others only add their keys/values to the cache."""
        h = self.self_attention_norm(x)
        keys, values = cache.extend(layer, *self.self_attention.keys_values(h))
        if last_only:  # the last position sees every cached key: no mask
            x, h, self_mask = x[:, -1:], h[:, -1:], None
        x = x + self.dropout(self.self_attention(h, keys, values, attn_mask=self_mask))
        # Beams of a request attend to the same memory: fold them into its query dimension.
        rows, length, width = x.shape
        h = self.cross_attention_norm(x).reshape(cache.batch_size, cache.beams * length, width)
        attended = self.cross_attention(h, *cache.cross[layer], attn_mask=cache.memory_mask)
        x = x + self.dropout(attended.reshape(rows, length, width))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class GRACE(nn.Module):
    def __init__(self, config: GRACEConfig):
        super().__init__()
        self.config = config
        thinking = config.think.levels if config.think else 0
        self.embedding = nn.Embedding(config.vocab_size + thinking, config.d_model)  # + the thinking tokens
        self.encoder_positions = nn.Embedding(config.max_positions, config.d_model)
        self.decoder_positions = nn.Embedding(config.max_target_positions, config.d_model)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.encoder_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.decoder_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)
        if config.think:
            # Thoughts and the holistic interest live in the RQ-VAE latent space of the alignment targets.
            self.think_heads = nn.ModuleList(nn.Linear(config.d_model, config.think.dim, bias=False)
                                             for _ in range(config.think.levels))
            self.interest_head = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.GELU(),
                                               nn.Linear(config.d_model, config.think.dim))

    def forward(self, tokens, cu_seqlens, anchor_mask, decoder_input_ids, think: bool = False):
        """Teacher forcing: logits (B, L, vocab) for decoder inputs (B, L) given packed histories.

        think=True (a model with `config.think`; decoder inputs from `insert_thinking`): returns
        (logits, thoughts (B, levels, think.dim) — each thinking step's output projected by its
        level's head —, holistic interest v_g (B, think.dim))."""
        memory = self.encode(tokens, cu_seqlens, anchor_mask)
        states = self.decoder_states(decoder_input_ids, self.new_cache(memory))
        if not think:
            return self.logits(states)
        if not self.config.think:
            raise ValueError("think=True needs a model built with GRACEConfig.think")
        levels = self.config.think.levels
        fed = decoder_input_ids >= self.config.vocab_size
        if not bool((fed.sum(1) == levels).all()):
            raise ValueError(f"think=True needs the {levels} thinking tokens in every decoder input (insert_thinking)")
        thought_states = states[fed].view(-1, levels, states.shape[-1])
        thoughts = torch.stack([head(thought_states[:, l]) for l, head in enumerate(self.think_heads)], dim=1)
        pooled = (memory.states * memory.valid[..., None]).sum(1) / memory.valid.sum(1, keepdim=True)
        return self.logits(states), thoughts, self.interest_head(pooled)

    def insert_thinking(self, targets):
        """(B, L) targets `[...] SID_1..SID_k collision` -> (B, L + k) with thinking token l before SID_l."""
        levels = self.config.think.levels
        if targets.shape[1] < levels + 1:
            raise ValueError(f"targets of {targets.shape[1]} tokens cannot end with {levels} SIDs and a "
                             "collision token")
        lead = targets.shape[1] - levels - 1
        think = torch.arange(levels, device=targets.device) + self.config.vocab_size
        sids = torch.stack([think.expand(targets.shape[0], -1), targets[:, lead:lead + levels]], dim=2).flatten(1)
        return torch.cat([targets[:, :lead], sids, targets[:, lead + levels:]], dim=1)

    def forced_tokens(self, path_depth: int):
        """beam_search's forced_tokens for item paths of `path_depth` tokens: thinking token l before
        SID_l (None without thinking)."""
        if not self.config.think:
            return None
        first_sid = path_depth - self.config.think.levels - 1
        if first_sid < 0:
            raise ValueError(f"item paths of depth {path_depth} cannot end with {self.config.think.levels} SIDs "
                             "and a collision token")
        return {first_sid + l: [self.config.vocab_size + l] for l in range(self.config.think.levels)}

    def encode(self, tokens, cu_seqlens, anchor_mask=None) -> Memory:
        """Packed histories: tokens (T_total,) int64, cu_seqlens (B+1,), anchor_mask (T_total,) bool."""
        if tokens.dim() != 1 or cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != tokens.shape[0]:
            raise ValueError(f"tokens must be packed (T_total,) with cu_seqlens[-1] == T_total, got tokens "
                             f"{tuple(tokens.shape)} and cu_seqlens[-1] = {int(cu_seqlens[-1])}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(lengths.min()) < 1 or int(lengths.max()) > self.config.max_positions:
            raise ValueError(f"history lengths must be in [1, max_positions={self.config.max_positions}], "
                             f"got [{int(lengths.min())}, {int(lengths.max())}]")
        newest = torch.repeat_interleave(cu_seqlens[1:] - 1, lengths)
        positions = newest - torch.arange(tokens.shape[0], device=tokens.device)
        x = self.dropout(self.embedding(tokens) + self.encoder_positions(positions))
        # JSA's per-batch plan (tile maps, packed anchors), built once for every encoder layer.
        plan = None
        if self.config.attention == "jsa":
            if anchor_mask is None:
                anchor_mask = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            plan = self.encoder_layers[0].self_attention.plan(cu_seqlens, anchor_mask, x.dtype)
        for layer in self.encoder_layers:
            x = layer(x, cu_seqlens, anchor_mask, plan)
        return Memory(*pad_packed(self.encoder_norm(x), cu_seqlens))

    def new_cache(self, memory: Memory, beams: int = 1) -> DecoderCache:
        """An empty decoder cache for `beams` rows per request of `memory`."""
        cross = [layer.cross_attention.keys_values(memory.states) for layer in self.decoder_layers]
        return DecoderCache(cross, memory.valid, beams)

    def decode(self, decoder_input_ids, cache: DecoderCache):
        """Feed the next L tokens of every row (B*beams, L), extending `cache`: logits (B*beams, L, vocab)."""
        return self.logits(self.decoder_states(decoder_input_ids, cache))

    def logits(self, states):
        """Output logits of final decoder states (tied embedding, T5's d_model^-0.5 scale)."""
        return F.linear(states * self.config.d_model ** -0.5, self.embedding.weight)

    def decoder_states(self, decoder_input_ids, cache: DecoderCache, last_only: bool = False):
        """The decoder's final (normalised) states (B*beams, L, d_model) for the next L tokens of every row;
        last_only: (B*beams, 1, d_model) for the last token (the last layer skips the other positions'
        attention and feed-forward, which nothing reads)."""
        past, length = cache.length, decoder_input_ids.shape[1]
        if past + length > self.config.max_target_positions:
            raise ValueError(f"decoder input reaches position {past + length}, beyond max_target_positions "
                             f"({self.config.max_target_positions})")
        positions = torch.arange(past, past + length, device=decoder_input_ids.device)
        x = self.dropout(self.embedding(decoder_input_ids) + self.decoder_positions(positions))
        self_mask = causal_mask(length, past + length, x.device) if length > 1 else None
        last = len(self.decoder_layers) - 1
        for index, layer in enumerate(self.decoder_layers):
            x = layer(x, cache, index, self_mask, last_only=last_only and index == last)
        return self.decoder_norm(x)

    def decode_step(self, token_ids, cache: DecoderCache):
        """One token per row (B*beams,) -> next-token logits (B*beams, vocab)."""
        return self.decode(token_ids[:, None], cache)[:, -1]

    def make_step_fn(self, memory: Memory, beam_size: int, start_tokens=None):
        """A `step_fn` for `sparserec.generate.beam_search` over B requests × beam_size beams.

        The first call feeds the start token, then `start_tokens` (B, P) if given (e.g. the target
        behavior token of target-behavior prediction), then any forced tokens the search gives, and
        returns the next token's log-probs; later calls reorder the KV cache by the parent rows and
        feed each beam's chosen token (and the forced tokens after it) in one decoder call.
        """
        cache = self.new_cache(memory, beam_size)
        rows = cache.batch_size * beam_size

        def step_fn(tokens, parent_rows):
            if parent_rows is None:
                start = torch.full((rows, 1), self.config.decoder_start_token_id, device=memory.states.device)
                if start_tokens is not None:
                    start = torch.cat([start, start_tokens.repeat_interleave(beam_size, dim=0)], dim=1)
                tokens = start if tokens is None else torch.cat([start, tokens], dim=1)
            else:
                cache.reorder(parent_rows)
            # Only the last token is scored: forced (thinking) and start positions only extend the cache.
            return torch.log_softmax(self.logits(self.decoder_states(tokens, cache, last_only=True)[:, -1]).float(),
                                     dim=-1)

        return step_fn


@torch.no_grad()
def recommend(model: GRACE, trie: Trie, tokens, cu_seqlens, anchor_mask, beam_size: int, start_tokens=None,
              prefix_tokens=None):
    """Top-beam_size items (B, K) and their log-probs for packed histories, by trie-constrained beam search.

    start_tokens (B, P): given decoder tokens after the start token (target-behavior prediction).
    prefix_tokens: candidate first tokens the model chooses among (behavior–item prediction);
    see `beam_search`. Call with the model in eval mode.
    """
    step_fn = model.make_step_fn(model.encode(tokens, cu_seqlens, anchor_mask), beam_size, start_tokens)
    return beam_search(step_fn, trie, len(cu_seqlens) - 1, beam_size, prefix_tokens=prefix_tokens,
                       forced_tokens=model.forced_tokens(trie.depth))


def shift_right(targets, start_token_id: int):
    """Teacher-forcing decoder inputs: the start token, then targets (B, L) without their last token."""
    start = targets.new_full((targets.shape[0], 1), start_token_id)
    return torch.cat([start, targets[:, :-1]], dim=1)


class ThinkingObjective:
    """S²GR's training loss of a thinking GRACE, a `Trainer` loss_fn(model, batch):
    SID cross-entropy (the target's tokens; thinking tokens are fed, not predicted)
    + align_weight * sum over levels of InfoNCE(thought_l, centroids of level l; the true code's cluster)
    + interest_weight * in-batch InfoNCE(v_g, target item latents) + interest_reg * mean(1 - cos(t_1, sg(v_g))).

    code_clusters (num_items, levels) int64: the k-means cluster of each item's code at each level;
    centroids (levels, K_c, dim): those clusters' centroids; item_latents (num_items, dim): each
    item's quantised RQ-VAE latent (the sum of its codewords). Build them with
    `ItemTokenizer.thinking_targets`.
    """

    def __init__(self, code_clusters, centroids, item_latents):
        if code_clusters.dim() != 2 or centroids.dim() != 3 or item_latents.dim() != 2 \
                or code_clusters.shape != (item_latents.shape[0], centroids.shape[0]) \
                or centroids.shape[2] != item_latents.shape[1]:
            raise ValueError(f"thinking targets disagree: code_clusters {tuple(code_clusters.shape)}, centroids "
                             f"{tuple(centroids.shape)}, item_latents {tuple(item_latents.shape)}")
        self.code_clusters, self.centroids, self.item_latents = code_clusters, centroids, item_latents

    def __call__(self, model, batch) -> torch.Tensor:
        grace = getattr(model, "module", model)  # DDP wraps the model; call the wrapper, read the config
        think = grace.config.think
        if think is None or (think.levels, think.dim) != (self.centroids.shape[0], self.centroids.shape[2]):
            raise ValueError(f"the model's think config ({think}) does not fit targets of "
                             f"{self.centroids.shape[0]} levels and dim {self.centroids.shape[2]}")
        targets = grace.insert_thinking(batch["targets"])
        logits, thoughts, interest = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"],
                                           shift_right(targets, grace.config.decoder_start_token_id), think=True)
        device = logits.device
        items = batch["items"].to(device)
        sid_loss = sequence_loss(logits, targets.masked_fill(targets >= grace.config.vocab_size, -100))
        thoughts, interest = F.normalize(thoughts, dim=-1), F.normalize(interest, dim=-1)
        centroids = F.normalize(self.centroids.to(device, thoughts.dtype), dim=-1)
        align = sum(F.cross_entropy(thoughts[:, l] @ centroids[l].T / think.temperature,
                                    self.code_clusters.to(device)[items, l]) for l in range(think.levels))
        latents = F.normalize(self.item_latents.to(device, thoughts.dtype)[items], dim=-1)
        # In-batch negatives; another row with the same target item is no negative.
        same_item = (items[:, None] == items[None, :]) & ~torch.eye(len(items), dtype=torch.bool, device=device)
        similarity = (interest @ latents.T / think.temperature).masked_fill(same_item, float("-inf"))
        holistic = F.cross_entropy(similarity, torch.arange(len(items), device=device))
        regularizer = (1 - (thoughts[:, 0] * interest.detach()).sum(-1)).mean()
        return (sid_loss + think.align_weight * align + think.interest_weight * holistic
                + think.interest_reg * regularizer)
