"""Training and evaluation of the generative ranker (`sparserec.models.gr`), both objectives at every position.

Examples: one per user, the most recent `max_length` of its training interactions
(`split.train_end`); every real position is an action target, every position but the last a
next-item target. Evaluation, per evaluated user (leave-one-out as in the rest of the package):
one forward over the user's most recent `max_length` interactions up to and including its
validation row (the second-to-last event; never trained on). The last position's action logits
predict that row's behavior (action metrics: per-behavior log loss, NE, AUC); its next-item state
ranks the whole catalogue for the test row's item (HR@10, NDCG@10). The action is read at the
validation row, not the test row, because Retail's last event is by construction always a buy
(MBHT's session target): its test-row action labels hold one class.
"""
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import InteractionData, DataSplit
from ..metrics import action_metrics, ranking_metrics
from ..models.gr import GenerativeRanker
from .trainer import Trainer, TrainConfig


def journey_anchors(data: InteractionData):
    """items (n,) -> anchors (n,) bool: the first interaction and every one whose product type
    differs from the previous one's (SPEC §3); on data without product types, the first only."""
    codes = {}
    types = np.array([codes.setdefault(t, len(codes)) for t in data.items.product_type], dtype=np.int64)

    def anchors(items):
        kinds = types[items]
        return np.concatenate([[True], kinds[1:] != kinds[:-1]]) if len(items) else np.zeros(0, dtype=bool)
    return anchors


def padded_batch(sequences, anchors_of) -> dict:
    """[(items, actions) int64 arrays] -> {items, actions, valid, anchors} (B, L), right-padded with 0."""
    length = max(len(items) for items, _ in sequences)
    batch = {name: torch.zeros(len(sequences), length, dtype=torch.int64) for name in ("items", "actions")}
    batch["valid"] = torch.zeros(len(sequences), length, dtype=torch.bool)
    batch["anchors"] = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, (items, actions) in enumerate(sequences):
        n = len(items)
        batch["items"][row, :n] = torch.from_numpy(np.asarray(items, dtype=np.int64))
        batch["actions"][row, :n] = torch.from_numpy(np.asarray(actions, dtype=np.int64))
        batch["valid"][row, :n] = True
        batch["anchors"][row, :n] = torch.from_numpy(anchors_of(np.asarray(items)))
    return batch


class RankerExamples(Dataset):
    """One example per user with at least two training interactions: its last `max_length` of them."""

    def __init__(self, data: InteractionData, train_end: np.ndarray, max_length: int):
        self.data, self.train_end, self.max_length = data, train_end, max_length
        self.users = np.flatnonzero(train_end - data.user_ptr[:-1] >= 2)
        if len(self.users) == 0:
            raise ValueError(f"{data.name}: no user has two training interactions")
        self.anchors_of = journey_anchors(data)

    def __len__(self):
        return len(self.users)

    def __getitem__(self, index):
        user = self.users[index]
        items, actions = self.data.history(user, end=self.train_end[user])
        return items[-self.max_length:], actions[-self.max_length:]

    def collate(self, sequences) -> dict:
        return padded_batch(sequences, self.anchors_of)

    def interactions_per_epoch(self) -> int:
        return int(sum(min(self.train_end[u] - self.data.user_ptr[u], self.max_length) for u in self.users))


def ranker_loss(model, batch) -> torch.Tensor:
    """Both objectives, summed: the mean over real positions of the K behaviors' binary
    cross-entropies (label 1[a_n = b], summed over b), plus the mean next-item cross-entropy
    (full catalogue) over the positions whose next item is in the sequence."""
    valid = batch["valid"]
    action_logits, states = model(batch["items"], batch["actions"], valid, batch["anchors"])
    labels = F.one_hot(batch["actions"][valid], action_logits.shape[-1]).float()
    action_loss = F.binary_cross_entropy_with_logits(action_logits[valid].float(), labels,
                                                     reduction="sum") / labels.shape[0]
    has_next = valid[:, 1:]
    next_logits = model.item_logits(states[:, :-1][has_next]).float()
    return action_loss + F.cross_entropy(next_logits, batch["items"][:, 1:][has_next])


