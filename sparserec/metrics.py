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

Action prediction (binary per behavior): log loss, normalized entropy, AUC.

For one behavior, logits z_b (B,) and labels y_b (B,) in {0, 1} (1: the interaction has this
behavior), p_b = sigmoid(z_b) and the base rate r = mean(y):

    log loss = -(1/B) Σ_b [y_b log p_b + (1 - y_b) log(1 - p_b)]
    NE       = log loss / H(r),  H(r) = -(r log r + (1 - r) log(1 - r))   (He et al., 2014)
    AUC      = P(z of a random positive > z of a random negative), ties count 1/2 (Mann–Whitney)

NE < 1: better than always predicting the base rate. NE and AUC are NaN when the labels hold one class.
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


def per_user_hits_and_gains(ranks, k: int):
    """Per-user HR@K and NDCG@K (one relevant item: 1 / log2(rank + 1) within the top K), float64,
    from the 1-based ranks of `target_ranks`."""
    hits = (ranks <= k).double()
    return hits, torch.where(ranks <= k, 1.0 / torch.log2(ranks.double() + 1), 0.0)


def ranking_metrics(ranked, targets, ks=(5, 10)) -> dict:
    """{"hr@K", "ndcg@K", "hr@K_se", "ndcg@K_se"} for each K in ks (means over users and their
    standard errors), plus "count" (users)."""
    ranks = target_ranks(ranked, targets)
    metrics = {}
    for k in ks:
        if not 1 <= k <= ranked.shape[1]:
            raise ValueError(f"K must be in [1, {ranked.shape[1]}] (the ranked list length), got {k}")
        hits, gains = per_user_hits_and_gains(ranks, k)
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



def log_loss(logits, labels) -> float:
    """Mean binary cross-entropy of logits (B,) against labels (B,) in {0, 1} (natural log)."""
    logits, labels = _binary(logits, labels)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()


def normalized_entropy(logits, labels) -> float:
    """Log loss divided by the entropy of the labels' base rate; NaN when all labels are equal."""
    logits, labels = _binary(logits, labels)
    rate = labels.mean().item()
    if rate in (0.0, 1.0):
        return math.nan
    return log_loss(logits, labels) / -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def auc(scores, labels) -> float:
    """ROC AUC by the rank-sum formula with average ranks for ties; NaN when all labels are equal."""
    scores, labels = _binary(scores, labels)
    positives = int(labels.sum().item())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # Average the ranks of tied scores: each run of equal values gets the mean of its positions.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(scores.dtype)
    mean_rank = ends - (counts.to(scores.dtype) - 1) / 2
    ranks[order] = mean_rank[inverse]
    rank_sum = ranks[labels == 1].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def action_metrics(logits, actions, behavior_names) -> dict:
    """logits (B, K): one logit per behavior; actions (B,) the observed behavior index.
    -> {name: {"log_loss", "ne", "auc", "base_rate", "positives"}} for each behavior, plus
    "count" (interactions) and "mean_ne" (the mean NE over behaviors where it is defined)."""
    if logits.dim() != 2 or logits.shape[1] != len(behavior_names) or actions.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (B, {len(behavior_names)}) and actions (B,), got "
                         f"{tuple(logits.shape)} and {tuple(actions.shape)}")
    result = {}
    for index, name in enumerate(behavior_names):
        labels = (actions == index).double()
        column = logits[:, index].double()
        result[name] = {"log_loss": log_loss(column, labels), "ne": normalized_entropy(column, labels),
                        "auc": auc(column, labels), "base_rate": labels.mean().item(),
                        "positives": int(labels.sum().item())}
    defined = [m["ne"] for m in result.values() if not math.isnan(m["ne"])]
    result["mean_ne"] = sum(defined) / len(defined) if defined else math.nan
    result["count"] = int(actions.shape[0])
    return result


def _binary(scores, labels):
    scores, labels = torch.as_tensor(scores).double().flatten(), torch.as_tensor(labels).double().flatten()
    if scores.shape != labels.shape or len(scores) == 0:
        raise ValueError(f"scores and labels must be non-empty and of one length, got {len(scores)} and {len(labels)}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    return scores, labels
