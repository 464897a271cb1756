"""The generic format: a folder any user can produce from their own logs.

`interactions.tsv` or `interactions.tsv.gz` (not both), tab-separated, header line required, one event per line:

    user    item    behavior    timestamp
    u17     sku42   click       1718000000
    u17     sku42   buy         1718000360

`behavior` may be left out (every event is then "interact"); `timestamp` is any number (only
its order matters; ties keep file order). Extra columns are ignored.

`items.tsv` or `items.tsv.gz` (not both), optional, header line required; only `item` is mandatory:

    item    product_type    price   brand   text            color
    sku42   running shoes   59.90   Acme    light trail...  red

`product_type`, `price` (a number) and `brand` feed the CoT tokens; an empty cell is missing.
Each header names every column once, and each item is described at most once.
The embedding text is `text` followed by "column: value." for every other non-empty column, in
file order (the attributes are described to the text model too). Items absent from the file get
every attribute missing.
"""
import os

from .interactions import build_interaction_data
from .textio import line_error, parse_number, read_lines, require_events

INTERACTIONS_FILES = ("interactions.tsv", "interactions.tsv.gz")
ITEMS_FILES = ("items.tsv", "items.tsv.gz")
ATTRIBUTE_COLUMNS = ("product_type", "price", "brand", "text")
SINGLE_BEHAVIOR = "interact"


def load_generic(folder, name: str | None = None, behaviors=None, target_behavior: str | None = "buy",
                 max_lines: int | None = None):
    """Loads a generic-format folder.

    behaviors: the behavior names in code order; by default, the names in order of first
    appearance. target_behavior: the behavior the multi-behavior protocol predicts; ignored
    (None) when the data has no behavior of that name.
    """
    interactions_path = _find(folder, INTERACTIONS_FILES, required=True)
    columns, rows = _read_table(interactions_path, ("user", "item", "timestamp"), max_lines)
    has_behavior = "behavior" in columns
    names = list(behaviors) if behaviors is not None else []
    code_of = {b: i for i, b in enumerate(names)}
    users, items, codes, timestamps = [], [], [], []
    for number, row in rows:
        behavior = row[columns["behavior"]] if has_behavior else SINGLE_BEHAVIOR
        if behavior not in code_of:
            if behaviors is not None:
                raise line_error(interactions_path, number, f"behavior {behavior!r} is not one of {names}")
            code_of[behavior] = len(names)
            names.append(behavior)
        user, item = row[columns["user"]], row[columns["item"]]
        if not user or not item:
            raise line_error(interactions_path, number, "empty user or item")
        users.append(user)
        items.append(item)
        codes.append(code_of[behavior])
        timestamps.append(parse_number(interactions_path, number, row[columns["timestamp"]], "timestamp"))
    require_events(interactions_path, len(users))
    items_path = _find(folder, ITEMS_FILES, required=False)
    attributes = _read_items(items_path, set(items)) if items_path else {}
    return build_interaction_data(name or os.path.basename(os.path.normpath(folder)), users, items, codes,
                                  timestamps, names, attributes,
                                  target_behavior=target_behavior if target_behavior in names else None)


def _find(folder, candidates, required):
    present = [os.path.join(folder, file) for file in candidates if os.path.isfile(os.path.join(folder, file))]
    if len(present) > 1:
        raise ValueError(f"{folder} holds both {' and '.join(candidates)}; keep one of them (which one to read "
                         "would be a guess)")
    if present:
        return present[0]
    if required:
        raise FileNotFoundError(f"{folder} holds none of {list(candidates)} (see sparserec.data.generic)")
    return None


def _read_table(path, required_columns, max_lines=None):
    """Returns ({column: index}, iterator of (line number, fields)) after checking the header."""
    lines = read_lines(path, max_lines)
    number, header = next(lines, (1, None))
    if header is None:
        raise line_error(path, number, "the file is empty; it needs a header line naming the columns "
                                       f"{list(required_columns)}")
    names = header.split("\t")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated or "" in names:
        raise line_error(path, number, f"header names a column twice or leaves one unnamed: {names}")
    missing = [c for c in required_columns if c not in names]
    if missing:
        raise line_error(path, number, f"header must name the columns {list(required_columns)}; "
                                       f"missing {missing} in {names}")
    columns = {c: i for i, c in enumerate(names)}

    def rows():
        for number, line in lines:
            fields = line.split("\t")
            if len(fields) != len(names):
                raise line_error(path, number, f"expected {len(names)} tab-separated fields as in the header, "
                                               f"got {len(fields)}: {line[:80]!r}")
            yield number, fields

    return columns, rows()


def _read_items(path, wanted):
    columns, rows = _read_table(path, ("item",))
    described = [c for c in columns if c not in ("item", "text")]
    attributes, seen = {}, {}
    for number, row in rows:
        item = row[columns["item"]]
        if item in seen:
            raise line_error(path, number, f"item {item!r} is described twice (first on line {seen[item]})")
        seen[item] = number
        if item not in wanted:
            continue
        value = {c: row[columns[c]] if c in columns else "" for c in ATTRIBUTE_COLUMNS}
        price = parse_number(path, number, value["price"], "price") if value["price"] else float("nan")
        descriptions = [f"{c}: {row[columns[c]]}." for c in described if row[columns[c]]]
        text = " ".join([value["text"]] + descriptions).strip()
        attributes[item] = (value["product_type"] or None, price, value["brand"] or None, text)
    return attributes
