"""The embedded default dataset: the Taobao EComm files shipped in `sparserec/data/embedded/`.

The folder holds `ecomm_edge_train.txt.gz` and `ecomm_item_feature.txt.gz` of
`taobao-ecomm-cikm2019` (the whole of them: about 0.8 MB), `SOURCE.md` with the licence notes, and
nothing else; `python -m sparserec.data.make_embedded` regenerates it from ../shared/data.
"""
import os

from .taobao import read_taobao_folder

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
EMBEDDED_NAME = "embedded:taobao-ecomm-cikm2019"


def read_embedded(max_lines: int | None = None):
    """The embedded data as loaded, before dedup and k-core (see `sparserec.data.load_embedded`)."""
    return read_taobao_folder(EMBEDDED_DIR, max_lines=max_lines, name=EMBEDDED_NAME)
