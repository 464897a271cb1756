"""HR@K and NDCG@K against values computed by hand."""
import math

import pytest
import torch

from sparserec.metrics import hit_rate, ndcg, per_behavior_metrics, ranking_metrics, target_ranks

# Targets at rank 1, rank 3, absent (only -1 padding after a short beam), rank 2 (first occurrence).
RANKED = torch.tensor([[7, 1, 2, 3],
                       [4, 5, 9, 6],
                       [1, 2, -1, -1],
                       [3, 8, 8, 2]])
TARGETS = torch.tensor([7, 9, 5, 8])


def test_target_ranks():
    assert target_ranks(RANKED, TARGETS).tolist() == [1.0, 3.0, math.inf, 2.0]


def test_hit_rate_by_hand():
    assert hit_rate(RANKED, TARGETS, 1) == pytest.approx(1 / 4)
    assert hit_rate(RANKED, TARGETS, 2) == pytest.approx(2 / 4)
    assert hit_rate(RANKED, TARGETS, 4) == pytest.approx(3 / 4)


def test_ndcg_by_hand():
    # One relevant item: 1/log2(rank + 1) where rank <= K: 1, 1/log2(4) = 0.5, 0, 1/log2(3).
    assert ndcg(RANKED, TARGETS, 1) == pytest.approx(1 / 4)
    assert ndcg(RANKED, TARGETS, 2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert ndcg(RANKED, TARGETS, 4) == pytest.approx((1 + 0.5 + 1 / math.log2(3)) / 4)


def test_ranking_metrics_and_per_behavior_breakdown():
    metrics = ranking_metrics(RANKED, TARGETS, ks=(2, 4))
    assert metrics == pytest.approx({"hr@2": 0.5, "ndcg@2": (1 + 1 / math.log2(3)) / 4,
                                     "hr@4": 0.75, "ndcg@4": (1.5 + 1 / math.log2(3)) / 4, "count": 4})
    behaviors = torch.tensor([0, 0, 2, 2])
    result = per_behavior_metrics(RANKED, TARGETS, behaviors, ("buy", "cart", "click"), ks=(2,))
    assert set(result) == {"all", "buy", "click"}  # no "cart" targets
    assert result["buy"] == pytest.approx({"hr@2": 0.5, "ndcg@2": 0.5, "count": 2})
    assert result["click"] == pytest.approx({"hr@2": 0.5, "ndcg@2": 1 / math.log2(3) / 2, "count": 2})


def test_bad_input():
    with pytest.raises(ValueError, match="K must be in"):
        hit_rate(RANKED, TARGETS, 5)
    with pytest.raises(ValueError, match="ranked must be"):
        ndcg(RANKED[0], TARGETS, 1)
