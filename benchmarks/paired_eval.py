"""Paired comparison of GRACE runs on the same test users: per-user NDCG/HR, each run's mean with
its standard error, and each run's difference from the first run with the paired standard error.

Two runs evaluated on the same users share most of their variance (the same hard and easy users),
so the standard error of the mean of per-user differences is far below sqrt(SE_a^2 + SE_b^2): the
paired test is the one that says whether a gain is real. Per-user values are cached in --cache
(one .npz per run and user set), so a rerun only evaluates new runs.

  python benchmarks/paired_eval.py runs/baseline runs/coba runs/think runs/coba-think --users all
"""
import argparse
import hashlib
import math
import os

import numpy as np
import torch

from sparserec.evaluate import grace_rankings
from sparserec.generate import Trie
from sparserec.metrics import target_ranks
from sparserec.pipeline import load_run, subsample

KS = (5, 10)


def per_user_values(run_dir: str, users, beam: int, cache: str) -> dict:
    """{"hr@K", "ndcg@K": (n,) float64} of the run on the test targets (all, or `users` drawn with seed 0)."""
    key = hashlib.sha1(f"{os.path.abspath(run_dir)}|{users}|{beam}".encode()).hexdigest()[:16]
    path = os.path.join(cache, f"{os.path.basename(run_dir.rstrip('/'))}-{key}.npz")
    if os.path.isfile(path):
        return dict(np.load(path))
    model, prepared, run = load_run(run_dir, "cpu")
    if run.get("model") != "grace":
        raise ValueError(f"{run_dir} holds a {run.get('model')} run; this compares GRACE runs")
    targets = subsample(prepared.split.test, users)
    trie = Trie(prepared.tokenizer.item_paths())
    max_interactions = model.config.max_positions // prepared.tokenizer.tokens_per_interaction
    ranked = grace_rankings(model, prepared.tokenizer, prepared.data, targets, trie, "behavior_specific", beam,
                            max_interactions=max_interactions)
    ranks = target_ranks(ranked, torch.from_numpy(targets.items(prepared.data)).long()).numpy()
    values = {"users": np.stack([targets.user, targets.position], 1)}
    for k in KS:
        values[f"hr@{k}"] = (ranks <= k).astype(np.float64)
        values[f"ndcg@{k}"] = np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0)
    os.makedirs(cache, exist_ok=True)
    np.savez(path, **values)
    return values


def se(values) -> float:
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="GRACE run directories; the first is the baseline")
    parser.add_argument("--users", default="all", help="'all' test users, or N drawn with seed 0")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--cache", default=".cache/paired_eval")
    args = parser.parse_args()
    users = None if args.users == "all" else int(args.users)
    if users is not None and users < 2:
        raise ValueError(f"--users must be 'all' or at least 2, got {args.users}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {run: per_user_values(run, users, args.beam, args.cache) for run in args.runs}
    base_name = args.runs[0]
    base = results[base_name]
    for run, values in results.items():
        if not np.array_equal(values["users"], base["users"]):
            raise ValueError(f"{run} was evaluated on other users than {base_name} (another dataset or split)")
    metrics = [f"{m}@{k}" for k in KS for m in ("hr", "ndcg")]
    print(f"test users: {len(base['users'])} ({'all' if users is None else f'{users} drawn with seed 0'}), beam {args.beam}")
    print("| run | " + " | ".join(metrics) + " | NDCG@10 − first run (paired SE, z) |")
    print("|---|" + "---|" * (len(metrics) + 1))
    for run, values in results.items():
        cells = [f"{values[m].mean():.4f} ± {se(values[m]):.4f}" for m in metrics]
        diff = values["ndcg@10"] - base["ndcg@10"]
        paired = se(diff)
        gain = "" if run == base_name else (
            f"{diff.mean():+.4f} ({paired:.4f}, z = {diff.mean() / paired:.2f})" if paired else f"{diff.mean():+.4f}")
        print(f"| {os.path.basename(run.rstrip('/'))} | " + " | ".join(cells) + f" | {gain} |")


if __name__ == "__main__":
    main()
