"""CoT attributes: each item's product type, price band and brand as indices into their slots.

Index 0 of every slot is UNK (attribute missing). Price bands are quantile buckets of the
catalogue's known prices: band b holds prices in [edge[b-1], edge[b]), so each band holds about
the same number of items. Edges are catalogue prices above the lowest one, so no band is empty;
tied quantiles merge bands, so there can be fewer than asked.
"""
from dataclasses import dataclass

import numpy as np

from ..data.interactions import ItemTable
from .vocab import UNK


@dataclass(frozen=True)
class CoTAttributes:
    product_types: tuple  # slot index i + 1 is product_types[i]
    brands: tuple
    price_edges: tuple  # inner band edges, ascending: len(price_edges) + 1 bands
    has_prices: bool  # False: no item has a price, the slot holds only UNK

    @property
    def num_price_bands(self) -> int:
        return len(self.price_edges) + 1 if self.has_prices else 0

    def band_names(self) -> list:
        if not self.has_prices:
            return []
        bounds = ("-inf",) + tuple(f"{e:g}" for e in self.price_edges) + ("inf",)
        return [f"[{lo},{hi})" for lo, hi in zip(bounds[:-1], bounds[1:])]

    def encode(self, items: ItemTable) -> np.ndarray:
        """(num_items, 3) int64 slot indices (product type, price band, brand); 0 = UNK."""
        type_index = {t: i + 1 for i, t in enumerate(self.product_types)}
        brand_index = {b: i + 1 for i, b in enumerate(self.brands)}
        bands = np.searchsorted(np.asarray(self.price_edges, dtype=np.float64), items.price, side="right") + 1
        return np.stack([
            np.array([type_index.get(t, UNK) for t in items.product_type], dtype=np.int64),
            np.where(np.isfinite(items.price), bands, UNK).astype(np.int64),
            np.array([brand_index.get(b, UNK) for b in items.brand], dtype=np.int64),
        ], axis=1)


def fit_cot_attributes(items: ItemTable, price_bands: int = 8) -> CoTAttributes:
    """Product types and brands in sorted order; `price_bands` quantile buckets of known prices."""
    if price_bands < 1:
        raise ValueError(f"price_bands must be >= 1, got {price_bands}")
    prices = items.price[np.isfinite(items.price)]
    edges = ()
    if prices.size:
        # "higher": every edge is a price some item has, so the band it opens holds that item;
        # an edge at the lowest price would leave the first band empty.
        inner = np.quantile(prices, np.linspace(0, 1, price_bands + 1)[1:-1], method="higher")
        edges = tuple(float(e) for e in np.unique(inner[inner > prices.min()]))
    return CoTAttributes(
        product_types=tuple(sorted({t for t in items.product_type if t is not None})),
        brands=tuple(sorted({b for b in items.brand if b is not None})),
        price_edges=edges,
        has_prices=bool(prices.size),
    )
