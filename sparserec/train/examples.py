"""Training examples for the recommenders: next-interaction targets -> batches -> a loss.

GRACE (`GRACEExamples`, `grace_loss`): each example is one target interaction of a user and the
history before it; a batch packs the histories' tokens (flash-attn varlen layout, with the jrn
anchors) and teacher-forces the decoder on the target's `[behavior] [CoT] [SID] [collision]`.
SASRec (`SASRecExamples`, `sasrec_loss`): each example is one user's training sequence,
right-padded; every real position predicts the next item (padded positions cost no logits).
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import InteractionData, Targets
from ..models import shift_right, sequence_loss
from ..tokenize import BOS, ItemTokenizer

# MBGen caps histories at 50 interactions; older events are dropped (anchors are recomputed).
DEFAULT_MAX_INTERACTIONS = 50


class GRACEExamples(Dataset):
    """Next-interaction examples (target rows of `targets`); batches come from `collate`."""

    def __init__(self, data: InteractionData, tokenizer: ItemTokenizer, targets: Targets,
                 max_interactions: int = DEFAULT_MAX_INTERACTIONS):
        if len(targets) == 0:
            raise ValueError("GRACEExamples needs at least one target")
        self.data, self.tokenizer, self.targets = data, tokenizer, targets
        self.max_interactions = max_interactions

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return int(self.targets.user[index]), int(self.targets.position[index])

    def collate(self, examples) -> dict:
        """(user, target row) pairs -> {tokens, cu_seqlens, anchor_mask (packed histories),
        targets (B, tokens_per_interaction), decoder_input_ids, behaviors (B,), items (B,)}."""
        users, rows = (np.asarray(column) for column in zip(*examples))
        packed = self.tokenizer.batch_history_tokens(
            (self.data.history(user, end=row) for user, row in zip(users, rows)), self.max_interactions)
        items, behaviors = self.data.item[rows], self.data.behavior[rows]
        targets = self.tokenizer.interaction_tokens(items, behaviors)
        return {"tokens": packed.tokens, "cu_seqlens": packed.cu_seqlens, "anchor_mask": packed.anchor_mask,
                "targets": targets, "decoder_input_ids": shift_right(targets, BOS),
                "items": torch.from_numpy(items).long(), "behaviors": torch.from_numpy(behaviors).long()}

    @staticmethod
    def counts(batch) -> tuple:
        """(examples, history tokens) of a collated batch: what the trainer's throughput counts."""
        return batch["targets"].shape[0], batch["tokens"].shape[0]


def grace_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the target's tokens (behavior, CoT, SID, collision)."""
    logits = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"], batch["decoder_input_ids"])
    return sequence_loss(logits, batch["targets"])


class SASRecExamples(Dataset):
    """One example per user: the most recent `max_length + 1` of its first `end[u]` items."""

    def __init__(self, data: InteractionData, end: np.ndarray, max_length: int):
        self.data, self.max_length = data, max_length
        starts = data.user_ptr[:-1]
        self.users = np.flatnonzero(end - starts >= 2)  # a sequence needs an input and a next item
        self.end = end
        if len(self.users) == 0:
            raise ValueError("SASRecExamples needs a user with at least two training interactions")

    def __len__(self):
        return len(self.users)

    def __getitem__(self, index):
        user = self.users[index]
        items, _ = self.data.history(user, end=self.end[user])
        return torch.from_numpy(items[-(self.max_length + 1):]).long()

    def collate(self, sequences) -> dict:
        """Right-padded inputs (B, L) and next items (B, L), pad id = num_items."""
        pad = self.data.num_items
        length = max(len(sequence) for sequence in sequences) - 1
        inputs = torch.full((len(sequences), length), pad, dtype=torch.int64)
        next_items = torch.full_like(inputs, pad)
        for row, sequence in enumerate(sequences):
            inputs[row, : len(sequence) - 1] = sequence[:-1]
            next_items[row, : len(sequence) - 1] = sequence[1:]
        return {"inputs": inputs, "next_items": next_items}

    def counts(self, batch) -> tuple:
        """(examples, real input positions) of a collated batch: what the trainer's throughput counts."""
        return batch["inputs"].shape[0], int((batch["inputs"] != self.data.num_items).sum())


def sasrec_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over real (non-padded) positions; catalogue logits only where they count."""
    return model(batch["inputs"], batch["next_items"])
