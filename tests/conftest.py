"""Shared test set-up. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before any test module imports triton, so it is set here."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_behavior_data():
    """A small multi-behavior InteractionData: 12 users of 4..9 events over 15 items, 4 behaviors,
    3 product types (issue 11's ranker tests)."""
    from sparserec.data import build_interaction_data
    rng = np.random.default_rng(0)
    users, items, behaviors, times = [], [], [], []
    for user in range(12):
        for step in range(4 + user % 6):
            users.append(f"u{user}")
            items.append(f"i{rng.integers(15)}")
            behaviors.append(int(rng.integers(4)))
            times.append(step)
    attributes = {f"i{i}": (f"type{i % 3}", float(i), None, "") for i in range(15)}
    return build_interaction_data("tiny", users, items, behaviors, times, ("click", "fav", "cart", "buy"), attributes,
                                  target_behavior="buy")
