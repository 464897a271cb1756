"""Fingerprints of a dataset as loaded, so a saved run can tell when its data has changed.

`data_fingerprint(data)` records the files read (absolute path, size, SHA-256) and digests of what
the model depends on: the item vocabulary (ids in index order), the behavior vocabulary, the
users, the events and the item attributes. `fingerprint_changes(saved, current)` lists, in words,
every difference between two fingerprints (empty: the same data).
"""
import hashlib
import json
import os

import numpy as np

from .interactions import InteractionData


def file_fingerprint(path) -> dict:
    """{"path": absolute path, "size": bytes, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray)
                      else json.dumps(part, default=str).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(data: InteractionData) -> dict:
    items = data.items
    return {
        "name": data.name,
        "files": [file_fingerprint(path) for path in data.sources],
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_interactions": data.num_interactions,
        "behaviors": list(data.behaviors),
        "target_behavior": data.target_behavior,
        "item_ids": _digest(list(items.ids)),
        "user_ids": _digest(list(data.user_ids)),
        "events": _digest(data.user_ptr, data.item, data.behavior, data.timestamp),
        "item_attributes": _digest(list(items.product_type), items.price, list(items.brand), list(items.text)),
    }


_DESCRIPTIONS = {
    "item_ids": "the item vocabulary (item ids or their order)",
    "user_ids": "the users (ids or their order)",
    "events": "the events",
    "item_attributes": "the item attributes (product type, price, brand or text)",
}


def fingerprint_changes(saved: dict, current: dict) -> list:
    """Every difference between two `data_fingerprint`s, one phrase each ([] when they agree)."""
    changes = []
    # A saved file matches the current file of the same path, else one of the same content (the
    # dataset folder, or the package, has moved), else one of the same name (moved and changed).
    current_files = list(current.get("files", []))
    unmatched = list(current_files)
    for old in saved.get("files", []):
        match = (next((f for f in unmatched if f["path"] == old["path"]), None)
                 or next((f for f in unmatched if f["sha256"] == old["sha256"]), None)
                 or next((f for f in unmatched if os.path.basename(f["path"]) == os.path.basename(old["path"])), None))
        if match is None:
            changes.append(f"file {old['path']} is no longer read")
            continue
        unmatched.remove(match)
        if match["sha256"] != old["sha256"]:
            changes.append(f"file {match['path']} changed (size {old['size']} -> {match['size']} bytes, "
                           "another SHA-256)")
    changes += [f"file {f['path']} is read now but was not" for f in unmatched]
    for key in ("name", "num_users", "num_items", "num_interactions", "behaviors", "target_behavior"):
        if saved.get(key) != current.get(key):
            changes.append(f"{key.replace('_', ' ')} {saved.get(key)!r} -> {current.get(key)!r}")
    changes += [f"{description} changed" for key, description in _DESCRIPTIONS.items()
                if saved.get(key) != current.get(key)]
    return changes
