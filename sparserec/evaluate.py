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

Beam search is *approximate* full ranking: the beam keeps the best `beam_size` prefixes at each
token, so an item whose first tokens score low is pruned even when its full path would rank in the
top K. Only with beam_size >= the number of items is it exact. `exhaustive_rankings` scores every
item's full path (teacher-forced log-prob) for the true full ranking, to measure the beam's recall.
SASRec and the baselines rank the whole catalogue exactly.

mask_history (default False, every result table says which): drop the user's own past items
(everything before the target) from the ranking, the S3-Rec full-sort convention. Off by default
because in multi-behavior logs (Taobao, Retail) a buy often repeats a clicked item, and on Amazon
Beauty repeats are rare but real. SASRec masks its scores (exact); GRACE, popularity and recency
drop history items from their ranked lists, so GRACE with masking needs beam_size >= K plus the
history items the beam holds (`grace_rankings` widens the beam by `history_margin`).
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


def histories_of(data: InteractionData, targets: Targets) -> list:
    """Each target's past items (all of them, not only the model's window), as numpy arrays."""
    return [data.history(user, end=position)[0] for user, position in zip(targets.user, targets.position)]


def drop_history(ranked: torch.Tensor, histories: list, length: int) -> torch.Tensor:
    """(B, length): each row of `ranked` without the items in its history (and without -1), padded with -1."""
    kept = torch.full((ranked.shape[0], length), -1, dtype=torch.int64)
    for row, (items, history) in enumerate(zip(ranked.numpy(), histories)):
        items = items[(items >= 0) & ~np.isin(items, history)][:length]
        kept[row, : len(items)] = torch.from_numpy(items.copy())
    return kept


@torch.no_grad()
def grace_rankings(model, tokenizer: ItemTokenizer, data: InteractionData, targets: Targets, trie: Trie,
                   task: str, beam_size: int = 20, batch_size: int = 64,
                   max_interactions: int = DEFAULT_MAX_INTERACTIONS, progress: bool = True) -> torch.Tensor:
    """(len(targets), beam_size) item ids ranked by GRACE for `task`, -1 where the beam ran dry
    (approximate full ranking: see the module docstring)."""
    examples = GRACEExamples(data, tokenizer, targets, max_interactions)
    device = next(model.parameters()).device
    behavior_choices = tokenizer.behavior_tokens(np.arange(len(data.behaviors))).tolist()
    was_training = model.training
    model.eval()
    rankings = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"evaluate {task}", disable=not progress):
        batch = examples.collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        # The target's behavior token is given, unless the task generates it or the layout has none.
        given = batch["targets"][:, :1].to(device) if task != "behavior_item" and tokenizer.behavior_token else None
        items, _ = recommend(model, trie, batch["tokens"].to(device), batch["cu_seqlens"].to(device),
                             batch["anchor_mask"].to(device), beam_size, start_tokens=given,
                             prefix_tokens=behavior_choices if task == "behavior_item" and tokenizer.behavior_token else None)
        rankings.append(items.cpu())
    model.train(was_training)
    return torch.cat(rankings)


def evaluate_grace(model, tokenizer: ItemTokenizer, data: InteractionData, targets: Targets, task: str,
                   trie: Trie | None = None, beam_size: int = 20, ks=(5, 10), mask_history: bool = False,
                   history_margin: int = 10, exhaustive: bool = False, **options) -> dict:
    """Per-behavior HR@K / NDCG@K of GRACE on `task` (options: see `grace_rankings`).

    mask_history: rank without the user's past items, from a beam widened by `history_margin`.
    exhaustive: rank by every item's teacher-forced log-prob (`exhaustive_rankings`), not the beam."""
    if beam_size < max(ks):
        raise ValueError(f"beam_size ({beam_size}) must be >= max(ks) ({max(ks)}) for a full-ranking top K")
    targets = task_targets(data, targets, task)
    if trie is None:
        trie = Trie(tokenizer.item_paths(), device=next(model.parameters()).device)
    width = beam_size + (history_margin if mask_history else 0)
    if exhaustive:
        ranked = exhaustive_rankings(model, tokenizer, data, targets, task, width, **options)
    else:
        ranked = grace_rankings(model, tokenizer, data, targets, trie, task, width, **options)
    if mask_history:
        ranked = drop_history(ranked, histories_of(data, targets), max(ks))
    return _metrics(data, targets, ranked, ks)


