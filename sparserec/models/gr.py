"""A causal generative ranker for multi-behavior sequences, with three ways to bring the actions in.

The exact definitions are in docs/action_fusion.md; this module keeps to them. In short, for a
user's interactions (i_1, a_1), ..., (i_N, a_N) (item, action = behavior index):

- `interleave`: tokens i_1 a_1 i_2 a_2 ... (2N), causal self-attention with the diagonal; the
  state of token i_n predicts a_n, the state of token a_n predicts i_{n+1}.
- `lfa` and `mvp`: N item tokens. Every layer's attention is *strictly* causal with a sink: query
  n attends to a learned sink slot and to items m < n (item n reaches its own state through the
  residual), so the actions a_m (m < n) can ride along the values without position n ever seeing
  a_n. The action stream is extra value columns of the same softmax: values [v_m | α(a_m)]
  (the sink's action columns are 0), output split into [o_v | o_a].
  `lfa`: action columns in the last layer only (late fusion): the layers before it are item-only,
  so every attention weight is item-item, and the last layer's pooled past actions enter the
  residual stream right after its attention, before its feed-forward.
  `mvp`: action columns in every layer (mixed value pooling), so later layers' weights see them.
  Either way [o_v | o_a] goes through the layer's output projection.
  For both, item n's own action a_n is added (an embedding) to the state that predicts i_{n+1}.

Action prediction: one sigmoid per behavior (K binary tasks, label 1[a_n = b]); next item: a
softmax over the whole catalogue with the tied item embedding. `dense` attention is torch SDPA on
padded batches; `jsa` is `sparserec.ops.jsa_attention` (causal) on the packed real tokens, with
linear compression of the keys and of the (action-extended) values.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JSAConfig
from ..nn.jsa import LinearCompressor, compressed_jsa, cu_seqlens_of
from .layers import FeedForward, causal_mask, linear_cross_entropy

FUSIONS = ("interleave", "lfa", "mvp")
ATTENTIONS = ("dense", "jsa")
INIT_STD = 0.02
# JSA sizes per *interaction*; interleaving has two tokens per interaction, so its sizes in tokens
# are doubled (`jsa_config`): every fusion's branches then cover the same interactions.
GR_JSA = JSAConfig(block=8, stride=4, select_block=8, top_n=2, select_q_block=8, window=8, causal=True)


@dataclass(frozen=True)
class GRConfig:
    """num_actions: behaviors K; action_dim: action value columns per head (lfa, mvp);
    max_length: interactions per sequence; backend: the JSA backend (attention="jsa")."""

    num_items: int
    num_actions: int
    fusion: str = "lfa"
    attention: str = "dense"
    d_model: int = 64
    num_heads: int = 2
    action_dim: int = 8
    layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    max_length: int = 50
    jsa: JSAConfig = field(default=GR_JSA)
    backend: str = "auto"

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("num_items", "num_actions", "d_model", "num_heads", "action_dim", "layers", "d_ff", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.jsa.causal:
            raise ValueError("the ranker is generative: its JSAConfig must be causal")

    @property
    def tokens_per_interaction(self) -> int:
        return 2 if self.fusion == "interleave" else 1

    def jsa_config(self) -> JSAConfig:
        scale = self.tokens_per_interaction
        return JSAConfig(block=self.jsa.block * scale, stride=self.jsa.stride * scale,
                         select_block=self.jsa.select_block * scale, top_n=self.jsa.top_n,
                         select_q_block=self.jsa.select_q_block * scale, window=self.jsa.window * scale, causal=True)


class GRAttention(nn.Module):
    """One causal self-attention layer, optionally with the sink/strict layout and action value columns.

    forward(x (B, L, d), valid (B, L) bool, anchors (B, L) bool, actions (B, L, H*action_dim) or None)
    -> attention output (B, L, d); with action columns, W_o [o_v | o_a] per head.
    """

    def __init__(self, config: GRConfig, strict: bool, action_columns: bool):
        super().__init__()
        d, heads = config.d_model, config.num_heads
        self.heads, self.head_dim = heads, d // heads
        self.action_dim = config.action_dim if action_columns else 0
        self.strict = strict
        self.attention, self.backend, self.jsa = config.attention, config.backend, config.jsa_config()
        self.dropout = config.dropout
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(heads * (self.head_dim + self.action_dim), d, bias=False)
        if strict:
            self.sink_key = nn.Parameter(torch.zeros(heads, self.head_dim))
            self.sink_value = nn.Parameter(torch.zeros(heads, self.head_dim))
        if config.attention == "jsa":
            self.gate_proj = nn.Linear(d, heads * 4)
            self.k_compress = LinearCompressor(heads, self.jsa.block, self.head_dim)
            self.v_compress = LinearCompressor(heads, self.jsa.block, self.head_dim + self.action_dim)

    def keys_values(self, x, actions, anchors):
        """Per-slot keys (B, L, H, D), values (B, L, H, D + action_dim) and key anchors (B, L).
        Strict layout: slot 0 is the sink (its action columns 0, always an anchor), slot s > 0 holds
        token s - 1."""
        batch, length, _ = x.shape
        k = self.k_proj(x).view(batch, length, self.heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.heads, self.head_dim)
        if self.action_dim:
            v = torch.cat([v, actions.view(batch, length, self.heads, self.action_dim)], dim=-1)
        if not self.strict:
            return k, v, anchors
        sink_value = F.pad(self.sink_value, (0, self.action_dim))
        k = torch.cat([self.sink_key.expand(batch, 1, -1, -1), k[:, :-1]], dim=1)
        v = torch.cat([sink_value.expand(batch, 1, -1, -1), v[:, :-1]], dim=1)
        anchors = torch.cat([anchors.new_ones(batch, 1), anchors[:, :-1]], dim=1)
        return k, v, anchors

    def forward(self, x, valid, anchors, actions=None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim)
        k, v, key_anchors = self.keys_values(x, actions, anchors)
        if self.attention == "dense":
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=causal_mask(length, length, x.device),
                dropout_p=self.dropout if self.training else 0.0).transpose(1, 2)
        else:
            out = self._jsa(x, q, k, v, valid, key_anchors)
        return self.out_proj(out.flatten(2))

    def _jsa(self, x, q, k, v, valid, anchors):
        """Causal JSA on the packed real tokens of the padded batch (padding comes back as zeros)."""
        gates = torch.sigmoid(self.gate_proj(x[valid])).view(-1, self.heads, 4)
        out = compressed_jsa(q[valid], k[valid], v[valid], gates, anchors[valid], cu_seqlens_of(valid), self.k_compress,
                             self.v_compress, self.jsa, self.backend)
        return out.new_zeros(*valid.shape, *out.shape[1:]).masked_scatter(valid[..., None, None], out)


class GRBlock(nn.Module):
    def __init__(self, config: GRConfig, strict: bool, action_columns: bool):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.attention = GRAttention(config, strict, action_columns)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ffn = FeedForward(config.d_model, config.d_ff, "gelu", config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, valid, anchors, actions):
        x = x + self.dropout(self.attention(self.attention_norm(x), valid, anchors, actions))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class GenerativeRanker(nn.Module):
    """forward(items, actions, valid, anchors) -> (action logits (B, N, K), next-item states (B, N, d)).

    items, actions (B, N) int64 (padding: any valid index where valid is False), valid (B, N) bool
    with real interactions first, anchors (B, N) bool (journey shifts, used by JSA). Position n's
    action logits never depend on a_n or on anything after item n; its next-item state depends on
    interactions 1..n (actions included). `item_logits(states)` scores the whole catalogue.
    """

    def __init__(self, config: GRConfig):
        super().__init__()
        self.config = config
        d, fusion = config.d_model, config.fusion
        self.item_embedding = nn.Embedding(config.num_items, d)
        self.action_embedding = nn.Embedding(config.num_actions, d)  # interleave's tokens; a_n for the next item
        self.positions = nn.Embedding(config.max_length * config.tokens_per_interaction, d)
        strict = fusion != "interleave"
        if strict:
            self.action_values = nn.Embedding(config.num_actions, config.num_heads * config.action_dim)
        self.blocks = nn.ModuleList(
            GRBlock(config, strict, action_columns=fusion == "mvp" or (fusion == "lfa" and layer == config.layers - 1))
            for layer in range(config.layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)
        self.action_head = nn.Linear(d, config.num_actions)
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                nn.init.normal_(module.weight, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @torch.no_grad()
    def set_action_prior(self, rates: torch.Tensor):
        """Start each behavior's sigmoid at its base rate (K,): the action head's bias becomes
        logit(rate). From a zero bias (p = 0.5) the bias alone would need thousands of steps at
        lr 1e-3 to reach, say, logit(0.08) = -2.4; until then a rare behavior is over-predicted."""
        if rates.shape != self.action_head.bias.shape:
            raise ValueError(f"rates must have shape {tuple(self.action_head.bias.shape)}, got {tuple(rates.shape)}")
        self.action_head.bias.copy_(torch.logit(rates.clamp(1e-6, 1 - 1e-6)))

    def forward(self, items, actions, valid, anchors):
        batch, length = items.shape
        if length > self.config.max_length:
            raise ValueError(f"sequences of {length} interactions exceed max_length ({self.config.max_length})")
        item_vectors, action_vectors = self.item_embedding(items), self.action_embedding(actions)
        if self.config.fusion == "interleave":
            return self._interleaved(item_vectors, action_vectors, valid, anchors)
        x = self.dropout(item_vectors + self.positions.weight[:length])
        values = self.action_values(actions)
        for block in self.blocks:
            x = block(x, valid, anchors, values)
        state = self.norm(x)
        return self.action_head(state), state + action_vectors

    def _interleaved(self, item_vectors, action_vectors, valid, anchors):
        batch, length, d = item_vectors.shape
        tokens = torch.stack([item_vectors, action_vectors], dim=2).view(batch, 2 * length, d)
        x = self.dropout(tokens + self.positions.weight[: 2 * length])
        token_valid = valid.repeat_interleave(2, dim=1)
        token_anchors = torch.stack([anchors, torch.zeros_like(anchors)], dim=2).view(batch, 2 * length)
        for block in self.blocks:
            x = block(x, token_valid, token_anchors, None)
        state = self.norm(x).view(batch, length, 2, d)
        return self.action_head(state[:, :, 0]), state[:, :, 1]

    def item_logits(self, states):
        """States (..., d) -> scores over every item (..., num_items) (the tied item embedding)."""
        return F.linear(states, self.item_embedding.weight)

    def next_item_loss(self, states, next_items):
        """Mean cross-entropy of `item_logits(states)` (N, d) against next_items (N,), without the (N, V) logits."""
        return linear_cross_entropy(states, self.item_embedding.weight, next_items)
