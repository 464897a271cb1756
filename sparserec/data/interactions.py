"""InteractionData: the one structure every loader returns (users' chronological event logs + items).

Interactions are stored flat in CSR form: user u's events are rows `user_ptr[u]:user_ptr[u+1]` of
`item`, `behavior` and `timestamp`, sorted by time (ties keep file order). Items are numbered
0..num_items-1; `items` holds their attributes.
"""
from dataclasses import dataclass

import numpy as np

MISSING = None  # an absent product type / brand; absent prices are NaN


@dataclass(frozen=True)
class ItemTable:
    """Attributes of items 0..n-1: `ids[i]` is item i's id in the source files.

    product_type / brand: a string or None (missing). price: float, NaN when missing.
    text: the string a text-embedding model reads ("" when the dataset has no item text).
    """

    ids: tuple
    product_type: tuple
    price: np.ndarray
    brand: tuple
    text: tuple

    def __len__(self):
        return len(self.ids)

    def take(self, index: np.ndarray) -> "ItemTable":
        index = np.asarray(index, dtype=np.int64)
        return ItemTable(
            ids=tuple(self.ids[i] for i in index),
            product_type=tuple(self.product_type[i] for i in index),
            price=self.price[index],
            brand=tuple(self.brand[i] for i in index),
            text=tuple(self.text[i] for i in index),
        )


@dataclass(frozen=True)
class InteractionData:
    """Users' event logs, sorted chronologically per user, plus the item attribute table.

    behaviors: behavior names; `behavior[r]` indexes them. target_behavior: the behavior the
    multi-behavior protocol predicts ("buy"), or None for single-behavior data.
    timestamp: an order key — seconds since the epoch where the source has dates (Taobao: day
    granularity), else the event's position in the user's sequence (Amazon, Retail).
    """

    name: str
    user_ids: tuple
    items: ItemTable
    behaviors: tuple
    target_behavior: str | None
    user_ptr: np.ndarray  # (num_users + 1,) int64
    item: np.ndarray  # (num_interactions,) int64
    behavior: np.ndarray  # (num_interactions,) int64
    timestamp: np.ndarray  # (num_interactions,) float64
    sources: tuple = ()  # absolute paths of the files read (set by load_dataset; run fingerprints)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return int(self.item.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.user_ptr)

    @property
    def user_of_row(self) -> np.ndarray:
        """(num_interactions,) the user index of every row."""
        return np.repeat(np.arange(self.num_users, dtype=np.int64), self.lengths)

    def behavior_code(self, name: str) -> int:
        if name not in self.behaviors:
            raise ValueError(f"{self.name}: unknown behavior {name!r}; behaviors are {list(self.behaviors)}")
        return self.behaviors.index(name)

    def history(self, user: int, end: int | None = None):
        """(items, behaviors) of `user`'s events, up to global row `end` (exclusive) if given."""
        start, stop = self.user_ptr[user], self.user_ptr[user + 1]
        if end is not None:
            stop = min(stop, end)
        return self.item[start:stop], self.behavior[start:stop]

    def select_rows(self, keep: np.ndarray) -> "InteractionData":
        """Keeps the rows where `keep` is True, then drops users and items left with no events."""
        keep = np.asarray(keep, dtype=bool)
        users = self.user_of_row[keep]
        items = self.item[keep]
        kept_users = np.unique(users)
        kept_items = np.unique(items)
        new_user = np.full(self.num_users, -1, dtype=np.int64)
        new_user[kept_users] = np.arange(kept_users.shape[0])
        new_item = np.full(self.num_items, -1, dtype=np.int64)
        new_item[kept_items] = np.arange(kept_items.shape[0])
        counts = np.bincount(new_user[users], minlength=kept_users.shape[0])
        return InteractionData(
            name=self.name,
            user_ids=tuple(self.user_ids[u] for u in kept_users),
            items=self.items.take(kept_items),
            behaviors=self.behaviors,
            target_behavior=self.target_behavior,
            user_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            item=new_item[items],
            behavior=self.behavior[keep],
            timestamp=self.timestamp[keep],
            sources=self.sources,
        )


def journey_shifts(keys) -> np.ndarray:
    """keys (n,) of one history in order (product types, or what stands for them) -> (n,) bool: the
    journey-shift anchors of SPEC §3, the first interaction and every one whose key differs from the
    previous one's."""
    keys = np.asarray(keys)
    return np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=bool)


def build_interaction_data(name, users, items, behaviors, timestamps, behavior_names, item_attributes,
                           target_behavior=None) -> InteractionData:
    """Numbers raw users/items in order of first appearance and sorts each user's events by time.

    users, items: sequences of raw ids (str), one per event; behaviors: int codes into
    behavior_names; timestamps: numbers. item_attributes: {raw item id: (product_type, price,
    brand, text)}; an item absent from it gets every attribute missing.
    """
    user_index, item_index = {}, {}
    user_of = np.fromiter((user_index.setdefault(u, len(user_index)) for u in users), dtype=np.int64,
                          count=len(users))
    item_of = np.fromiter((item_index.setdefault(i, len(item_index)) for i in items), dtype=np.int64,
                          count=len(items))
    behavior = np.asarray(behaviors, dtype=np.int64)
    timestamp = np.asarray(timestamps, dtype=np.float64)
    # lexsort is stable and its last key is primary: users, then time, then file order.
    order = np.lexsort((np.arange(len(users)), timestamp, user_of))
    counts = np.bincount(user_of, minlength=len(user_index))
    missing = (MISSING, float("nan"), MISSING, "")
    attributes = [item_attributes.get(raw, missing) for raw in item_index]
    table = ItemTable(
        ids=tuple(item_index),
        product_type=tuple(a[0] for a in attributes),
        price=np.array([a[1] for a in attributes], dtype=np.float64).reshape(-1),
        brand=tuple(a[2] for a in attributes),
        text=tuple(a[3] for a in attributes),
    )
    if target_behavior is not None and target_behavior not in behavior_names:
        raise ValueError(f"{name}: target behavior {target_behavior!r} is not one of {list(behavior_names)}")
    return InteractionData(
        name=name,
        user_ids=tuple(user_index),
        items=table,
        behaviors=tuple(behavior_names),
        target_behavior=target_behavior,
        user_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        item=item_of[order],
        behavior=behavior[order],
        timestamp=timestamp[order],
    )
