"""Training and evaluation of the generative ranker (`sparserec.models.gr`), both objectives at every position.

Two evaluation protocols, one per objective (docs/action_fusion.md, "Evaluation"):

- **Action**: a seeded 10% of the users (`action_users`) are held out of training entirely; every
  position of their most recent `max_length` training-split interactions is an action target,
  predicted from its history and its item. Per-behavior log loss, NE and AUC over those positions.
  (Held-out *users* rather than held-out last rows: a user's last rows are not distributed like
  the rest — Retail's last event is always MBHT's appended buy, its second-to-last is a buy or
  aux_1 two to three times as often as elsewhere — so a model trained on all positions is mis-scored there.)
- **Next item**: leave-one-out as in the rest of the package, on the other users: one forward over
  the most recent `max_length` interactions up to and including the validation row; the last
  position's next-item state ranks the whole catalogue for the test row's item (HR@10, NDCG@10).

Examples: one per training user, the most recent `max_length` of its training interactions
(`split.train_end`); every real position is an action target, every position but the last a
next-item target.
"""
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import DataSplit, InteractionData, journey_shifts
from ..metrics import action_metrics, ranking_metrics
from ..models.gr import GenerativeRanker
from .trainer import Trainer, TrainConfig


def journey_anchors(data: InteractionData):
    """items (n,) -> anchors (n,) bool: the first interaction and every one whose product type
    differs from the previous one's (SPEC §3); on data without product types, the first only."""
    codes = {}
    types = np.array([codes.setdefault(t, len(codes)) for t in data.items.product_type], dtype=np.int64)

    def anchors(items):
        return journey_shifts(types[items])
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


def trainable_users(data: InteractionData, train_end: np.ndarray) -> np.ndarray:
    """Users with at least two training interactions (an input and a next item)."""
    return np.flatnonzero(train_end - data.user_ptr[:-1] >= 2)