@torch.no_grad()
def exhaustive_rankings(model, tokenizer: ItemTokenizer, data: InteractionData, targets: Targets, task: str,
                        top: int = 20, max_interactions: int = DEFAULT_MAX_INTERACTIONS, item_chunk: int = 4096,
                        progress: bool = True) -> torch.Tensor:
    """(len(targets), top) items ranked by the exact log-prob of their full token path (true full
    ranking), teacher-forced in chunks of `item_chunk` paths per user. Cost: num_items decoder
    passes per user, so for catalogs up to ~50k items and samples of users.

    For `behavior_item` the item's score is its best behavior's path score (max over behaviors);
    for the other tasks the target's behavior token is given, as in beam search."""
    examples = GRACEExamples(data, tokenizer, targets, max_interactions)
    device = next(model.parameters()).device
    paths = tokenizer.item_paths().to(device)  # (num_items, depth), without the behavior token
    behaviors = tokenizer.behavior_tokens(np.arange(len(data.behaviors)))
    behavior_options = torch.as_tensor(behaviors, device=device).flatten()
    was_training = model.training
    model.eval()
    rankings = []
    for index in tqdm(range(len(examples)), desc=f"exhaustive {task}", disable=not progress):
        batch = examples.collate([examples[index]])
        memory = model.encode(batch["tokens"].to(device), batch["cu_seqlens"].to(device),
                              batch["anchor_mask"].to(device))
        scores = []
        for start in range(0, len(paths), item_chunk):
            chunk = paths[start:start + item_chunk]
            if not tokenizer.behavior_token:
                scores.append(_path_log_probs(model, memory, chunk, include_first=True))
                continue
            given = batch["targets"][0, :1].to(device) if task != "behavior_item" else None
            options = [given] if given is not None else list(behavior_options[:, None])
            per_behavior = [_path_log_probs(model, memory, torch.cat([b.expand(len(chunk), 1), chunk], 1),
                                            include_first=given is None) for b in options]
            scores.append(torch.stack(per_behavior).amax(0))
        rankings.append(torch.cat(scores).topk(min(top, len(paths))).indices.cpu())
    model.train(was_training)
    return torch.stack(rankings)


def top_k_overlap(ranked, reference, k: int) -> torch.Tensor:
    """(B,) |ranked top-k ∩ reference top-k| / k per user: the beam's recall of the true top k when
    `reference` is `exhaustive_rankings` (-1 entries never match)."""
    top, true_top = ranked[:, :k], reference[:, :k]
    return ((top[:, :, None] == true_top[:, None, :]) & (top[:, :, None] >= 0)).any(2).double().sum(1) / k


def _path_log_probs(model, memory, sequences, include_first: bool):
    """Sum of log-probs of `sequences` (N, L) after the start token, for one request's memory
    (the first token's log-prob counted only when include_first: a given behavior is not scored)."""
    count = sequences.shape[0]
    cache = model.new_cache(memory, beams=count)
    start = sequences.new_full((count, 1), model.config.decoder_start_token_id)
    inputs = torch.cat([start, sequences[:, :-1]], dim=1)
    log_probs = torch.log_softmax(model.decode(inputs, cache).float(), dim=-1)
    token_log_probs = log_probs.gather(2, sequences[:, :, None])[:, :, 0]
    return token_log_probs.sum(1) if include_first else token_log_probs[:, 1:].sum(1)


@torch.no_grad()
def evaluate_sasrec(model, data: InteractionData, targets: Targets, ks=(5, 10), batch_size: int = 256,
                    mask_history: bool = False) -> dict:
    """Per-behavior HR@K / NDCG@K of SASRec (exact scores over all items; the task's behavior is
    ignored). mask_history: the user's past items score -inf."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad, max_length = model.pad_id, model.config.max_length
    rankings = []
    for start in range(0, len(targets), batch_size):
        histories = histories_of(data, Targets(targets.user[start:start + batch_size],
                                                   targets.position[start:start + batch_size]))
        inputs = torch.full((len(histories), min(max_length, max(map(len, histories)))), pad, dtype=torch.int64)
        for row, items in enumerate(histories):
            recent = items[-max_length:]
            inputs[row, : len(recent)] = torch.from_numpy(recent)
        scores = model.score(inputs.to(device))
        if mask_history:
            rows = torch.cat([torch.full((len(items),), row) for row, items in enumerate(histories)])
            scores[rows.to(device), torch.from_numpy(np.concatenate(histories)).to(device)] = float("-inf")
        rankings.append(scores.topk(max(ks), dim=1).indices.cpu())
    model.train(was_training)
    return _metrics(data, targets, torch.cat(rankings), ks)


def evaluate_popularity(data: InteractionData, train_end: np.ndarray, targets: Targets, ks=(5, 10),
                        mask_history: bool = False) -> dict:
    """Per-behavior HR@K / NDCG@K of ranking every user's items by training-set popularity."""
    rows = np.arange(data.num_interactions)
    training = rows < train_end[data.user_of_row]
    counts = np.bincount(data.item[training], minlength=data.num_items)
    order = np.argsort(-counts, kind="stable")
    if not mask_history:
        top = torch.from_numpy(order[: max(ks)].copy())
        return _metrics(data, targets, top.expand(len(targets), -1), ks)
    histories = histories_of(data, targets)
    longest = max((len(np.unique(items)) for items in histories), default=0)
    ranked = torch.from_numpy(order[: max(ks) + longest].copy()).expand(len(targets), -1)
    return _metrics(data, targets, drop_history(ranked, histories, max(ks)), ks)


def evaluate_recency(data: InteractionData, targets: Targets, ks=(5, 10)) -> dict:
    """Per-behavior HR@K / NDCG@K of ranking each user's own past items, most recent first (the
    repeat-consumption baseline: in multi-behavior logs a buy often follows a click or cart of the
    same item). It has no masked variant: with history masking it recommends nothing."""
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
