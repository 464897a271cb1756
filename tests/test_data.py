"""sparserec.data: the generic format, the three dataset loaders (on hand-made files, on slices of the
real files, and on the real files against their SOURCE.md), malformed input, dedup, k-core and the
chronological splits, all against answers worked out by hand."""
import gzip
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparserec.data import (
    EMBEDDED_DIR, build_interaction_data, dataset_statistics, default_split, drop_duplicates, k_core,
    leave_one_out, load_amazon_beauty, load_dataset, load_embedded, load_generic, load_mbht_retail, load_taobao,
    mbgen_split, prepare,
)
from sparserec.data import data_fingerprint, fingerprint_changes
from sparserec.data import paths as data_paths
from sparserec.data.embedded import read_embedded
from sparserec.data.textio import read_lines

SHARED_DATA = os.environ.get(data_paths.ENV_VAR) or data_paths.DEFAULT_ROOT
needs_shared_data = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA),
    reason=f"the real datasets are not here ({SHARED_DATA}; set ${data_paths.ENV_VAR}): a checkout of the repo alone")


def write_lines(path, lines):
    """Writes text lines to `path` (gzip when it ends in .gz); returns the path as a string."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def tsv(*rows):
    return ["\t".join(str(c) for c in row) for row in rows]


def events_of(data, user_id):
    """[(item id, behavior name, timestamp)] of one user, in the stored (chronological) order."""
    u = data.user_ids.index(user_id)
    rows = range(data.user_ptr[u], data.user_ptr[u + 1])
    return [(data.items.ids[data.item[r]], data.behaviors[data.behavior[r]], data.timestamp[r]) for r in rows]


def hand_data(events, behaviors=("click", "buy"), target_behavior="buy", attributes=None):
    """InteractionData from (user, item, behavior name, timestamp) tuples."""
    users, items, names, times = zip(*events)
    return build_interaction_data("hand", users, items, [behaviors.index(b) for b in names], times, behaviors,
                                  attributes or {}, target_behavior=target_behavior)


def raises_at(path, line):
    """pytest.raises for a ValueError naming `path` and `line`."""
    return pytest.raises(ValueError, match=re.escape(f"{path}, line {line}:"))


# ---- the generic format -------------------------------------------------------------------------

def test_generic_events_are_sorted_by_time_ties_in_file_order(tmp_path):
    write_lines(tmp_path / "interactions.tsv", tsv(
        ("user", "item", "behavior", "timestamp", "note"),
        ("u1", "sku2", "click", 30, "x"),
        ("u2", "sku1", "click", 5, ""),
        ("u1", "sku1", "click", 10, ""),
        ("u1", "sku1", "buy", 30, ""),  # same time as the first line: stays after it
        ("u2", "sku3", "buy", 1.5, ""),
    ))
    data = load_generic(tmp_path)
    assert data.name == tmp_path.name
    assert data.user_ids == ("u1", "u2")
    assert data.behaviors == ("click", "buy")  # order of first appearance
    assert data.target_behavior == "buy"
    assert events_of(data, "u1") == [("sku1", "click", 10.0), ("sku2", "click", 30.0), ("sku1", "buy", 30.0)]
    assert events_of(data, "u2") == [("sku3", "buy", 1.5), ("sku1", "click", 5.0)]
    assert data.user_ptr.tolist() == [0, 3, 5]


def test_generic_item_attributes(tmp_path):
    write_lines(tmp_path / "interactions.tsv", tsv(("user", "item", "timestamp"), ("u", "a", 1), ("u", "b", 2),
                                                   ("u", "c", 3)))
    write_lines(tmp_path / "items.tsv", tsv(
        ("item", "product_type", "price", "brand", "text", "color"),
        ("a", "running shoes", "59.90", "Acme", "light trail shoe", "red"),
        ("b", "", "", "", "", ""),
        ("z", "hats", "1", "Zed", "not in the interactions", ""),
    ))
    data = load_generic(tmp_path)
    items = data.items
    assert items.ids == ("a", "b", "c")
    assert items.product_type == ("running shoes", None, None)
    assert items.brand == ("Acme", None, None)
    assert items.price[0] == pytest.approx(59.9) and np.isnan(items.price[1:]).all()
    assert items.text == ("light trail shoe product_type: running shoes. price: 59.90. brand: Acme. color: red.", "", "")
    # No "buy" behavior: single-behavior data, split leave-one-out.
    assert data.behaviors == ("interact",) and data.target_behavior is None
    assert default_split(data).protocol == "leave_one_out"


def test_generic_gzip_crlf_and_given_behavior_order(tmp_path):
    lines = tsv(("timestamp", "behavior", "item", "user"), (1, "buy", "a", "u"), (2, "view", "b", "u"))
    write_lines(tmp_path / "interactions.tsv.gz", [line + "\r" for line in lines])  # Windows line ends
    data = load_generic(tmp_path, name="mine", behaviors=("view", "cart", "buy"))
    assert data.name == "mine" and data.behaviors == ("view", "cart", "buy")
    assert data.behavior.tolist() == [2, 0] and data.items.ids == ("a", "b")
    with raises_at(tmp_path / "interactions.tsv.gz", 3):
        load_generic(tmp_path, behaviors=("buy",))


def test_load_dataset_reads_a_generic_folder(tmp_path):
    write_lines(tmp_path / "interactions.tsv", tsv(("user", "item", "timestamp"), *[(f"u{u}", f"i{i}", i)
                                                   for u in range(3) for i in range(4)], ("u9", "i9", 0)))
    assert load_dataset(str(tmp_path)).num_interactions == 13  # generic default: no filtering
    assert load_dataset(str(tmp_path), min_user_interactions=2, min_item_interactions=2).num_interactions == 12
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(str(tmp_path / "absent"))


@pytest.mark.parametrize("file, lines, line, message", [
    ("interactions.tsv", ["user\titem\tbehavior"], 1, "missing \\['timestamp'\\]"),
    ("interactions.tsv", ["", "user\titem", "u\ti"], 2, "missing \\['timestamp'\\]"),
    ("interactions.tsv", ["user\titem\ttimestamp", "u\ti\t1", "u\ti"], 3, "expected 3 tab-separated fields"),
    ("interactions.tsv", ["user\titem\ttimestamp", "u\ti\tmonday"], 2, "timestamp must be a finite number"),
    ("interactions.tsv", ["user\titem\ttimestamp", "u\ti\t1", "u\ti\tnan"], 3, "timestamp must be a finite"),
    ("interactions.tsv", ["user\titem\ttimestamp", "\ti\t1"], 2, "empty user or item"),
    ("interactions.tsv.gz", ["user\titem\ttimestamp", "u\ti\t1", "", "u\ti\t2\textra"], 4, "expected 3"),
    ("items.tsv", ["item\tprice", "i\tcheap"], 2, "price must be a finite number"),
    ("items.tsv", ["item\tprice", "i\t3.5", "i\t4"], 3, "item 'i' is described twice \\(first on line 2\\)"),
    ("interactions.tsv", ["user\titem\tuser\ttimestamp", "u\ti\tv\t1"], 1, "names a column twice"),
    ("items.tsv", ["item\t\tprice", "i\tx\t1"], 1, "leaves one unnamed"),
    ("items.tsv", ["sku\tprice", "i\t3.5"], 1, "missing \\['item'\\]"),
])
def test_generic_malformed_files_name_file_and_line(tmp_path, file, lines, line, message):
    if file.startswith("items"):
        write_lines(tmp_path / "interactions.tsv", tsv(("user", "item", "timestamp"), ("u", "i", 1)))
    path = write_lines(tmp_path / file, lines)
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {line}:") + ".*" + message):
        load_generic(tmp_path)


def test_generic_folder_without_interactions(tmp_path):
    with pytest.raises(FileNotFoundError, match="interactions.tsv"):
        load_generic(tmp_path)


# ---- the dataset loaders on hand-made files ----------------------------------------------------

TAOBAO_EVENTS = tsv((7, 100, 1, 20190611), (7, 101, 4, 20190610), (8, 100, 3, 20190612), (7, 102, 2, 20190611))
TAOBAO_ITEMS = tsv((100, 33, 501, 0, 21.8), (101, 33, 502, 9, 145), (102, 33, 501, 9, 0.7), (999, 33, 1, 0, 1))


def make_taobao(root, events=TAOBAO_EVENTS, items=TAOBAO_ITEMS):
    folder = root / "taobao-ecomm-cikm2019"
    folder.mkdir(exist_ok=True)
    return (write_lines(folder / "ecomm_edge_train.txt.gz", events),
            write_lines(folder / "ecomm_item_feature.txt.gz", items))


def test_taobao_by_hand(tmp_path):
    make_taobao(tmp_path)
    data = load_taobao(tmp_path)
    assert data.behaviors == ("click", "fav", "cart", "buy") and data.target_behavior == "buy"
    day = 86400.0
    june_10 = 18057 * day  # days from 1970-01-01 to 2019-06-10
    # Sorted by day; the two June 11 events keep file order.
    assert events_of(data, "7") == [("101", "buy", june_10), ("100", "click", june_10 + day),
                                    ("102", "fav", june_10 + day)]
    assert events_of(data, "8") == [("100", "cart", june_10 + 2 * day)]
    items = data.items
    assert items.ids == ("100", "101", "102")  # item 999 has no event
    assert items.product_type == ("501", "502", "501")
    assert items.brand == (None, "9", "9")  # brand 0 = unknown
    assert items.price.tolist() == [21.8, 145.0, 0.7]
    assert items.text[0] == "product type: category 501. brand: unknown. price: 21.8 yuan."
    assert load_taobao(tmp_path, max_lines=2).num_interactions == 2


@pytest.mark.parametrize("which, line, bad, message", [
    ("events", 2, "7\t100\t5\t20190611", "behavior code must be 1..4"),
    ("events", 3, "7\t100\tbuy\t20190611", "behavior code must be an integer"),
    ("events", 4, "7\t100\t1\t2019-06-11", "date must be YYYYMMDD"),
    ("events", 1, "7 100 1 20190611", "expected 4 tab-separated fields"),
    ("items", 2, "101\t33\t502\t9\tfree", "price must be a finite number"),
    ("items", 4, "102\t33\t501\t9", "expected 5 tab-separated fields"),
])
def test_taobao_malformed(tmp_path, which, line, bad, message):
    events, items = list(TAOBAO_EVENTS), list(TAOBAO_ITEMS)
    (events if which == "events" else items)[line - 1] = bad
    events_path, items_path = make_taobao(tmp_path, events, items)
    path = events_path if which == "events" else items_path
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {line}:") + ".*" + message):
        load_dataset("taobao-ecomm-cikm2019", root=tmp_path)


AMAZON_SEQUENCES = ["userA B001 B002 B003", "userB B002 B004"]
AMAZON_ITEMS = tsv(("item_id", "asin", "brand", "categories"), (1, "B001", "OPI", "Makeup|Nails|Nail Polish|Red"),
                   (2, "B002", "Unknown", "Skin Care"), (3, "B003", "", "Hair Care|Shampoo"))
AMAZON_KEYWORDS = ["B001 glossy red polish", "B004"]


def make_amazon(root, sequences=AMAZON_SEQUENCES, items=AMAZON_ITEMS, keywords=AMAZON_KEYWORDS):
    folder = root / "amazon-beauty"
    folder.mkdir(exist_ok=True)
    return (write_lines(folder / "user_sequence.txt.gz", sequences), write_lines(folder / "items.tsv.gz", items),
            write_lines(folder / "item_text_idgenrec_phase0.txt.gz", keywords))


def test_amazon_by_hand(tmp_path):
    make_amazon(tmp_path)
    data = load_amazon_beauty(tmp_path)
    assert data.behaviors == ("review",) and data.target_behavior is None
    assert events_of(data, "userA") == [("B001", "review", 0.0), ("B002", "review", 1.0), ("B003", "review", 2.0)]
    assert events_of(data, "userB") == [("B002", "review", 0.0), ("B004", "review", 1.0)]
    items = data.items
    assert items.ids == ("B001", "B002", "B003", "B004")
    assert items.product_type == ("Makeup > Nails > Nail Polish", "Skin Care", "Hair Care > Shampoo", None)
    assert items.brand == ("OPI", None, None, None)  # "Unknown" and "" are missing
    assert np.isnan(items.price).all()
    assert items.text[0] == ("product type: Makeup > Nails > Nail Polish > Red. brand: OPI. "
                             "keywords: glossy red polish.")
    assert items.text[3] == ""  # B004 is in no items.tsv row
    assert load_amazon_beauty(tmp_path, product_type_depth=1).items.product_type[0] == "Makeup"


@pytest.mark.parametrize("which, line, bad, message", [
    ("sequences", 2, "userB", "expected a user id and at least one item"),
    ("items", 1, "item_id\tasin\tbrand\tcategory", "expected the header"),
    ("items", 3, "2\tB002\tUnknown", "expected 4 tab-separated fields"),
])
def test_amazon_malformed(tmp_path, which, line, bad, message):
    sequences, items = list(AMAZON_SEQUENCES), list(AMAZON_ITEMS)
    (sequences if which == "sequences" else items)[line - 1] = bad
    sequences_path, items_path, _ = make_amazon(tmp_path, sequences, items)
    path = sequences_path if which == "sequences" else items_path
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {line}:") + ".*" + message):
        load_amazon_beauty(tmp_path)


RETAIL_HEADER = "session_id:token\titem_id_list:token_seq\titem_type_list:token_seq\titem_id:token"
RETAIL_TRAIN = [RETAIL_HEADER, "1\t10 11 10\t2 1 2\t10", "2\t12\t2\t11"]
RETAIL_TEST = [RETAIL_HEADER, "1\t11 12\t2 3\t13"]


def make_retail(root, train=RETAIL_TRAIN, test=RETAIL_TEST):
    folder = root / "mbht-retail"
    folder.mkdir(exist_ok=True)
    return (write_lines(folder / "retail_beh.train.inter.gz", train),
            write_lines(folder / "retail_beh.test.inter.gz", test))


def test_retail_by_hand(tmp_path):
    make_retail(tmp_path)
    data = load_mbht_retail(tmp_path)
    assert data.behaviors == ("buy", "aux_1", "view", "aux_3") and data.target_behavior == "buy"
    # The target item is appended to each session as its final "buy".
    assert events_of(data, "train:1") == [("10", "view", 0.0), ("11", "aux_1", 1.0), ("10", "view", 2.0),
                                          ("10", "buy", 3.0)]
    assert events_of(data, "train:2") == [("12", "view", 0.0), ("11", "buy", 1.0)]
    assert events_of(data, "test:1") == [("11", "view", 0.0), ("12", "aux_3", 1.0), ("13", "buy", 2.0)]
    assert load_mbht_retail(tmp_path, include_test_sessions=False).user_ids == ("train:1", "train:2")
    assert all(t == "" for t in data.items.text) and all(p is None for p in data.items.product_type)


@pytest.mark.parametrize("which, line, bad, message", [
    ("train", 1, "session_id\titem_id_list\titem_type_list\titem_id", "expected the header"),
    ("train", 2, "1\t10 11 10\t2 1\t10", "3 items but 2 behavior codes"),
    ("train", 3, "2\t12\t4\t11", "behavior codes must be 0..3"),
    ("test", 2, "1\t11 12\t2 x\t13", "behavior code must be an integer"),
    ("test", 2, "1\t11 12\t2 3\t", "empty target item"),
])
def test_retail_malformed(tmp_path, which, line, bad, message):
    train, test = list(RETAIL_TRAIN), list(RETAIL_TEST)
    (train if which == "train" else test)[line - 1] = bad
    train_path, test_path = make_retail(tmp_path, train, test)
    path = train_path if which == "train" else test_path
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {line}:") + ".*" + message):
        load_mbht_retail(tmp_path)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="amazon-beauty"):
        load_dataset("amazon-beauty", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("amazon-beauty", root=tmp_path / "absent")


# ---- dedup, k-core --------------------------------------------------------------------------

def test_drop_duplicates_keeps_first_of_exact_repeats():
    data = hand_data([("u", "a", "click", 1), ("u", "a", "click", 1), ("u", "a", "buy", 1), ("u", "a", "click", 2),
                      ("v", "a", "click", 1), ("u", "b", "click", 1), ("u", "a", "click", 1)])
    deduped = drop_duplicates(data)
    assert events_of(deduped, "u") == [("a", "click", 1.0), ("a", "buy", 1.0), ("b", "click", 1.0),
                                       ("a", "click", 2.0)]
    assert events_of(deduped, "v") == [("a", "click", 1.0)]
    assert drop_duplicates(deduped).num_interactions == deduped.num_interactions == 5


def test_k_core_cascades_to_a_fixed_point():
    # Item c has one event: dropping it leaves u3 with one event, so u3 goes too; u4 and d go at once.
    data = hand_data([("u1", "a", "click", 1), ("u1", "b", "click", 2), ("u2", "a", "buy", 1), ("u2", "b", "click", 2),
                      ("u3", "a", "click", 1), ("u3", "c", "click", 2), ("u4", "d", "click", 1)])
    core = k_core(data, min_user_interactions=2, min_item_interactions=2)
    assert core.user_ids == ("u1", "u2") and core.items.ids == ("a", "b")
    assert events_of(core, "u2") == [("a", "buy", 1.0), ("b", "click", 2.0)]
    # Item a keeps 3 events in a (2, 3)-core only while u3 stays, which it cannot: nothing is left.
    assert k_core(data, 2, 3).num_interactions == 0
    # User minimum only: u3 (2 events) stays with item c.
    assert k_core(data, 2, 1).user_ids == ("u1", "u2", "u3")


def test_k_core_of_embedded_data_is_a_core():
    data = load_embedded()
    assert data.lengths.min() >= 5
    assert np.bincount(data.item, minlength=data.num_items).min() >= 5
    assert k_core(data, 5, 5).num_interactions == data.num_interactions


def test_prepare_dedups_before_k_core():
    # Two exact repeats make "a" a 2-core item only until dedup removes one.
    data = hand_data([("u", "a", "click", 1), ("u", "a", "click", 1), ("v", "b", "click", 1), ("v", "b", "buy", 1)])
    assert prepare(data, dedup=False, min_item_interactions=2).num_interactions == 4
    assert prepare(data, dedup=True, min_item_interactions=2).items.ids == ("b",)
    assert prepare(data) is data


# ---- splits -------------------------------------------------------------------------------------

SPLIT_EVENTS = [("long", "a", "click", t) for t in range(4)] + [("long", "b", "buy", 9)] \
    + [("short", "a", "click", 1), ("short", "b", "buy", 2)] \
    + [("three", "c", "click", 5), ("three", "a", "click", 1), ("three", "b", "buy", 3)]


def test_leave_one_out_positions():
    data = hand_data(SPLIT_EVENTS)
    assert data.user_ptr.tolist() == [0, 5, 7, 10]
    split = leave_one_out(data)
    assert split.protocol == "leave_one_out"
    # "short" has 2 events (< 3): not evaluated, trains on both.
    assert split.train_end.tolist() == [3, 7, 8]
    assert split.valid.user.tolist() == [0, 2] and split.valid.position.tolist() == [3, 8]
    assert split.test.user.tolist() == [0, 2] and split.test.position.tolist() == [4, 9]
    # Targets are the chronologically last events: "three"'s test is its click at t=5, written first.
    assert [data.items.ids[i] for i in split.test.items(data)] == ["b", "c"]
    assert [data.timestamp[p] for p in split.test.position] == [9.0, 5.0]
    items, behaviors = data.history(2, end=split.test.position[1])
    assert [data.items.ids[i] for i in items] == ["a", "b"] and behaviors.tolist() == [0, 1]
    assert len(data.history(0, end=split.valid.position[0])[0]) == 3
    # Training targets: every training row after the user's first (prefix augmentation).
    train = split.train_targets(data)
    assert train.position.tolist() == [1, 2, 6] and train.user.tolist() == [0, 0, 1]
    assert split.train_targets(data, min_history=2).position.tolist() == [2]
    assert leave_one_out(data, min_interactions=5).test.user.tolist() == [0]
    with pytest.raises(ValueError, match="min_interactions"):
        leave_one_out(data, min_interactions=2)


def test_mbgen_split_targets_buys():
    data = hand_data(SPLIT_EVENTS)
    split = mbgen_split(data, min_interactions=3)
    assert split.protocol == "mbgen" and default_split(data).protocol == "mbgen"
    assert split.test.position.tolist() == [4, 9]
    assert split.train_end.tolist() == leave_one_out(data).train_end.tolist()
    # Target-behavior task: users whose last interaction is a buy ("long"); "three" ends on a click.
    buys = split.test.with_behavior(data, "buy")
    assert buys.user.tolist() == [0] and buys.behaviors(data).tolist() == [1]
    assert mbgen_split(data).test.user.tolist() == [0]  # MBGen's default minimum: 4 events
    with pytest.raises(ValueError, match="no target behavior"):
        mbgen_split(hand_data(SPLIT_EVENTS, target_behavior=None))
    with pytest.raises(ValueError, match="unknown behavior"):
        split.test.with_behavior(data, "cart")


def test_statistics_count_journey_shifts():
    attributes = {"a": ("shoes", 1.0, None, "a"), "b": ("shoes", 2.0, "x", "b"), "c": ("hats", float("nan"), None, "")}
    data = hand_data([("u", "a", "click", 1), ("u", "b", "click", 2), ("u", "c", "buy", 3), ("u", "a", "click", 4),
                      ("v", "a", "click", 1)], attributes=attributes)
    stats = dataset_statistics(data)
    # u: shoes, shoes, hats, shoes -> 3 shifts (the first included); v: 1.
    assert stats["journey_shifts_per_user"] == 2.0
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 3, 5)
    assert (stats["behavior_click"], stats["behavior_buy"]) == (4, 1)
    assert (stats["items_with_price"], stats["items_with_brand"], stats["items_with_text"]) == (2, 1, 2)


# ---- the embedded dataset (no ../shared needed) -----------------------------------------------

def test_embedded_loads_without_shared_data(monkeypatch, tmp_path):
    monkeypatch.delenv(data_paths.ENV_VAR, raising=False)
    monkeypatch.setattr(data_paths, "DEFAULT_ROOT", str(tmp_path / "no-shared"))
    with pytest.raises(FileNotFoundError):
        data_paths.data_root()
    assert os.path.isfile(os.path.join(EMBEDDED_DIR, "SOURCE.md"))
    raw = read_embedded()
    # The counts SOURCE.md gives for the Taobao event file.
    assert (raw.num_users, raw.num_items, raw.num_interactions) == (1476, 34505, 85213)
    assert np.bincount(raw.behavior).tolist() == [57917, 5529, 15066, 6701]
    assert drop_duplicates(raw).num_interactions == 80943
    data = load_embedded()
    assert data.target_behavior == "buy" and data.num_users > 1000
    assert all(np.all(np.diff(data.timestamp[a:b]) >= 0) for a, b in zip(data.user_ptr[:-1], data.user_ptr[1:]))


# ---- slices of the real files, and the real files against SOURCE.md ----------------------------

def copy_head(name, file, target_root, lines):
    """Writes the first `lines` lines of a real dataset file to target_root/name/file (gzip)."""
    with gzip.open(os.path.join(SHARED_DATA, name, file), "rt", encoding="utf-8") as f:
        head = [line.rstrip("\n") for _, line in zip(range(lines), f)]
    os.makedirs(target_root / name, exist_ok=True)
    write_lines(target_root / name / file, head)
    return [line.split("\t") for line in head]


@needs_shared_data
def test_real_taobao_slice(tmp_path):
    events = copy_head("taobao-ecomm-cikm2019", "ecomm_edge_train.txt.gz", tmp_path, 300)
    features = copy_head("taobao-ecomm-cikm2019", "ecomm_item_feature.txt.gz", tmp_path, 2000)
    data = load_dataset("taobao-ecomm-cikm2019", root=tmp_path, dedup=False, min_user_interactions=0,
                        min_item_interactions=0)
    assert data.num_interactions == len(events)
    assert set(data.user_ids) == {e[0] for e in events} and set(data.items.ids) == {e[1] for e in events}
    assert np.bincount(data.behavior, minlength=4).tolist() == [sum(e[2] == c for e in events) for c in "1234"]
    for u in range(data.num_users):  # each user's rows: the file's rows of that user, stably sorted by day
        rows = sorted((e for e in events if e[0] == data.user_ids[u]), key=lambda e: e[3])
        assert [data.items.ids[i] for i in data.history(u)[0]] == [e[1] for e in rows]
    feature_of = {f[0]: f for f in features}
    for i, item in enumerate(data.items.ids):
        if item in feature_of:
            _, _, category, brand, price = feature_of[item]
            assert (data.items.product_type[i], data.items.price[i]) == (category, float(price))
            assert data.items.brand[i] == (None if brand == "0" else brand)
        else:
            assert data.items.product_type[i] is None and np.isnan(data.items.price[i])


@needs_shared_data
def test_real_amazon_slice(tmp_path):
    sequences = copy_head("amazon-beauty", "user_sequence.txt.gz", tmp_path, 200)
    items = copy_head("amazon-beauty", "items.tsv.gz", tmp_path, 1500)
    copy_head("amazon-beauty", "item_text_idgenrec_phase0.txt.gz", tmp_path, 1500)
    data = load_dataset("amazon-beauty", root=tmp_path)
    assert data.num_users == 200
    for u, line in enumerate(sequences):
        user, *asins = line[0].split()
        assert data.user_ids[u] == user and [data.items.ids[i] for i in data.history(u)[0]] == asins
    categories_of = {row[1]: row[3].split("|") for row in items[1:]}
    for i, asin in enumerate(data.items.ids):
        expected = " > ".join(categories_of[asin][:3]) if asin in categories_of else None
        assert data.items.product_type[i] == expected
    assert default_split(data).test.position.tolist() == (data.user_ptr[1:] - 1).tolist()


@needs_shared_data
def test_real_retail_slice(tmp_path):
    train = copy_head("mbht-retail", "retail_beh.train.inter.gz", tmp_path, 150)
    test = copy_head("mbht-retail", "retail_beh.test.inter.gz", tmp_path, 50)
    data = load_dataset("mbht-retail", root=tmp_path, min_user_interactions=0, min_item_interactions=0)
    rows = train[1:] + test[1:]
    assert data.num_users == len(rows)
    assert data.num_interactions == sum(len(r[1].split()) + 1 for r in rows)
    last = data.user_ptr[1:] - 1
    assert (data.behavior[last] == 0).all()
    assert [data.items.ids[i] for i in data.item[last]] == [r[3] for r in rows]
    # Every session ends on its purchase, so every evaluated session (3+ events) is a target-behavior test.
    buys = mbgen_split(data, min_interactions=3).test.with_behavior(data, "buy")
    assert buys.position.tolist() == last[data.lengths >= 3].tolist()


@needs_shared_data
@pytest.mark.parametrize("name, users, items, interactions", [
    ("taobao-ecomm-cikm2019", 1476, 34505, 85213),
    ("amazon-beauty", 22363, 12101, 198502),
    ("mbht-retail", 30690 + 2000, 31239, 524244),
])
def test_real_datasets_match_their_source_notes(name, users, items, interactions):
    data = load_dataset(name, root=SHARED_DATA, dedup=False, min_user_interactions=0, min_item_interactions=0)
    assert (data.num_users, data.num_items, data.num_interactions) == (users, items, interactions)


# ---- broken files: every failure is a ValueError naming the file (and line) --------------------

GENERIC_EVENTS = tsv(("user", "item", "behavior", "timestamp"), ("u1", "a", "click", 1), ("u1", "b", "buy", 2),
                     ("u2", "a", "buy", 3))


def test_truncated_gzip_names_file_and_line(tmp_path):
    path = str(tmp_path / "interactions.tsv.gz")
    content = gzip.compress("".join(f"u{i}\ti{i}\tclick\t{i}\n" for i in range(20000)).encode())
    open(path, "wb").write(content[: len(content) // 2])
    with pytest.raises(ValueError, match=re.escape(path) + r", line \d+: truncated or corrupt gzip"):
        list(read_lines(path))


def test_plain_file_named_gz(tmp_path):
    path = str(tmp_path / "interactions.tsv.gz")
    open(path, "w").write("\n".join(GENERIC_EVENTS) + "\n")
    with raises_at(path, 1) as error:
        load_generic(str(tmp_path))
    assert "not a gzip file" in str(error.value)


def test_non_utf8_names_the_line(tmp_path):
    path = str(tmp_path / "interactions.tsv")
    lines = [line.encode() for line in GENERIC_EVENTS]
    lines[2] = b"u1\tb\xe9\tbuy\t2"  # Latin-1 "é"
    open(path, "wb").write(b"\n".join(lines) + b"\n")
    with raises_at(path, 3) as error:
        load_generic(str(tmp_path))
    assert "not UTF-8" in str(error.value)


@pytest.mark.parametrize("name", ["interactions.tsv", "interactions.tsv.gz"])
def test_utf8_bom_is_stripped(tmp_path, name):
    path = str(tmp_path / name)
    content = ("\ufeff" + "\n".join(GENERIC_EVENTS) + "\n").encode()
    open(path, "wb").write(gzip.compress(content) if name.endswith(".gz") else content)
    data = load_generic(str(tmp_path))
    assert data.num_interactions == 3 and data.user_ids == ("u1", "u2")


def test_header_only_and_empty_files(tmp_path):
    path = write_lines(tmp_path / "interactions.tsv", GENERIC_EVENTS[:1])
    with pytest.raises(ValueError, match=re.escape(path) + ": no events"):
        load_generic(str(tmp_path))
    write_lines(tmp_path / "interactions.tsv", [])
    with raises_at(path, 1) as error:
        load_generic(str(tmp_path))
    assert "empty" in str(error.value)
    events_path, _ = make_taobao(tmp_path, events=[])
    with pytest.raises(ValueError, match=re.escape(events_path) + ": no events"):
        load_taobao(tmp_path)


def test_both_plain_and_gzip_files_are_refused(tmp_path):
    write_lines(tmp_path / "interactions.tsv", GENERIC_EVENTS)
    write_lines(tmp_path / "interactions.tsv.gz", GENERIC_EVENTS[:2])
    with pytest.raises(ValueError, match="both interactions.tsv and interactions.tsv.gz"):
        load_generic(str(tmp_path))


def test_max_lines_and_filtered_to_nothing(tmp_path):
    write_lines(tmp_path / "interactions.tsv", GENERIC_EVENTS)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_lines must be a positive number"):
            load_dataset(str(tmp_path), max_lines=bad)
    with pytest.raises(ValueError, match="no events are left after filtering"):
        load_dataset(str(tmp_path), min_user_interactions=5)


def test_loaded_data_records_its_files_and_fingerprint_changes(tmp_path):
    write_lines(tmp_path / "interactions.tsv", GENERIC_EVENTS)
    before = data_fingerprint(load_dataset(str(tmp_path)))
    assert [os.path.basename(f["path"]) for f in before["files"]] == ["interactions.tsv"]
    assert fingerprint_changes(before, before) == []
    write_lines(tmp_path / "interactions.tsv", GENERIC_EVENTS[:1] + [GENERIC_EVENTS[2], GENERIC_EVENTS[1]])
    changes = fingerprint_changes(before, data_fingerprint(load_dataset(str(tmp_path))))
    # Same events in another file order: the item vocabulary (numbered by first appearance) changed.
    assert any("interactions.tsv changed" in c for c in changes)
    assert "the item vocabulary (item ids or their order) changed" in changes


def _corrupt(content: bytes, data) -> bytes:
    """One random corruption of a file's bytes: cut, flip bytes, insert junk, or drop lines."""
    kind = data.draw(st.sampled_from(["cut", "flip", "insert", "lines", "none"]))
    if kind == "cut":
        return content[: data.draw(st.integers(0, len(content)))]
    if kind == "flip":
        raw = bytearray(content)
        for _ in range(data.draw(st.integers(1, 4))):
            if raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "insert":
        at = data.draw(st.integers(0, len(content)))
        return content[:at] + data.draw(st.binary(max_size=12)) + content[at:]
    if kind == "lines":
        lines = content.split(b"\n")
        keep = data.draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines)))
        return b"\n".join(line for line, k in zip(lines, keep) if k)
    return content


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), gz=st.booleans(), with_items=st.booleans())
def test_malformed_generic_folders_raise_value_errors_naming_the_file(tmp_path_factory, data, gz, with_items):
    """Random corruptions of a valid generic folder load or raise ValueError naming the file."""
    folder = tmp_path_factory.mktemp("generic")
    events = ("\n".join(GENERIC_EVENTS) + "\n").encode()
    items = ("\n".join(tsv(("item", "product_type", "price"), ("a", "x", 1.5), ("b", "", ""))) + "\n").encode()
    files = {"interactions.tsv": _corrupt(events, data)}
    if with_items:
        files["items.tsv"] = _corrupt(items, data)
    for name, content in files.items():
        if gz and data.draw(st.booleans()):  # a gzip file, itself possibly cut
            compressed = gzip.compress(content)
            content = compressed[: data.draw(st.integers(0, len(compressed)))] if data.draw(st.booleans()) else compressed
            name += ".gz"
        (folder / name).write_bytes(content)
    try:
        loaded = load_dataset(str(folder))
    except ValueError as error:
        assert str(folder) in str(error) or "no events are left" in str(error), str(error)
    else:
        assert loaded.num_interactions > 0 and loaded.num_items > 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), which=st.sampled_from(["events", "items"]))
def test_malformed_taobao_files_raise_value_errors_naming_the_file(tmp_path_factory, data, which):
    root = tmp_path_factory.mktemp("taobao")
    events_path, items_path = make_taobao(root)
    path = events_path if which == "events" else items_path
    content = open(path, "rb").read()
    if data.draw(st.booleans()):  # corrupt the compressed bytes
        open(path, "wb").write(_corrupt(content, data))
    else:  # corrupt the text inside a valid gzip
        open(path, "wb").write(gzip.compress(_corrupt(gzip.decompress(content), data)))
    try:
        load_dataset("taobao-ecomm-cikm2019", root=root)
    except ValueError as error:
        assert path in str(error) or "no events are left" in str(error), str(error)


def test_journey_shifts_mark_the_first_event_and_every_change():
    from sparserec.data import journey_shifts
    assert journey_shifts([3, 3, 5, 5, 3]).tolist() == [True, False, True, False, True]
    assert journey_shifts(["a"]).tolist() == [True]
    assert journey_shifts(np.zeros(0, dtype=np.int64)).tolist() == []
