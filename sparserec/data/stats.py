"""Dataset statistics: counts, sequence lengths, behaviors, attribute coverage, journey shifts."""
import numpy as np

from .interactions import InteractionData


def dataset_statistics(data: InteractionData) -> dict:
    """A flat dict of the numbers the SOURCE.md files and papers report, plus attribute coverage.

    `journey_shifts_per_user`: mean count of interactions whose product type differs from the
    previous one's (the jrn anchors, first interaction included), over users.
    """
    lengths = data.lengths
    items = data.items
    product_type_of = _codes(items.product_type)
    row_type = product_type_of[data.item]
    first = np.zeros(data.num_interactions, dtype=bool)
    first[data.user_ptr[:-1][lengths > 0]] = True
    shift = first | np.concatenate([[True], row_type[1:] != row_type[:-1]])
    stats = {
        "name": data.name,
        "users": data.num_users,
        "items": data.num_items,
        "interactions": data.num_interactions,
        "density": data.num_interactions / max(1, data.num_users * data.num_items),
        "length_min": int(lengths.min()) if lengths.size else 0,
        "length_median": float(np.median(lengths)) if lengths.size else 0.0,
        "length_mean": float(lengths.mean()) if lengths.size else 0.0,
        "length_max": int(lengths.max()) if lengths.size else 0,
        "product_types": len({p for p in items.product_type if p is not None}),
        "brands": len({b for b in items.brand if b is not None}),
        "items_with_product_type": sum(p is not None for p in items.product_type),
        "items_with_price": int(np.isfinite(items.price).sum()),
        "items_with_brand": sum(b is not None for b in items.brand),
        "items_with_text": sum(bool(t) for t in items.text),
        "journey_shifts_per_user": float(shift.sum() / max(1, data.num_users)),
    }
    counts = np.bincount(data.behavior, minlength=len(data.behaviors))
    stats.update({f"behavior_{name}": int(c) for name, c in zip(data.behaviors, counts)})
    return stats


def format_statistics(stats: dict) -> str:
    """One `key: value` line per statistic, numbers rounded for reading."""
    return "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items())


def _codes(values) -> np.ndarray:
    """Integer codes of a tuple of strings; None gets its own code (-1)."""
    index = {}
    return np.array([-1 if v is None else index.setdefault(v, len(index)) for v in values], dtype=np.int64)
