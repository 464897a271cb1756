"""What do S²GR's thinking steps cost per recommendation? Two saved GRACE runs (one without
`--think`, one with) timed on the same test users, interleaved, in one process.

Per user (a batch of one): encode + trie-constrained beam search (`sparserec.models.recommend`),
the median of `--repeats` timings after a warm-up; then the same for batches of `--batch` users
(time per user), also interleaved. Reports the median over users of each run's per-user latency
and the ratio think / baseline, with the decoder tokens each fed per item path.

    OMP_NUM_THREADS=1 python benchmarks/think_latency.py runs/baseline runs/think --users 100
"""
import argparse
import os
import statistics

import torch

from sparserec.evaluate import task_targets
from sparserec.generate import Trie
from sparserec.models import recommend
from sparserec.pipeline import load_run, subsample
from sparserec.savings import median_ms
from sparserec.train.examples import GRACEExamples


def batches(model, prepared, targets, size):
    tokenizer = prepared.tokenizer
    max_interactions = model.config.max_positions // tokenizer.tokens_per_interaction
    examples = GRACEExamples(prepared.data, tokenizer, targets, max_interactions)
    for start in range(0, len(examples), size):
        batch = examples.collate([examples[i] for i in range(start, min(start + size, len(examples)))])
        given = batch["targets"][:, :1] if tokenizer.behavior_token else None
        yield (batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"]), given


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="a saved GRACE run without --think")
    parser.add_argument("think", help="a saved GRACE run with --think, same dataset and layout")
    parser.add_argument("--users", type=int, default=100, help="test users drawn with a fixed seed")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="users per batch in the batched timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    runs = {name: load_run(path) for name, path in (("baseline", args.baseline), ("think", args.think))}
    if (runs["baseline"][0].config.think is not None) or (runs["think"][0].config.think is None):
        raise ValueError("the first run must be trained without --think and the second with it")
    prepared = runs["baseline"][1]
    if prepared.tokenizer.path_depth != runs["think"][1].tokenizer.path_depth:
        raise ValueError("the two runs' item paths have different depths: they are no like-for-like pair")
    targets = task_targets(prepared.data, subsample(prepared.split.test, args.users), "behavior_specific")
    per_user = {name: [] for name in runs}
    batched = {name: [] for name in runs}
    inputs = {name: list(batches(model, run_prepared, targets, 1)) for name, (model, run_prepared, _) in runs.items()}
    tries = {name: Trie(run_prepared.tokenizer.item_paths()) for name, (_, run_prepared, _) in runs.items()}
    for user in range(len(targets)):
        for name, (model, _, _) in runs.items():  # interleaved: drift in the machine's load hits both
            histories, given = inputs[name][user]
            per_user[name].append(median_ms(lambda: recommend(model, tries[name], *histories, args.beam,
                                                              start_tokens=given), args.repeats))
    batch_inputs = {name: list(batches(model, run_prepared, targets, args.batch))
                    for name, (model, run_prepared, _) in runs.items()}
    for index in range(len(batch_inputs["baseline"])):
        for name, (model, _, _) in runs.items():  # interleaved batch by batch, as the users above
            histories, given = batch_inputs[name][index]
            users = len(histories[1]) - 1
            batched[name].append(median_ms(lambda: recommend(model, tries[name], *histories, args.beam,
                                                             start_tokens=given), args.repeats) / users)
    depth = tries["baseline"].depth
    fed = {"baseline": depth, "think": depth + runs["think"][0].config.think.levels}
    print(f"{len(targets)} test users, beam {args.beam}, {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| run | decoder tokens per item path | per user, batch of 1: median ms | batched "
          f"({args.batch} users): ms per user |")
    print("|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {fed[name]} | {statistics.median(per_user[name]):.2f} | "
              f"{statistics.median(batched[name]):.2f} |")
    ratios = [t / b for t, b in zip(per_user["think"], per_user["baseline"])]
    print(f"think / baseline, batch of 1: median of per-user ratios {statistics.median(ratios):.3f}; "
          f"ratio of medians {statistics.median(per_user['think']) / statistics.median(per_user['baseline']):.3f}")
    batched_ratio = statistics.median(batched["think"]) / statistics.median(batched["baseline"])
    print(f"think / baseline, batched: {batched_ratio:.3f}")


if __name__ == "__main__":
    main()
