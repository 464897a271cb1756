"""Full-ranking metrics from ranked item lists (one relevant item per user, no sampled negatives).

ranked (B, N) int64: each user's recommended item ids, best first (-1 where a beam search found
fewer than N items); targets (B,) int64: the held-out item. With rank_b the 1-based position of
targets[b] in ranked[b] (its first occurrence; infinite when absent):

    HR@K   = (1/B) Σ_b 1[rank_b ≤ K]
    NDCG@K = (1/B) Σ_b 1[rank_b ≤ K] / log2(rank_b + 1)

(one relevant item, so the ideal DCG is 1/log2(2) = 1). Each mean comes with its standard error
over users, `hr@K_se` and `ndcg@K_se` = std(per-user values) / sqrt(B) (population std): two
models evaluated on the same B users whose metrics differ by less than about twice that are not
told apart by this sample.
"""
import math

import torch


def target_ranks(ranked, targets):
    """(B,) float: 1-based rank of each target in its list, inf when it is not in the list."""
    if ranked.dim() != 2 or targets.shape != ranked.shape[:1]:
        raise ValueError(f"ranked must be (B, N) and targets (B,), got {tuple(ranked.shape)} and {tuple(targets.shape)}")
    found = ranked == targets[:, None]
    first = found.int().argmax(dim=1).double() + 1
    return torch.where(found.any(dim=1), first, math.inf)


def _ranks(ranked, targets, k: int):
    ranks = target_ranks(ranked, targets)
    if not 1 <= k <= ranked.shape[1]:
        raise ValueError(f"K must be in [1, {ranked.shape[1]}] (the ranked list length), got {k}")
    return ranks


def hit_rate(ranked, targets, k: int) -> float:
    """HR@K: the fraction of users whose target is among their top K."""
    return (_ranks(ranked, targets, k) <= k).double().mean().item()


def ndcg(ranked, targets, k: int) -> float:
    """NDCG@K: mean of 1/log2(rank + 1) over users, 0 where the target is not in the top K."""
    ranks = _ranks(ranked, targets, k)
    return torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1), 0.0).mean().item()


def ranking_metrics(ranked, targets, ks=(5, 10)) -> dict:
    """{"hr@K", "ndcg@K", "hr@K_se", "ndcg@K_se"} for each K in ks (means over users and their
    standard errors), plus "count" (users)."""
    ranks = target_ranks(ranked, targets)
    metrics = {}
    for k in ks:
        if not 1 <= k <= ranked.shape[1]:
            raise ValueError(f"K must be in [1, {ranked.shape[1]}] (the ranked list length), got {k}")
        hits = (ranks <= k).double()
        gains = torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1), 0.0)
        for name, values in ((f"hr@{k}", hits), (f"ndcg@{k}", gains)):
            metrics[name] = values.mean().item()
            metrics[f"{name}_se"] = standard_error(values)
    metrics["count"] = len(targets)
    return metrics


def standard_error(values) -> float:
    """Standard error of the mean of per-user values (1-D): population std / sqrt(n); 0 for n < 2."""
    if len(values) < 2:
        return 0.0
    return (values.double().std(correction=0) / math.sqrt(len(values))).item()


def per_behavior_metrics(ranked, targets, behaviors, behavior_names, ks=(5, 10)) -> dict:
    """{"all": metrics, name: metrics of the users whose target has that behavior, ...}.

    behaviors (B,) int: index into behavior_names of each target interaction's behavior;
    behaviors with no users are left out.
    """
    result = {"all": ranking_metrics(ranked, targets, ks)}
    for index, name in enumerate(behavior_names):
        rows = behaviors == index
        if rows.any():
            result[name] = ranking_metrics(ranked[rows], targets[rows], ks)
    return result
