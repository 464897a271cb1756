"""Regenerates `sparserec/data/embedded/` from the shared Taobao folder.

    python -m sparserec.data.make_embedded [--root DIR]     (DIR: as for `sparserec.data.data_root`)

Both Taobao files the loader reads are small (about 0.8 MB together), so they are copied whole,
byte for byte, after checking them against the sha256 prefixes listed in the dataset's SOURCE.md;
the licence note is written beside them.
"""
import argparse
import hashlib
import os
import shutil

from .embedded import EMBEDDED_DIR
from .paths import dataset_dir
from .taobao import EVENTS_FILE, ITEMS_FILE, NAME

SHA256_PREFIX = {EVENTS_FILE: "67518a81366451ef", ITEMS_FILE: "69298b1e9f0eb968"}  # from SOURCE.md

SOURCE_NOTE = """\
# Embedded default dataset: Taobao "EComm" multi-behavior log (CIKM 2019 EComm AI sample, via DyHATR)

The two files here are copied unchanged from sparserec's offline copy of the dataset
(`taobao-ecomm-cikm2019`); `python -m sparserec.data.make_embedded` regenerates them.

| file | sha256 (first 16 hex digits) | columns (tab-separated, no header) |
|---|---|---|
| `ecomm_edge_train.txt.gz` | 67518a81366451ef | user_id, item_id, behavior (1 click, 2 collect/favorite, 3 add-to-cart, 4 buy), date YYYYMMDD |
| `ecomm_item_feature.txt.gz` | 69298b1e9f0eb968 | item_id, cate_1_id, cate_id (leaf category), brand_id (0 = unknown), price |

85,213 events (80,943 distinct) by 1,476 users on 34,505 items over 2019-06-10 ... 06-19 (one-day
time granularity); 36,224 items with features.

## Origin and licence

* Public repository: xuehansheng/DyHATR ("Modeling Dynamic Heterogeneous Network for Link
  Prediction using Hierarchical Attention with Temporal RNN", ECML-PKDD 2020), MIT licence for
  the repository, commit 6a5ea141bd40065c8900642af7f7758d90ebed9b, folder `dataset/ecomm/`.
* Original data: DyHATR's readme says the network data is sampled from the Alibaba Tianchi
  "CIKM 2019 EComm AI" competition data
  (https://tianchi.aliyun.com/competition/entrance/231719/information). Tianchi data are released
  for research / non-commercial use under Tianchi's terms; those terms apply to these files.
  DyHATR sampled about 1.5k users over 11 daily snapshots (2019-06-10 ... 06-20).
"""


def make_embedded(root=None, out_dir: str = EMBEDDED_DIR) -> str:
    """Copies the Taobao files into `out_dir` (checked against SOURCE.md) and writes SOURCE.md."""
    source = dataset_dir(NAME, root)
    os.makedirs(out_dir, exist_ok=True)
    for file, expected in SHA256_PREFIX.items():
        path = os.path.join(source, file)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if not digest.startswith(expected):
            raise ValueError(f"{path}: sha256 {digest[:16]} differs from SOURCE.md's {expected}")
        shutil.copyfile(path, os.path.join(out_dir, file))
    with open(os.path.join(out_dir, "SOURCE.md"), "w", encoding="utf-8") as f:
        f.write(SOURCE_NOTE)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding the dataset folders (default: $SPARSEREC_DATA or "
                                       "../shared/data)")
    parser.add_argument("--out", default=EMBEDDED_DIR, help="output folder (default: the package's)")
    args = parser.parse_args(argv)
    print(f"wrote {make_embedded(args.root, args.out)}")


if __name__ == "__main__":
    main()
