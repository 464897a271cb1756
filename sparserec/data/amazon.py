"""Loader for `amazon-beauty` (Amazon 2014 Beauty 5-core; the TIGER / P5 / GRAM sequences).

Files: `user_sequence.txt.gz` (`reviewerID asin_1 ... asin_n`, chronological), `items.tsv.gz`
(header; item_id, asin, brand, categories `|`-joined from level 2) and
`item_text_idgenrec_phase0.txt.gz` (`asin short text`, IDGenRec's generated keywords: a weak text
feature). One behavior, "review"; timestamps are positions in the sequence. Product type = the
first `product_type_depth` category levels (3 gives 177 types, e.g. "Makeup > Nails > Nail
Polish"); the brand "Unknown" counts as missing; Beauty has no prices.
"""
import os

from .interactions import build_interaction_data
from .paths import dataset_dir
from .textio import line_error, read_lines, require_events, split_fields

NAME = "amazon-beauty"
BEHAVIORS = ("review",)
SEQUENCES_FILE = "user_sequence.txt.gz"
ITEMS_FILE = "items.tsv.gz"
KEYWORDS_FILE = "item_text_idgenrec_phase0.txt.gz"
ITEMS_HEADER = ["item_id", "asin", "brand", "categories"]


def load_amazon_beauty(root=None, max_lines: int | None = None, product_type_depth: int = 3):
    """Loads `<root>/amazon-beauty/`; `max_lines` caps the user sequences read (tests)."""
    folder = dataset_dir(NAME, root)
    sequences_path = os.path.join(folder, SEQUENCES_FILE)
    users, items, timestamps = [], [], []
    for number, line in read_lines(sequences_path, max_lines):
        fields = line.split()
        if len(fields) < 2:
            raise line_error(sequences_path, number, f"expected a user id and at least one item, got {line[:80]!r}")
        users.extend([fields[0]] * (len(fields) - 1))
        items.extend(fields[1:])
        timestamps.extend(range(len(fields) - 1))
    require_events(sequences_path, len(users))
    attributes = _read_items(os.path.join(folder, ITEMS_FILE), os.path.join(folder, KEYWORDS_FILE),
                             set(items), product_type_depth)
    return build_interaction_data(NAME, users, items, [0] * len(items), timestamps, BEHAVIORS, attributes)


def _read_items(items_path, keywords_path, wanted, product_type_depth):
    keywords = {}
    for number, line in read_lines(keywords_path):
        asin, _, text = line.partition(" ")
        keywords[asin] = text.strip()
    attributes = {}
    for number, line in read_lines(items_path):
        fields = split_fields(items_path, number, line, len(ITEMS_HEADER))
        if number == 1:
            if fields != ITEMS_HEADER:
                raise line_error(items_path, number, f"expected the header {ITEMS_HEADER}, got {fields}")
            continue
        _, asin, brand, categories = fields
        if asin not in wanted:
            continue
        path = [c for c in categories.split("|") if c]
        product_type = " > ".join(path[:product_type_depth]) or None
        brand = None if brand in ("", "Unknown") else brand
        text = f"product type: {' > '.join(path) or 'unknown'}. brand: {brand or 'unknown'}."
        if keywords.get(asin):
            text += f" keywords: {keywords[asin]}."
        attributes[asin] = (product_type, float("nan"), brand, text)
    return attributes
