"""Datasets for the recommender: loaders, filtering, chronological splits, statistics.

    from sparserec.data import load_dataset, load_embedded, default_split
    data = load_embedded()                        # InteractionData; no dataset directory needed
    data = load_dataset("amazon-beauty")          # or "taobao-ecomm-cikm2019", "mbht-retail", a folder
    split = default_split(data)                   # mbgen_split (has "buy") or leave_one_out
    items, behaviors = data.history(user, end=split.test.position[j])

Dataset folders are found under `root`, else $SPARSEREC_DATA, else ../shared/data beside the repo
(`data_root`). Every loader returns an `InteractionData` (events sorted per user by time, behavior
names, an `ItemTable` of product type / price / brand / text). Malformed files raise ValueError
naming the file and line. The generic user format is documented in `sparserec.data.generic`;
`python -m sparserec.data.make_embedded` regenerates the embedded dataset.
"""
from .amazon import load_amazon_beauty
from .datasets import DATASET_NAMES, DEFAULT_PREPARATION, default_split, load_dataset, load_embedded
from .embedded import EMBEDDED_DIR
from .filtering import drop_duplicates, k_core, prepare
from .fingerprint import data_fingerprint, file_fingerprint, fingerprint_changes
from .generic import load_generic
from .interactions import InteractionData, ItemTable, build_interaction_data, journey_shifts
from .paths import data_root
from .retail import load_mbht_retail
from .splits import DataSplit, Targets, leave_one_out, mbgen_split
from .stats import dataset_statistics, format_statistics
from .taobao import load_taobao

__all__ = [
    "InteractionData", "ItemTable", "build_interaction_data", "journey_shifts", "data_root",
    "load_dataset", "load_embedded", "load_taobao", "load_amazon_beauty", "load_mbht_retail", "load_generic",
    "DATASET_NAMES", "DEFAULT_PREPARATION", "drop_duplicates", "k_core", "prepare",
    "DataSplit", "Targets", "leave_one_out", "mbgen_split", "default_split",
    "dataset_statistics", "format_statistics", "EMBEDDED_DIR",
    "data_fingerprint", "file_fingerprint", "fingerprint_changes",
]
