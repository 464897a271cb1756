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
    means = {key: value for key, value in metrics.items() if not key.endswith("_se")}
    assert means == pytest.approx({"hr@2": 0.5, "ndcg@2": (1 + 1 / math.log2(3)) / 4,
                                   "hr@4": 0.75, "ndcg@4": (1.5 + 1 / math.log2(3)) / 4, "count": 4})
    # Standard error: population std over the 4 users / sqrt(4). Hits at K=2 are 1, 0, 0, 1.
    assert metrics["hr@2_se"] == pytest.approx(0.5 / 2)
    gains = torch.tensor([1.0, 0.0, 0.0, 1 / math.log2(3)], dtype=torch.float64)
    assert metrics["ndcg@2_se"] == pytest.approx(gains.std(correction=0).item() / 2)
    behaviors = torch.tensor([0, 0, 2, 2])
    result = per_behavior_metrics(RANKED, TARGETS, behaviors, ("buy", "cart", "click"), ks=(2,))
    assert set(result) == {"all", "buy", "click"}  # no "cart" targets
    assert result["buy"] == pytest.approx({"hr@2": 0.5, "ndcg@2": 0.5, "count": 2, "hr@2_se": 0.5 / math.sqrt(2),
                                           "ndcg@2_se": 0.5 / math.sqrt(2)})
    assert result["click"]["ndcg@2"] == pytest.approx(1 / math.log2(3) / 2)


def test_standard_error_shrinks_as_one_over_root_n():
    from sparserec.metrics import standard_error

    values = torch.tensor([0.0, 1.0])
    assert standard_error(values) == pytest.approx(0.5 / math.sqrt(2))
    assert standard_error(values.repeat(50)) == pytest.approx(0.5 / 10)
    assert standard_error(torch.tensor([1.0])) == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="K must be in"):
        hit_rate(RANKED, TARGETS, 5)
    with pytest.raises(ValueError, match="ranked must be"):
        ndcg(RANKED[0], TARGETS, 1)
