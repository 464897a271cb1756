"""Paired comparison of GRACE runs on the same test users: per-user NDCG/HR, each run's mean with
its standard error, and each run's difference from the first run with the paired standard error;
and per-level SID accuracy (teacher forced: the argmax over the vocabulary at SID level l, given
the history and the true tokens before it, is the true code; thinking steps fed as in training).

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
from sparserec.metrics import per_user_hits_and_gains, target_ranks
from sparserec.models.grace import shift_right
from sparserec.pipeline import load_run, subsample
from sparserec.train.examples import GRACEExamples

KS = (5, 10)


def per_user_values(run_dir: str, users, beam: int, cache: str) -> dict:
    """{"hr@K", "ndcg@K": (n,) float64} of the run on the test targets (all, or `users` drawn with seed 0)."""
    key = hashlib.sha1(f"{os.path.abspath(run_dir)}|{users}|{beam}".encode()).hexdigest()[:16]
    path = os.path.join(cache, f"{os.path.basename(run_dir.rstrip('/'))}-{key}.npz")
    cached = dict(np.load(path)) if os.path.isfile(path) else {}
    if "sid_correct" in cached:
        return cached
    model, prepared, run = load_run(run_dir, "cpu")
    if run.get("model") != "grace":
        raise ValueError(f"{run_dir} holds a {run.get('model')} run; this compares GRACE runs")
    targets = subsample(prepared.split.test, users)
    max_interactions = model.config.max_positions // prepared.tokenizer.tokens_per_interaction
    if cached:  # written before the accuracies were recorded: add them
        cached["sid_correct"] = sid_correct(model, prepared, targets, max_interactions)
        np.savez(path, **cached)
        return cached
    trie = Trie(prepared.tokenizer.item_paths())
    ranked = grace_rankings(model, prepared.tokenizer, prepared.data, targets, trie, "behavior_specific", beam,
                            max_interactions=max_interactions)
    ranks = target_ranks(ranked, torch.from_numpy(targets.items(prepared.data)).long())
    values = {"users": np.stack([targets.user, targets.position], 1),
              "sid_correct": sid_correct(model, prepared, targets, max_interactions)}
    for k in KS:
        hits, gains = per_user_hits_and_gains(ranks, k)
        values[f"hr@{k}"], values[f"ndcg@{k}"] = hits.numpy(), gains.numpy()
    os.makedirs(cache, exist_ok=True)
    np.savez(path, **values)
    return values


@torch.no_grad()
def sid_correct(model, prepared, targets, max_interactions: int, batch_size: int = 256) -> np.ndarray:
    """(n, levels) bool: teacher-forced argmax at each SID level equals the target's code."""
    model.eval()
    levels = prepared.tokenizer.levels
    examples = GRACEExamples(prepared.data, prepared.tokenizer, targets, max_interactions)
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = examples.collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        wanted = batch["targets"]
        if model.config.think:
            wanted = model.insert_thinking(wanted)
            logits = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"],
                           shift_right(wanted, model.config.decoder_start_token_id), think=True)[0]
        else:
            logits = model(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"], batch["decoder_input_ids"])
        # Target layout `[...] SID_1..SID_k collision` (thinking steps interleaved before each SID).
        real = torch.nonzero(wanted[0] < model.config.vocab_size).flatten()
        sid_columns = real[-levels - 1:-1]
        rows.append((logits.argmax(-1)[:, sid_columns] == wanted[:, sid_columns]).numpy())
    return np.concatenate(rows)


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
    print("\nPer-level SID accuracy (teacher forced), mean ± SE over the same users:")
    levels = base["sid_correct"].shape[1]
    print("| run | " + " | ".join(f"SID_{l + 1}" for l in range(levels)) + " | all levels |")
    print("|---|" + "---|" * (levels + 1))
    for run, values in results.items():
        correct = values["sid_correct"].astype(np.float64)
        cells = [f"{correct[:, l].mean():.4f} ± {se(correct[:, l]):.4f}" for l in range(levels)]
        whole = correct.all(1)
        print(f"| {os.path.basename(run.rstrip('/'))} | " + " | ".join(cells) + f" | {whole.mean():.4f} ± {se(whole):.4f} |")


if __name__ == "__main__":
    main()
