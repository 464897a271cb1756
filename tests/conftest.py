"""Shared test set-up. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before any test module imports triton, so it is set here."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, and said so, where there is no CUDA device (never faked)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device, kernels not interpreted (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every tensor the kernels allocate starts as NaN, so a slot they fail to write shows: torch's
    allocations (the C++ kernels) through deterministic mode's fill, the Triton wrappers' through
    `triton_kernels.common.empty`."""
    from sparserec.triton_kernels import common

    monkeypatch.setattr(common, "POISON_ALLOCATIONS", True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


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
