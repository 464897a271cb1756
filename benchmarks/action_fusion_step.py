"""Training-step time of the generative ranker's three action fusions (issue 11), measured interleaved.

The three models (docs/action_fusion.md) train on the *same* batches of a dataset's training
examples; each round times one optimizer step (forward, both losses, backward, AdamW) of every
fusion in turn, so load from other processes hits all three alike. Reported per fusion: median
seconds per step (and its interquartile range), sequence tokens per step, steps per epoch and the
implied seconds per epoch, and the speed-up over interleaving.

    OMP_NUM_THREADS=1 python benchmarks/action_fusion_step.py --dataset taobao-ecomm-cikm2019 --rounds 30
"""
import argparse
import statistics
import time

import numpy as np
import torch

from sparserec.data import default_split, load_dataset
from sparserec.models.gr import FUSIONS, GRConfig, GenerativeRanker
from sparserec.train.gr import RankerExamples, action_users, ranker_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="taobao-ecomm-cikm2019")
    parser.add_argument("--attention", choices=("dense", "jsa"), default="dense")
    parser.add_argument("--backend", default="auto", help="JSA backend (--attention jsa)")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per fusion (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the interquartile range needs two timings)")
    data = load_dataset(args.dataset)
    train_end = default_split(data).train_end
    # The training set of `sparserec train --model gr`: the action evaluation's users held out.
    examples = RankerExamples(data, train_end, max_length=50, held_out=action_users(data, train_end, seed=args.seed))
    rng = np.random.default_rng(args.seed)
    needed = args.batch_size * (args.rounds + 3)  # epochs are reshuffled when the rounds need more than one
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(-(-needed // len(examples)))])
    batches = [examples.collate([examples[i] for i in order[start:start + args.batch_size]])
               for start in range(0, needed, args.batch_size)]
    models, optimizers, seconds = {}, {}, {fusion: [] for fusion in FUSIONS}
    for fusion in FUSIONS:
        torch.manual_seed(args.seed)
        models[fusion] = GenerativeRanker(GRConfig(num_items=data.num_items, num_actions=len(data.behaviors),
                                                   fusion=fusion, attention=args.attention, d_ff=256,
                                                   backend=args.backend)).train()
        optimizers[fusion] = torch.optim.AdamW(models[fusion].parameters(), lr=1e-3)
    for round_index, batch in enumerate(batches):
        for fusion in FUSIONS:
            started = time.perf_counter()
            optimizers[fusion].zero_grad(set_to_none=True)
            ranker_loss(models[fusion], batch).backward()
            optimizers[fusion].step()
            if round_index >= 3:
                seconds[fusion].append(time.perf_counter() - started)
    steps_per_epoch = -(-len(examples) // args.batch_size)
    base = statistics.median(seconds["interleave"])
    print(f"{args.dataset}: {len(examples)} training sequences, batch {args.batch_size} -> {steps_per_epoch} "
          f"steps/epoch; --attention {args.attention}; {torch.get_num_threads()} threads; {args.rounds} rounds")
    print("| fusion | sequence tokens / step | median s/step (IQR) | s/epoch | time vs interleave |")
    print("|---|---|---|---|---|")
    for fusion in FUSIONS:
        median = statistics.median(seconds[fusion])
        low, _, high = statistics.quantiles(seconds[fusion], n=4)
        tokens = examples.interactions_per_epoch() * models[fusion].config.tokens_per_interaction / steps_per_epoch
        print(f"| {fusion} | {tokens:.0f} | {median:.3f} ({low:.3f}–{high:.3f}) | {median * steps_per_epoch:.1f} | "
              f"{median / base:.2f}x |")


if __name__ == "__main__":
    main()
