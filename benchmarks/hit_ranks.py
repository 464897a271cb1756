"""Where GRACE's hits land in its beam, and what the items ranked above them share with them.

A model can find the target as often as another (HR@10) yet rank it lower (NDCG@5). This prints,
for users drawn with seed 0 from the validation or test split (behavior-specific task, beam search):
the number of users whose target sits at each rank, HR@1/5/10, and, over the items ranked above a
hit, the share that has the hit's CoT tokens, its CoT tokens and first SID code, or its whole
semantic ID (collision siblings, told apart only by the collision token). Item path layout:
`[CoT ...] SID_1..SID_k collision`.

  python benchmarks/hit_ranks.py runs/grace-beauty-coba-13k-drop0-dense --split valid --users 5000
"""
import argparse

import numpy as np
import torch

from sparserec.evaluate import grace_rankings, task_targets
from sparserec.generate import Trie
from sparserec.metrics import target_ranks
from sparserec.pipeline import load_run, subsample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a GRACE run directory")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--users", type=int, default=5000, help="users drawn with seed 0 (all if fewer)")
    parser.add_argument("--beam", type=int, default=20)
    args = parser.parse_args()
    if args.users < 1 or args.beam < 10:
        parser.error("--users must be >= 1 and --beam >= 10 (HR@10 is reported)")
    torch.set_num_threads(1)

    model, prepared, run = load_run(args.run)
    if run.get("model") != "grace":
        raise ValueError(f"{args.run} holds a {run.get('model')} run; this reads GRACE's beam")
    tokenizer = prepared.tokenizer
    split = prepared.split.valid if args.split == "valid" else prepared.split.test
    targets = task_targets(prepared.data, subsample(split, args.users), "behavior_specific")
    ranked = grace_rankings(model, tokenizer, prepared.data, targets, Trie(tokenizer.item_paths()),
                            "behavior_specific", args.beam,
                            max_interactions=model.config.max_positions // tokenizer.tokens_per_interaction)
    truth = targets.items(prepared.data)
    ranks = target_ranks(ranked, torch.from_numpy(truth).long()).numpy()  # 1-based, inf: not in the beam
    found = np.isfinite(ranks)
    paths = tokenizer.item_paths().numpy()
    cot = paths.shape[1] - tokenizer.levels - 1

    print(f"{args.run}: {len(truth)} {args.split} users, beam {args.beam}")
    print(f"users whose target is at rank 1..{args.beam}: "
          f"{np.bincount(ranks[found].astype(int) - 1, minlength=args.beam).tolist()}")
    for k in (1, 5, 10):
        print(f"HR@{k} {np.mean(ranks <= k):.4f}")

    same_cot = same_first_code = same_sid = above = 0
    for row, item, rank in zip(ranked.numpy(), truth, ranks):
        if not 1 < rank < np.inf:
            continue
        rank = int(rank) - 1  # items ranked above the hit
        others, hit = paths[row[:rank]], paths[item]
        cot_match = (others[:, :cot] == hit[:cot]).all(1)
        same_cot += cot_match.sum()
        same_first_code += (cot_match & (others[:, cot] == hit[cot])).sum()
        same_sid += (others[:, :-1] == hit[:-1]).all(1).sum()
        above += rank
    sizes = np.unique(paths[:, :-1], axis=0, return_counts=True)[1]
    total = max(above, 1)
    print(f"items ranked above a hit: {above}; sharing its CoT tokens {same_cot / total:.3f}, "
          f"its CoT and SID_1 {same_first_code / total:.3f}, its whole semantic ID {same_sid / total:.3f}")
    print(f"catalogue items whose semantic ID another item shares: {sizes[sizes > 1].sum() / len(paths):.3f}")


if __name__ == "__main__":
    main()