def action_users(data: InteractionData, train_end: np.ndarray, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """The users held out of training for the action evaluation: `fraction` of the trainable
    users, drawn with `seed`, sorted."""
    users = trainable_users(data, train_end)
    count = max(1, round(fraction * len(users)))
    return np.sort(np.random.default_rng(seed).choice(users, count, replace=False))


class RankerExamples(Dataset):
    """One example per trainable user not in `held_out`: its last `max_length` training interactions."""

    def __init__(self, data: InteractionData, train_end: np.ndarray, max_length: int, held_out=()):
        self.data, self.train_end, self.max_length = data, train_end, max_length
        self.users = np.setdiff1d(trainable_users(data, train_end), np.asarray(held_out, dtype=np.int64))
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
    return action_loss + model.next_item_loss(states[:, :-1][has_next], batch["items"][:, 1:][has_next])


@torch.no_grad()
def evaluate_ranker(model: GenerativeRanker, data: InteractionData, split: DataSplit, held_out,
                    next_item_targets=None, batch_size: int = 128) -> dict:
    """{"action": action_metrics over every position of the `held_out` users' training-split
    windows, "action_training_rates": the constant predictor's, "next_item": ranking_metrics
    (K = 5, 10) for the test rows of `next_item_targets` (indices into split.test; default: every
    evaluated user not held out)}."""
    model.eval()
    device = next(model.parameters()).device
    anchors_of, length = journey_anchors(data), model.config.max_length

    def forward(sequences):
        batch = {k: v.to(device) for k, v in padded_batch(sequences, anchors_of).items()}
        return batch, *model(batch["items"], batch["actions"], batch["valid"], batch["anchors"])

    logits, actions = [], []
    for start in range(0, len(held_out), batch_size):
        sequences = [tuple(x[-length:] for x in data.history(u, end=split.train_end[u]))
                     for u in held_out[start:start + batch_size]]
        batch, action_logits, _ = forward(sequences)
        logits.append(action_logits[batch["valid"]].float().cpu())
        actions.append(batch["actions"][batch["valid"]].cpu())
    if next_item_targets is None:
        next_item_targets = np.flatnonzero(~np.isin(split.test.user, held_out))
    ranked, targets = [], []
    for start in range(0, len(next_item_targets), batch_size):
        chosen = next_item_targets[start:start + batch_size]
        sequences = [tuple(x[-length:] for x in data.history(u, end=row + 1))
                     for u, row in zip(split.valid.user[chosen], split.valid.position[chosen])]
        batch, _, states = forward(sequences)
        last = batch["valid"].sum(1) - 1
        ranked.append(model.item_logits(states[torch.arange(len(chosen), device=device), last]).topk(10).indices.cpu())
        targets.append(torch.from_numpy(data.item[split.test.position[chosen]]))
    actions = torch.cat(actions)
    return {"action": action_metrics(torch.cat(logits), actions, data.behaviors),
            "action_training_rates": training_rate_predictor(data, split, held_out, actions),
            "next_item": ranking_metrics(torch.cat(ranked), torch.cat(targets), ks=(5, 10))}


def training_rates(data: InteractionData, split: DataSplit, held_out) -> torch.Tensor:
    """(K,) float64: each behavior's share of the training interactions, held-out users excluded."""
    users = data.user_of_row
    rows = np.arange(data.num_interactions)
    training = data.behavior[(rows < split.train_end[users]) & ~np.isin(users, held_out)]
    return torch.from_numpy(np.bincount(training, minlength=len(data.behaviors)) / len(training))


def training_rate_predictor(data: InteractionData, split: DataSplit, held_out, actions) -> dict:
    """action_metrics of the constant predictor p_b = `training_rates`, on the evaluated actions
    (B,): the reference a model's NE must beat (its AUC is 0.5)."""
    rates = training_rates(data, split, held_out)
    return action_metrics(torch.logit(rates).expand(len(actions), -1), actions, data.behaviors)


def train_ranker(model: GenerativeRanker, data: InteractionData, split: DataSplit, config: TrainConfig,
                 out_dir: str, resume: bool = False, test_users: int | None = None, seed: int = 0,
                 curve_every: int = 0) -> dict:
    """Starts the action head at the training base rates, trains for config.max_steps (checkpoints
    in out_dir; resume continues them), evaluates, writes out_dir/metrics.json and returns it: test
    metrics, training seconds and steps, steps per epoch, sequence tokens per step (mean over an
    epoch) and seconds per step and per epoch. curve_every > 0: the test metrics every that many
    steps as well ("curve"; a learning curve, not used to pick weights: the last step's are kept;
    a resumed run records the points after its resumption)."""
    held_out = action_users(data, split.train_end, seed=seed)
    examples = RankerExamples(data, split.train_end, model.config.max_length, held_out)
    model.set_action_prior(training_rates(data, split, held_out).float())  # a resumed checkpoint replaces it
    checkpoint = os.path.join(out_dir, "checkpoint.pt")
    trainer = Trainer(model, examples, ranker_loss, dataclasses.replace(config, checkpoint_path=checkpoint),
                      collate_fn=examples.collate)
    if resume:
        trainer.load_checkpoint(checkpoint)
    next_item_targets = np.flatnonzero(~np.isin(split.test.user, held_out))
    if test_users is not None and test_users < len(next_item_targets):
        next_item_targets = np.sort(np.random.default_rng(seed).choice(next_item_targets, test_users, replace=False))
    first_step, seconds, curve = trainer.step, 0.0, []
    pauses = range(curve_every, config.max_steps, curve_every) if curve_every else ()
    for stop_at in [step for step in pauses if step > first_step] + [config.max_steps]:
        if config.time_limit_s:  # the limit is the whole run's, not each segment's
            trainer.config = dataclasses.replace(trainer.config, time_limit_s=max(1e-6, config.time_limit_s - seconds))
        started = time.perf_counter()
        result = trainer.fit(stop_at=stop_at)
        seconds += time.perf_counter() - started  # training only: the curve's evaluations are not timed
        if result.step < stop_at:  # the time limit
            break
        if stop_at < config.max_steps:
            curve.append({"step": result.step, "cpu_s": trainer.cpu_seconds(),
                          **evaluate_ranker(model, data, split, held_out, next_item_targets)})
    test = evaluate_ranker(model, data, split, held_out, next_item_targets)
    if curve_every:
        curve.append({"step": result.step, "cpu_s": trainer.cpu_seconds(), **test})
    steps_per_epoch = -(-len(examples) // config.batch_size)
    metrics = {
        "test": test, "curve": curve,
        "action_users": len(held_out),
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
    lines = [f"action prediction on {metrics['action_users']} held-out users ({action['count']} positions; "
             f"mean NE {action['mean_ne']:.4f})",
             "| behavior | base rate | log loss | NE | AUC |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {action[name]['base_rate']:.4f} | {action[name]['log_loss']:.4f} | "
              f"{action[name]['ne']:.4f} | {action[name]['auc']:.4f} |" for name in behaviors]
    baseline = metrics["test"]["action_training_rates"]
    lines.append("constant predictor (training base rates) NE: " + ", ".join(
        f"{name} {baseline[name]['ne']:.4f}" for name in behaviors) + f"; mean {baseline['mean_ne']:.4f}")
    lines.append(f"next item at the test row ({ranking['count']} users, full ranking): HR@10 {ranking['hr@10']:.4f} "
                 f"± {ranking['hr@10_se']:.4f}, NDCG@10 {ranking['ndcg@10']:.4f} ± {ranking['ndcg@10_se']:.4f}")
    if metrics.get("curve"):
        lines += ["learning curve (test metrics at these steps; the last step's weights are the run's):",
                  "| step | action mean NE | next item HR@10 | NDCG@10 |", "|---|---|---|---|"]
        lines += [f"| {point['step']} | {point['action']['mean_ne']:.4f} | {point['next_item']['hr@10']:.4f} | "
                  f"{point['next_item']['ndcg@10']:.4f} |" for point in metrics["curve"]]
    lines.append(f"training: {metrics['steps']} steps, {metrics['seconds_per_step']:.3f} s/step, "
                 f"{metrics['steps_per_epoch']} steps/epoch = {metrics['seconds_per_epoch']:.1f} s/epoch, "
                 f"{metrics['tokens_per_step']:.0f} sequence tokens/step, {metrics['threads']} threads")
    return "\n".join(lines)
