"""Loader for `taobao-ecomm-cikm2019` (CIKM 2019 EComm AI sample via DyHATR): click/fav/cart/buy.

Files (tab-separated, no header): `ecomm_edge_train.txt.gz` = user, item, behavior code 1..4,
date YYYYMMDD; `ecomm_item_feature.txt.gz` = item, cate_1_id, cate_id, brand_id (0 = unknown),
price. Product type = the leaf category `cate_id`; brand 0 becomes missing. Timestamps are days
(as seconds since the epoch); events of one user on one day keep file order, which the source does
not promise to be chronological.
"""
import datetime
import os

from .interactions import build_interaction_data
from .paths import dataset_dir
from .textio import line_error, parse_number, read_lines, require_events, split_fields

NAME = "taobao-ecomm-cikm2019"
BEHAVIORS = ("click", "fav", "cart", "buy")  # file codes 1, 2, 3, 4
EVENTS_FILE = "ecomm_edge_train.txt.gz"
ITEMS_FILE = "ecomm_item_feature.txt.gz"
_EPOCH = datetime.date(1970, 1, 1)


def load_taobao(root=None, max_lines: int | None = None):
    """Loads the dataset from `<root>/taobao-ecomm-cikm2019/` (root: see `sparserec.data.data_root`)."""
    return read_taobao_folder(dataset_dir(NAME, root), max_lines=max_lines)


def read_taobao_folder(folder, max_lines: int | None = None, name: str = NAME):
    """Reads the two Taobao files from `folder`; `max_lines` caps the event lines read (tests)."""
    events_path = os.path.join(folder, EVENTS_FILE)
    users, items, behaviors, timestamps = [], [], [], []
    for number, line in read_lines(events_path, max_lines):
        user, item, code, date = split_fields(events_path, number, line, 4)
        code = parse_number(events_path, number, code, "behavior code", int)
        if not 1 <= code <= len(BEHAVIORS):
            raise line_error(events_path, number, f"behavior code must be 1..{len(BEHAVIORS)}, got {code}")
        users.append(user)
        items.append(item)
        behaviors.append(code - 1)
        timestamps.append(_date_seconds(events_path, number, date))
    require_events(events_path, len(users))
    wanted = set(items)
    return build_interaction_data(name, users, items, behaviors, timestamps, BEHAVIORS,
                                  _read_item_features(os.path.join(folder, ITEMS_FILE), wanted),
                                  target_behavior="buy")


def _date_seconds(path, number, text):
    try:
        day = datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise line_error(path, number, f"date must be YYYYMMDD, got {text!r}") from None
    return (day - _EPOCH).days * 86400.0


def _read_item_features(path, wanted):
    attributes = {}
    for number, line in read_lines(path):
        item, _, category, brand, price = split_fields(path, number, line, 5)
        price = parse_number(path, number, price, "price")
        if item not in wanted:
            continue
        brand = None if brand == "0" else brand
        text = f"product type: category {category}. brand: {brand or 'unknown'}. price: {price:g} yuan."
        attributes[item] = (category, price, brand, text)
    return attributes
