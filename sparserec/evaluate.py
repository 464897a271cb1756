"""Full-ranking evaluation of the recommenders on a split's targets (SPEC §3, MBGen's three tasks).

GRACE ranks items by trie-constrained beam search (every result is a real item), so a beam of at
least max(ks) gives the full-ranking top K. Tasks (MBGen, arXiv 2405.16871):

| task | targets | what the decoder is given |
|---|---|---|
| `target_behavior` | those whose behavior is the data's target behavior (buy) | that behavior token |
| `behavior_specific` | all | the target's own behavior token |
| `behavior_item` | all | nothing: it generates the behavior token, then the item |

Single-behavior data (Amazon) has one task, `behavior_specific` (plain next-item prediction).
Every result is `sparserec.metrics.per_behavior_metrics`: {"all": {...}, behavior: {...}}.
"""
import numpy as np
import torch
from tqdm.auto import tqdm

from .data import InteractionData, Targets
from .generate import Trie
from .metrics import per_behavior_metrics
from .models import recommend
from .tokenize import ItemTokenizer
from .train.examples import DEFAULT_MAX_INTERACTIONS, GRACEExamples

TASKS = ("target_behavior", "behavior_specific", "behavior_item")


def tasks_for(data: InteractionData) -> tuple:
    return TASKS if data.target_behavior is not None else ("behavior_specific",)


def task_targets(data: InteractionData, targets: Targets, task: str) -> Targets:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "target_behavior":
        if data.target_behavior is None:
            raise ValueError(f"{data.name} has no target behavior, so no target_behavior task")
        return targets.with_behavior(data, data.target_behavior)
    return targets


@torch.no_grad()
def grace_rankings(model, tokenizer: ItemTokenizer, data: InteractionData, targets: Targets, trie: Trie,
                   task: str, beam_size: int = 20, batch_size: int = 64,
                   max_interactions: int = DEFAULT_MAX_INTERACTIONS, progress: bool = True) -> torch.Tensor:
    """(len(targets), beam_size) item ids ranked by GRACE for `task`, -1 where the beam ran dry."""
    examples = GRACEExamples(data, tokenizer, targets, max_interactions)
    device = next(model.parameters()).device
    behavior_choices = tokenizer.behavior_tokens(np.arange(len(data.behaviors))).tolist()
    was_training = model.training
    model.eval()
    rankings = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"evaluate {task}", disable=not progress):
        batch = examples.collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        given = batch["targets"][:, :1].to(device) if task != "behavior_item" else None
        items, _ = recommend(model, trie, batch["tokens"].to(device), batch["cu_seqlens"].to(device),
                             batch["anchor_mask"].to(device), beam_size, start_tokens=given,
                             prefix_tokens=behavior_choices if task == "behavior_item" else None)
        rankings.append(items.cpu())
    model.train(was_training)
    return torch.cat(rankings)


def evaluate_grace(model, tokenizer: ItemTokenizer, data: InteractionData, targets: Targets, task: str,
                   trie: Trie | None = None, beam_size: int = 20, ks=(5, 10), **options) -> dict:
    """Per-behavior HR@K / NDCG@K of GRACE on `task` (options: see `grace_rankings`)."""
    if beam_size < max(ks):
        raise ValueError(f"beam_size ({beam_size}) must be >= max(ks) ({max(ks)}) for a full-ranking top K")
    targets = task_targets(data, targets, task)
    if trie is None:
        trie = Trie(tokenizer.item_paths(), device=next(model.parameters()).device)
    ranked = grace_rankings(model, tokenizer, data, targets, trie, task, beam_size, **options)
    return _metrics(data, targets, ranked, ks)


@torch.no_grad()
def evaluate_sasrec(model, data: InteractionData, targets: Targets, ks=(5, 10), batch_size: int = 256) -> dict:
    """Per-behavior HR@K / NDCG@K of SASRec (scores over all items; the task's behavior is ignored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad, max_length = model.pad_id, model.config.max_length
    rankings = []
    for start in range(0, len(targets), batch_size):
        histories = [data.history(u, end=p)[0][-max_length:]
                     for u, p in zip(targets.user[start:start + batch_size], targets.position[start:start + batch_size])]
        inputs = torch.full((len(histories), max(map(len, histories))), pad, dtype=torch.int64)
        for row, items in enumerate(histories):
            inputs[row, : len(items)] = torch.from_numpy(items)
        rankings.append(model.score(inputs.to(device)).topk(max(ks), dim=1).indices.cpu())
    model.train(was_training)
    return _metrics(data, targets, torch.cat(rankings), ks)


def evaluate_popularity(data: InteractionData, train_end: np.ndarray, targets: Targets, ks=(5, 10)) -> dict:
    """Per-behavior HR@K / NDCG@K of ranking every user's items by training-set popularity."""
    rows = np.arange(data.num_interactions)
    training = rows < train_end[data.user_of_row]
    counts = np.bincount(data.item[training], minlength=data.num_items)
    top = torch.from_numpy(np.argsort(-counts, kind="stable")[: max(ks)].copy())
    return _metrics(data, targets, top.expand(len(targets), -1), ks)


def evaluate_recency(data: InteractionData, targets: Targets, ks=(5, 10)) -> dict:
    """Per-behavior HR@K / NDCG@K of ranking each user's own past items, most recent first (the
    repeat-consumption baseline: in multi-behavior logs a buy often follows a click or cart of the
    same item)."""
    ranked = torch.full((len(targets), max(ks)), -1, dtype=torch.int64)
    for row, (user, position) in enumerate(zip(targets.user, targets.position)):
        items = data.history(user, end=position)[0][::-1]
        _, first = np.unique(items, return_index=True)
        recent = items[np.sort(first)][: max(ks)]
        ranked[row, : len(recent)] = torch.from_numpy(recent.copy())
    return _metrics(data, targets, ranked, ks)


def _metrics(data: InteractionData, targets: Targets, ranked: torch.Tensor, ks) -> dict:
    return per_behavior_metrics(ranked, torch.from_numpy(targets.items(data)).long(),
                                torch.from_numpy(targets.behaviors(data)).long(), data.behaviors, ks)
