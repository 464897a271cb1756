"""Chronological splits: leave-one-out (TIGER / GRAM on Amazon) and MBGen's multi-behavior protocol.

A split never copies events. Targets are row indices into the data's flat arrays: target j is
row `position[j]` of user `user[j]`, and its history is that user's rows before it
(`data.history(user, end=position)`). Training uses each user's rows `user_ptr[u]:train_end[u]`.
"""
from dataclasses import dataclass, replace

import numpy as np

from .interactions import InteractionData


@dataclass(frozen=True)
class Targets:
    """Next-interaction targets: (user index, row index of the target interaction) pairs."""

    user: np.ndarray
    position: np.ndarray

    def __len__(self):
        return int(self.user.shape[0])

    def items(self, data: InteractionData) -> np.ndarray:
        return data.item[self.position]

    def behaviors(self, data: InteractionData) -> np.ndarray:
        return data.behavior[self.position]

    def with_behavior(self, data: InteractionData, name: str) -> "Targets":
        """The targets whose interaction has behavior `name` (MBGen's target-behavior task: "buy")."""
        keep = self.behaviors(data) == data.behavior_code(name)
        return Targets(self.user[keep], self.position[keep])


@dataclass(frozen=True)
class DataSplit:
    protocol: str
    train_end: np.ndarray  # (num_users,) user u trains on rows user_ptr[u]:train_end[u]
    valid: Targets
    test: Targets

    def train_targets(self, data: InteractionData, min_history: int = 1) -> Targets:
        """Every training row with at least `min_history` earlier training rows of its user, as a
        target (the prefix augmentation MBGen and TIGER train with)."""
        users = data.user_of_row
        rows = np.arange(data.num_interactions)
        keep = (rows < self.train_end[users]) & (rows - data.user_ptr[users] >= min_history)
        return Targets(users[keep], rows[keep])


def leave_one_out(data: InteractionData, min_interactions: int = 3) -> DataSplit:
    """TIGER / GRAM / P5 protocol: per user, the last interaction is the test target (its history
    is everything before it), the second-to-last the validation target, the rest is training.
    Users with fewer than `min_interactions` events are not evaluated; all their events train.
    (Amazon Beauty is 5-core, so every user is evaluated there.)"""
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3 (one training event, valid, test), got {min_interactions}")
    ends = data.user_ptr[1:]
    evaluated = data.lengths >= min_interactions
    users = np.flatnonzero(evaluated)
    return DataSplit(
        protocol="leave_one_out",
        train_end=np.where(evaluated, ends - 2, ends),
        valid=Targets(users, ends[users] - 2),
        test=Targets(users, ends[users] - 1),
    )


def mbgen_split(data: InteractionData, min_interactions: int = 4) -> DataSplit:
    """MBGen's protocol (anananan116/MBGen, data/preprocessing/preprocess.py), target behavior = buy.

    What is implemented: each user's chronological sequence over *all* behaviors is split
    leave-one-out — the last interaction is the test target, the second-to-last the validation
    target, the rest trains (every prefix of it as a next-interaction example, see
    `DataSplit.train_targets`). Users with fewer than `min_interactions` (MBGen: 4) events are not
    evaluated (MBGen drops them; here their events still train). The three MBGen tasks read the
    same targets: target-behavior item prediction = `split.test.with_behavior(data, "buy")`
    (MBGen's `test.inter`: only users whose last interaction is a buy, behavior token given);
    behavior-specific item prediction = all of `split.test`, the target's behavior token given;
    behavior-item prediction = all of `split.test`, the model generates the behavior too (MBGen's
    `test_all.inter`). Not done here: MBGen's item filter (items seen >= 5 times in training
    prefixes; use `k_core` when loading) and its 50-event history cap (the model truncates).
    """
    if data.target_behavior is None:
        raise ValueError(f"{data.name} has no target behavior; use leave_one_out for single-behavior data")
    return replace(leave_one_out(data, min_interactions), protocol="mbgen")
