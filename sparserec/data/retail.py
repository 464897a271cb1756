"""Loader for `mbht-retail` (the MBHT / MBGen "Retail" multi-behavior sessions).

Files (RecBole atomic, tab-separated, one header line): `retail_beh.{train,test}.inter.gz` with
`session_id, item_id_list, item_type_list, item_id`. Each row is one session: its history events
in time order, then the target `item_id`, which MBHT defines as the session's purchase; it is
appended as a final "buy" event (it never occurs as a buy inside the history). Test-file sessions
are separate sessions (ids restart at 1), so users are named "train:<id>" and "test:<id>".
Timestamps are positions. No item attributes exist.

Behavior codes: 0 = buy (certain); 2 is by far the most frequent, presumably page view; 1 and 3
are favourite and add-to-cart in an undocumented order, hence the neutral names.
"""
import os

from .interactions import build_interaction_data
from .paths import dataset_dir
from .textio import line_error, parse_number, read_lines, require_events, split_fields

NAME = "mbht-retail"
BEHAVIORS = ("buy", "aux_1", "view", "aux_3")  # index = the file's behavior code
FILES = ("retail_beh.train.inter.gz", "retail_beh.test.inter.gz")
HEADER = ["session_id:token", "item_id_list:token_seq", "item_type_list:token_seq", "item_id:token"]


def load_mbht_retail(root=None, max_lines: int | None = None, include_test_sessions: bool = True):
    """Loads `<root>/mbht-retail/`; `max_lines` caps the lines read per file (tests)."""
    folder = dataset_dir(NAME, root)
    users, items, behaviors, timestamps = [], [], [], []
    for file in FILES[: 2 if include_test_sessions else 1]:
        path = os.path.join(folder, file)
        prefix = file.split(".")[1]
        events_before = len(users)
        for number, line in read_lines(path, max_lines):
            fields = split_fields(path, number, line, 4)
            if number == 1:
                if fields != HEADER:
                    raise line_error(path, number, f"expected the header {HEADER}, got {fields}")
                continue
            session, history, codes, target = fields
            history, codes = history.split(), codes.split()
            if len(history) != len(codes):
                raise line_error(path, number, f"{len(history)} items but {len(codes)} behavior codes")
            codes = [parse_number(path, number, c, "behavior code", int) for c in codes]
            if any(not 0 <= c < len(BEHAVIORS) for c in codes):
                raise line_error(path, number, f"behavior codes must be 0..{len(BEHAVIORS) - 1}, got {codes}")
            if not target:
                raise line_error(path, number, "empty target item")
            user = f"{prefix}:{session}"
            users.extend([user] * (len(history) + 1))
            items.extend(history + [target])
            behaviors.extend(codes + [0])
            timestamps.extend(range(len(history) + 1))
        require_events(path, len(users) - events_before)
    return build_interaction_data(NAME, users, items, behaviors, timestamps, BEHAVIORS, {}, target_behavior="buy")