@torch.no_grad()
def evaluate_ranker(model: GenerativeRanker, data: InteractionData, split: DataSplit, users=None,
                    batch_size: int = 128) -> dict:
    """{"action": action_metrics at the validation rows, "next_item": ranking_metrics (K = 5, 10)
    for the test rows} over `users` (indices into split.test; default: all evaluated users)."""
    model.eval()
    device = next(model.parameters()).device
    order = np.arange(len(split.test)) if users is None else np.asarray(users)
    anchors_of = journey_anchors(data)
    logits, actions, ranked, targets = [], [], [], []
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        sequences = []
        for j in chosen:
            user, valid_row = split.valid.user[j], split.valid.position[j]
            items, behaviors = data.history(user, end=valid_row + 1)
            sequences.append((items[-model.config.max_length:], behaviors[-model.config.max_length:]))
        batch = {k: v.to(device) for k, v in padded_batch(sequences, anchors_of).items()}
        action_logits, states = model(batch["items"], batch["actions"], batch["valid"], batch["anchors"])
        last = batch["valid"].sum(1) - 1
        rows = torch.arange(len(chosen), device=device)
        logits.append(action_logits[rows, last].float().cpu())
        actions.append(batch["actions"][rows, last].cpu())
        ranked.append(model.item_logits(states[rows, last]).topk(10, dim=-1).indices.cpu())
        targets.append(torch.from_numpy(data.item[split.test.position[chosen]]))
    actions = torch.cat(actions)
    return {"action": action_metrics(torch.cat(logits), actions, data.behaviors),
            "action_training_rates": training_rate_predictor(data, split, actions),
            "next_item": ranking_metrics(torch.cat(ranked), torch.cat(targets), ks=(5, 10))}


def training_rate_predictor(data: InteractionData, split: DataSplit, actions) -> dict:
    """action_metrics of the constant predictor p_b = behavior b's share of the training
    interactions, on the evaluated actions (B,): the reference a model's NE must beat (AUC 0.5)."""
    rows = np.arange(data.num_interactions)
    training = data.behavior[rows < split.train_end[data.user_of_row]]
    rates = torch.from_numpy(np.bincount(training, minlength=len(data.behaviors)) / len(training))
    return action_metrics(torch.logit(rates).expand(len(actions), -1), actions, data.behaviors)


def train_ranker(model: GenerativeRanker, data: InteractionData, split: DataSplit, config: TrainConfig,
                 out_dir: str, resume: bool = False, test_users: int | None = None, seed: int = 0) -> dict:
    """Trains for config.max_steps (checkpoints in out_dir; resume continues them), evaluates,
    writes out_dir/metrics.json and returns it: test metrics, training seconds and steps, steps per
    epoch, sequence tokens per step (mean over an epoch) and seconds per step and per epoch."""
    examples = RankerExamples(data, split.train_end, model.config.max_length)
    checkpoint = os.path.join(out_dir, "checkpoint.pt")
    trainer = Trainer(model, examples, ranker_loss, dataclasses.replace(config, checkpoint_path=checkpoint),
                      collate_fn=examples.collate)
    if resume:
        trainer.load_checkpoint(checkpoint)
    first_step = trainer.step
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    steps_per_epoch = -(-len(examples) // config.batch_size)
    users = None
    if test_users is not None and test_users < len(split.test):
        users = np.sort(np.random.default_rng(seed).choice(len(split.test), test_users, replace=False))
    metrics = {
        "test": evaluate_ranker(model, data, split, users),
        "train_seconds": seconds, "steps": result.step, "steps_timed": result.step - first_step,
        "seconds_per_step": seconds / max(1, result.step - first_step), "steps_per_epoch": steps_per_epoch,
        "tokens_per_step": examples.interactions_per_epoch() * model.config.tokens_per_interaction / steps_per_epoch,
        "train_users": len(examples), "loss_history": result.history, "threads": torch.get_num_threads(),
    }
    metrics["seconds_per_epoch"] = metrics["seconds_per_step"] * steps_per_epoch
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2, default=float)
    return metrics


def format_ranker_metrics(metrics: dict, behaviors) -> str:
    """A markdown summary of `train_ranker`'s metrics: per-behavior action metrics, next item, cost."""
    action, ranking = metrics["test"]["action"], metrics["test"]["next_item"]
    lines = [f"action prediction at the validation row ({action['count']} users; mean NE {action['mean_ne']:.4f})",
             "| behavior | base rate | log loss | NE | AUC |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {action[name]['base_rate']:.4f} | {action[name]['log_loss']:.4f} | "
              f"{action[name]['ne']:.4f} | {action[name]['auc']:.4f} |" for name in behaviors]
    baseline = metrics["test"]["action_training_rates"]
    lines.append("constant predictor (training base rates) NE: " + ", ".join(
        f"{name} {baseline[name]['ne']:.4f}" for name in behaviors) + f"; mean {baseline['mean_ne']:.4f}")
    lines.append(f"next item at the test row ({ranking['count']} users, full ranking): HR@10 {ranking['hr@10']:.4f} "
                 f"± {ranking['hr@10_se']:.4f}, NDCG@10 {ranking['ndcg@10']:.4f} ± {ranking['ndcg@10_se']:.4f}")
    lines.append(f"training: {metrics['steps']} steps, {metrics['seconds_per_step']:.3f} s/step, "
                 f"{metrics['steps_per_epoch']} steps/epoch = {metrics['seconds_per_epoch']:.1f} s/epoch, "
                 f"{metrics['tokens_per_step']:.0f} sequence tokens/step, {metrics['threads']} threads")
    return "\n".join(lines)
