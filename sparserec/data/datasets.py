"""`load_dataset`: one entry point for the named datasets, the embedded one and generic folders.

Default preparation per dataset (each can be overridden by the arguments):

| dataset | dedup | k-core (min events per user, per item) | split |
|---|---|---|---|
| `embedded`, `taobao-ecomm-cikm2019` | yes (repeated same-day events) | 5, 5 | `mbgen_split` |
| `amazon-beauty` | no | none (already 5-core) | `leave_one_out` |
| `mbht-retail` | no | 4, 5 (MBGen's user and item minimums) | `mbgen_split` |
| a generic folder | no | none | `mbgen_split` when it has a "buy" behavior, else `leave_one_out` |
"""
import dataclasses
import os

from .amazon import load_amazon_beauty
from .embedded import read_embedded
from .filtering import prepare
from .generic import load_generic
from .retail import load_mbht_retail
from .splits import leave_one_out, mbgen_split
from .taobao import load_taobao
from .textio import recording_files

LOADERS = {
    "embedded": lambda root, max_lines: read_embedded(max_lines),
    "taobao-ecomm-cikm2019": lambda root, max_lines: load_taobao(root, max_lines),
    "amazon-beauty": lambda root, max_lines: load_amazon_beauty(root, max_lines),
    "mbht-retail": lambda root, max_lines: load_mbht_retail(root, max_lines),
}
DATASET_NAMES = tuple(LOADERS)
DEFAULT_PREPARATION = {
    "embedded": dict(dedup=True, min_user_interactions=5, min_item_interactions=5),
    "taobao-ecomm-cikm2019": dict(dedup=True, min_user_interactions=5, min_item_interactions=5),
    "amazon-beauty": dict(dedup=False, min_user_interactions=0, min_item_interactions=0),
    "mbht-retail": dict(dedup=False, min_user_interactions=4, min_item_interactions=5),
}
GENERIC_PREPARATION = dict(dedup=False, min_user_interactions=0, min_item_interactions=0)


def load_dataset(name: str, root=None, *, max_lines: int | None = None, dedup: bool | None = None,
                 min_user_interactions: int | None = None, min_item_interactions: int | None = None):
    """Loads a dataset by name (`embedded`, `taobao-ecomm-cikm2019`, `amazon-beauty`,
    `mbht-retail`) or a generic-format folder path, then dedups and k-cores it.

    None for dedup / min_*_interactions means the dataset's default (table above). The result's
    `sources` lists the files read (absolute paths). max_lines must be positive (or None: all).
    """
    if max_lines is not None and (isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1):
        raise ValueError(f"max_lines must be a positive number of lines (or None for all), got {max_lines!r}")
    with recording_files() as files:
        if name in LOADERS:
            data, defaults = LOADERS[name](root, max_lines), DEFAULT_PREPARATION[name]
        elif os.path.isdir(name):
            data, defaults = load_generic(name, max_lines=max_lines), GENERIC_PREPARATION
        else:
            raise ValueError(f"unknown dataset {name!r}: use one of {sorted(LOADERS)} or a generic-format folder "
                             "(see sparserec.data.generic)")
    options = {k: defaults[k] if v is None else v for k, v in dict(
        dedup=dedup, min_user_interactions=min_user_interactions,
        min_item_interactions=min_item_interactions).items()}
    prepared = prepare(dataclasses.replace(data, sources=tuple(files)), **options)
    if prepared.num_interactions == 0:
        raise ValueError(f"{name}: no events are left after filtering ({data.num_interactions} read, then dedup="
                         f"{options['dedup']}, at least {options['min_user_interactions']} events per user and "
                         f"{options['min_item_interactions']} per item); read more lines (max_lines={max_lines})")
    return prepared


def load_embedded(**options):
    """The Taobao data shipped inside the package, prepared as `load_dataset("embedded")`; needs no
    dataset directory. Options as for `load_dataset`."""
    return load_dataset("embedded", **options)


def default_split(data):
    """The protocol the data calls for: MBGen with a target behavior, leave-one-out otherwise."""
    return leave_one_out(data) if data.target_behavior is None else mbgen_split(data)
