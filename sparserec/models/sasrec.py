"""SASRec (Kang & McAuley, 2018): a causal transformer over item ids, the sanity baseline.

Pre-norm blocks from `layers`, learned positions, item embedding shared with the output: the
score of item j after position t is h_t · e_j, a softmax over all items (full ranking, no
sampled negatives). Histories are right-padded (B, L) item ids with `pad_id` (= num_items); the
causal mask alone keeps padding (always after the real items) out of every real position.
Training: `sequence_loss(model(items), next_items, ignore_index=pad_id)` (next_items: the
history shifted left by one, pad_id where there is no next item).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, FeedForward, causal_mask


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    d_model: int = 64
    num_heads: int = 2
    layers: int = 2
    d_ff: int = 256
    dropout: float = 0.2
    max_length: int = 200


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.attention = Attention(config.d_model, config.num_heads, config.num_heads, config.dropout)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ffn = FeedForward(config.d_model, config.d_ff, "gelu", config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        h = self.attention_norm(x)
        x = x + self.dropout(self.attention(h, *self.attention.keys_values(h), attn_mask=mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.num_items + 1, config.d_model, padding_idx=config.num_items)
        self.positions = nn.Embedding(config.max_length, config.d_model)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def pad_id(self) -> int:
        return self.config.num_items

    def forward(self, item_ids):
        """Right-padded histories (B, L) -> next-item logits over all items (B, L, num_items)."""
        length = item_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"histories of {length} items exceed max_length ({self.config.max_length})")
        x = self.dropout(self.item_embedding(item_ids) + self.positions.weight[:length])
        mask = causal_mask(length, length, item_ids.device)
        for block in self.blocks:
            x = block(x, mask)
        return F.linear(self.norm(x), self.item_embedding.weight[: self.pad_id])

    def score(self, item_ids):
        """Full-ranking scores (B, num_items) of the item after each right-padded history (B, L)."""
        last = (item_ids != self.pad_id).sum(1) - 1
        if int(last.min()) < 0:
            raise ValueError("every history needs at least one item")
        logits = self(item_ids)
        return logits[torch.arange(item_ids.shape[0], device=item_ids.device), last]
