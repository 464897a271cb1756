"""Run directories that know what they were trained on, and refuse to be silently reused.

A run directory (`sparserec train --out X`) holds:

    run.json        how to rebuild the data, the model config, the training options, and the
                    fingerprints of the data (files, item and behavior vocabularies, events) and
                    of the tokenizer; "complete": false while training
    checkpoint.pt   the trainer's state (every --checkpoint-every steps and after each validation)
    model.pt        the trained weights;  tokenizer.pt  the tokenizer;  metrics.json  test metrics

`evaluate` / `recommend` check the fingerprints against the data as it loads now and refuse a
mismatch, naming what changed. `train --out X` refuses a directory that already holds a run
unless `--resume` (same options and data: the checkpoint continues) or `--overwrite`.
Every file read here that is missing, truncated or not what it should be is a ValueError naming it.
"""
import hashlib
import json
import os

import torch

from .data import data_fingerprint, fingerprint_changes

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.pt"
METRICS_FILE = "metrics.json"
RUN_FILES = (RUN_FILE, CHECKPOINT_FILE, MODEL_FILE, TOKENIZER_FILE, METRICS_FILE, "savings.md")

# Options that may differ when resuming: they change neither the data, the model nor the training.
RESUME_FREE_OPTIONS = frozenset({"out", "cache", "resume", "overwrite", "test_users", "checkpoint_every",
                                 "time_limit"})


def tokenizer_fingerprint(tokenizer) -> str | None:
    """16 hex digits identifying a fitted tokenizer's tables (None for no tokenizer)."""
    if tokenizer is None:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps([list(tokenizer.item_ids), tokenizer.vocab.state_dict(), tokenizer.config.to_dict(),
                              tokenizer.cot], default=str).encode())
    for table in (tokenizer.item_cot, tokenizer.sids, tokenizer.collision, tokenizer.journey_key):
        digest.update(table.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprints(prepared) -> dict:
    return {"data": data_fingerprint(prepared.data), "tokenizer": tokenizer_fingerprint(prepared.tokenizer)}


def read_run(directory: str) -> dict:
    """The run.json of `directory`, checked to be a JSON object."""
    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not a sparserec run (no {RUN_FILE}); create one with `sparserec train`")
    try:
        with open(path, encoding="utf-8") as file:
            run = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {error}") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(run).__name__}")
    return run


def write_run(directory: str, run: dict) -> None:
    """Writes run.json atomically (a killed write never leaves a truncated file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RUN_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(run, file, indent=2)
    os.replace(path + ".tmp", path)


def run_field(run: dict, directory: str, key: str):
    if key not in run:
        raise ValueError(f"{os.path.join(directory, RUN_FILE)} lacks {key!r} (written by another version, or edited)")
    return run[key]


def check_fingerprints(directory: str, run: dict, prepared) -> None:
    """Raises ValueError listing every difference between the run's recorded data and tokenizer
    fingerprints and `prepared` (the data as it loads now, and the run's tokenizer)."""
    saved = run_field(run, directory, "fingerprints")
    current = fingerprints(prepared)
    changes = fingerprint_changes(saved.get("data", {}), current["data"])
    if saved.get("tokenizer") != current["tokenizer"]:
        changes.append(f"the tokenizer ({saved.get('tokenizer')} -> {current['tokenizer']}; "
                       f"{os.path.join(directory, TOKENIZER_FILE)} was replaced, or the tokenizer options differ)")
    if changes:
        raise ValueError(f"run {directory} was trained on other data than it loads now: " + "; ".join(changes)
                         + ". Restore the data the run was trained on, or train a new run")


def load_file(path: str, what: str):
    """torch.load (weights only) of `path` with errors that name the file and what it should hold."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, pickle errors ... for a bad file
        raise ValueError(f"{path} cannot be read as {what} (truncated or corrupt?): "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def prepare_out_dir(directory: str, resume: bool, overwrite: bool) -> dict | None:
    """Before training into `directory`: None for a fresh start (after `overwrite` removed an old
    run's files), or the saved run.json when resuming. Refuses a directory holding a run unless
    `resume` or `overwrite`, and `resume` without a checkpoint to continue."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--out {directory} is a file, not a directory")
    present = [name for name in (RUN_FILE, CHECKPOINT_FILE, MODEL_FILE) if os.path.isfile(os.path.join(directory, name))]
    if resume:
        if not os.path.isfile(os.path.join(directory, CHECKPOINT_FILE)):
            raise ValueError(f"--resume: {directory} holds no {CHECKPOINT_FILE} to continue")
        return read_run(directory)
    if present and not overwrite:
        raise ValueError(f"{directory} already holds a run ({', '.join(present)}); pass --resume to continue its "
                         "checkpoint with the same options, --overwrite to start again, or another --out")
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)
    return None


def check_resumable(directory: str, saved: dict, options: dict) -> None:
    """Raises ValueError naming every training option that differs from the run being resumed."""
    recorded = run_field(saved, directory, "options")
    differ = [f"--{key.replace('_', '-')} {recorded.get(key)!r} -> {value!r}" for key, value in options.items()
              if key not in RESUME_FREE_OPTIONS and recorded.get(key) != value]
    differ += [f"--{key.replace('_', '-')} {value!r} -> (not given)" for key, value in recorded.items()
               if key not in RESUME_FREE_OPTIONS and key not in options]
    if differ:
        raise ValueError(f"--resume: {directory} was trained with other options: {'; '.join(differ)}. Resume with "
                         "the same options, or pass --overwrite to start again")


def json_options(namespace) -> dict:
    """The JSON-representable options of an argparse namespace (the ones a run records)."""
    options = {}
    for key, value in sorted(vars(namespace).items()):
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            options[key] = value
    return options
