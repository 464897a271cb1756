"""SASRec (Kang & McAuley, 2018): a causal transformer over item ids, the sanity baseline.

Pre-norm blocks from `layers`, learned positions, and an output head over all items: the score of
item j after position t is h_t · e_j, a softmax over the whole catalogue (full ranking, no sampled
negatives). `head="tied"` shares e with the input item embedding; `head="untied"` learns its own.
Histories are right-padded (B, L) item ids with `pad_id` (= num_items); the causal mask alone keeps
padding (always after the real items) out of every real position.

Initialisation is N(0, 0.02) for every embedding and linear weight (BERT/GPT-2's), so the starting
logits are near zero and the first loss is close to ln(num_items). `nn.Embedding`'s default N(0, 1)
with a tied head starts with logits of std ≈ sqrt(d_model) and a loss several times ln(num_items),
which the model spends epochs unlearning (and overfits on the way).

Training: `model(inputs, next_items)` returns the mean cross-entropy over real positions only
(next_items: the history shifted left by one, pad_id where there is no next item); the catalogue
logits are computed for those positions alone, never for padding. `score` reads the last real
position's state and builds logits for that one row per history.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, FeedForward, causal_mask, linear_cross_entropy

HEADS = ("tied", "untied")
INIT_STD = 0.02


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    d_model: int = 64
    num_heads: int = 2
    layers: int = 2
    d_ff: int = 256
    dropout: float = 0.3
    max_length: int = 50
    head: str = "tied"

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")


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
        self.output = nn.Linear(config.d_model, config.num_items, bias=False) if config.head == "untied" else None
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                nn.init.normal_(module.weight, std=INIT_STD)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_id].zero_()

    @property
    def pad_id(self) -> int:
        return self.config.num_items

    def states(self, item_ids):
        """Right-padded histories (B, L) -> final hidden states (B, L, d_model)."""
        length = item_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"histories of {length} items exceed max_length ({self.config.max_length})")
        x = self.dropout(self.item_embedding(item_ids) + self.positions.weight[:length])
        mask = causal_mask(length, length, item_ids.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    @property
    def output_weight(self):
        """(num_items, d_model): the untied head's, or the item embedding without its padding row."""
        return self.output.weight if self.output is not None else self.item_embedding.weight[: self.pad_id]

    def logits(self, states):
        """States (..., d_model) -> scores over all items (..., num_items)."""
        return F.linear(states, self.output_weight)

    def forward(self, item_ids, next_items=None):
        """Without next_items: next-item logits at every position (B, L, num_items) (tests, inspection).
        With next_items (B, L): the mean cross-entropy over the positions whose next item is real."""
        states = self.states(item_ids)
        if next_items is None:
            return self.logits(states)
        real = next_items != self.pad_id
        return linear_cross_entropy(states[real], self.output_weight, next_items[real])

    def score(self, item_ids):
        """Full-ranking scores (B, num_items) of the item after each right-padded history (B, L)."""
        last = (item_ids != self.pad_id).sum(1) - 1
        if int(last.min()) < 0:
            raise ValueError("every history needs at least one item")
        states = self.states(item_ids)
        return self.logits(states[torch.arange(item_ids.shape[0], device=item_ids.device), last])
