"""Where the dataset folders live: `root` argument > $SPARSEREC_DATA > ../shared/data beside the repo."""
import os

ENV_VAR = "SPARSEREC_DATA"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ROOT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def data_root(root=None) -> str:
    """The directory holding one folder per dataset (`taobao-ecomm-cikm2019/`, ...)."""
    chosen = root or os.environ.get(ENV_VAR) or DEFAULT_ROOT
    if not os.path.isdir(chosen):
        source = "root argument" if root else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "default")
        raise FileNotFoundError(
            f"dataset directory {chosen!r} ({source}) does not exist. Pass root=..., or set ${ENV_VAR} to "
            "the folder that holds the dataset folders; sparserec.data.load_embedded() needs neither."
        )
    return chosen


def dataset_dir(name: str, root=None) -> str:
    path = os.path.join(data_root(root), name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder {path!r} does not exist")
    return path
