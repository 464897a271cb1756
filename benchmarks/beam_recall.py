"""How close is GRACE's beam search to true full ranking? Beam top-K against exhaustive top-K.

For a sample of test users of a saved GRACE run, ranks the catalogue twice for the
behavior_specific task: by trie-constrained beam search (what `evaluate` reports) and by every
item's exact full-path log-prob (`sparserec.evaluate.exhaustive_rankings`, the true full ranking).
Reports, per K: the mean overlap |beam top-K ∩ exhaustive top-K| / K (the beam's recall of the true
top K) with its standard error, and HR@K / NDCG@K under both rankings on the same users.

    python benchmarks/beam_recall.py runs/grace-beauty --users 50 --beam 20
"""
import argparse
import time

import torch

from sparserec.evaluate import exhaustive_rankings, grace_rankings, task_targets, top_k_overlap
from sparserec.generate import Trie
from sparserec.metrics import ranking_metrics, standard_error
from sparserec.pipeline import load_run, subsample


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a saved GRACE run directory")
    parser.add_argument("--users", type=int, default=50, help="test users drawn with a fixed seed")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, prepared, _ = load_run(args.run)
    data, tokenizer = prepared.data, prepared.tokenizer
    targets = task_targets(data, subsample(prepared.split.test, args.users, args.seed), "behavior_specific")
    max_interactions = model.config.max_positions // tokenizer.tokens_per_interaction
    started = time.process_time()
    beam = grace_rankings(model, tokenizer, data, targets, Trie(tokenizer.item_paths()), "behavior_specific",
                          args.beam, max_interactions=max_interactions, progress=False)
    beam_seconds = time.process_time() - started
    started = time.process_time()
    exhaustive = exhaustive_rankings(model, tokenizer, data, targets, "behavior_specific", args.beam,
                                     max_interactions=max_interactions, progress=True)
    exhaustive_seconds = time.process_time() - started
    truth = torch.from_numpy(targets.items(data)).long()
    print(f"{args.run}: {len(targets)} test users (seed {args.seed}), {data.num_items} items, beam {args.beam}; "
          f"CPU s: beam {beam_seconds:.1f}, exhaustive {exhaustive_seconds:.1f}")
    print("| K | beam recall of the true top K (± SE) | HR@K beam | HR@K exhaustive | NDCG@K beam | NDCG@K exhaustive |")
    print("|---|---|---|---|---|---|")
    for k in (5, 10):
        overlap = top_k_overlap(beam, exhaustive, k)
        by_beam, by_rank = ranking_metrics(beam, truth, (k,)), ranking_metrics(exhaustive, truth, (k,))
        print(f"| {k} | {overlap.mean().item():.3f} ± {standard_error(overlap):.3f} | {by_beam[f'hr@{k}']:.4f} | "
              f"{by_rank[f'hr@{k}']:.4f} | {by_beam[f'ndcg@{k}']:.4f} | {by_rank[f'ndcg@{k}']:.4f} |")


if __name__ == "__main__":
    main()
