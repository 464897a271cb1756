"""What does GRAM's item-encoding cache save per recommendation? One saved GRAM run, the same test
users, with the fine item prompts re-encoded for every user (what the paper's code does) and read
from the memory-mapped `ItemEncodingCache` (built once, before timing; its build time is reported).

Per user (a batch of one), interleaved so that drift in the machine's load hits both: the encoder
alone (`GRAM.encode`: coarse prompt + item passages, fused) and the whole recommendation (encode +
trie-constrained beam search), each the median of `--repeats` timings after a warm-up. Reports the
median over users and the median of per-user ratios, and asserts that both ways give the same items
in the same order (scores: the largest absolute difference is printed). Then the same users in
batches of `--batch` (ms per user), where the decoder's beam steps are shared by the batch and the
item prompts' share of the work grows.

    OMP_NUM_THREADS=1 python benchmarks/gram_cache.py runs/gram-beauty-20min --users 200
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from sparserec.generate import Trie, beam_search
from sparserec.models.gram import ItemEncodingCache, gram_examples
from sparserec.pipeline import load_run, subsample
from sparserec.savings import median_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a saved GRAM run (sparserec train --model gram)")
    parser.add_argument("--users", type=int, default=200, help="test users drawn with a fixed seed")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="users per batch in the batched timing")
    parser.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model, prepared, run = load_run(args.run)
    if run.get("model") != "gram":
        raise ValueError(f"{args.run} holds a {run.get('model')!r} run, not a GRAM run")
    directory = args.cache or tempfile.mkdtemp(prefix="gram-cache-")
    cache = ItemEncodingCache(directory)
    started = time.perf_counter()
    cached = cache.encoder(model)
    build_s = time.perf_counter() - started
    targets = subsample(prepared.split.test, args.users)
    examples = gram_examples(model, prepared.data, targets)
    trie = Trie(model.item_paths)

    def recommend(batch, item_encoder):
        memory = model.encode(batch["user_tokens"], batch["passage_items"], item_encoder)
        return beam_search(model.make_step_fn(memory, args.beam), trie, len(batch["items"]), args.beam)

    times = {key: [] for key in ("encode", "encode cached", "recommend", "recommend cached")}
    largest_difference = 0.0
    for index in range(len(examples)):
        batch = examples.collate([examples[index]])
        items, scores = recommend(batch, None)
        cached_items, cached_scores = recommend(batch, cached)
        assert torch.equal(items, cached_items), f"user {index}: the cache changed the recommendations"
        largest_difference = max(largest_difference, float((scores - cached_scores).abs().max()))
        for item_encoder, suffix in ((None, ""), (cached, " cached")):  # interleaved
            times["encode" + suffix].append(median_ms(
                lambda: model.encode(batch["user_tokens"], batch["passage_items"], item_encoder), args.repeats))
            times["recommend" + suffix].append(median_ms(lambda: recommend(batch, item_encoder), args.repeats))

    batched = {"recommend": [], "recommend cached": []}
    for start in range(0, len(examples), args.batch):
        batch = examples.collate([examples[i] for i in range(start, min(start + args.batch, len(examples)))])
        assert torch.equal(recommend(batch, None)[0], recommend(batch, cached)[0]), "batched: the cache changed items"
        for item_encoder, suffix in ((None, ""), (cached, " cached")):
            batched["recommend" + suffix].append(
                median_ms(lambda: recommend(batch, item_encoder), args.repeats) / len(batch["items"]))

    config = model.config
    print(f"{args.run}: {len(examples)} test users, beam {args.beam}, {config.passages} item passages of "
          f"<= {config.prompt_length} tokens, d_model {config.d_model}, {config.encoder_layers} + "
          f"{config.decoder_layers} layers, {torch.get_num_threads()} thread, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"cache build (every item encoded once, {config.num_items} items): {build_s:.1f} s; file "
          f"{os.path.getsize(cache.path(model)) / 2**20:.0f} MiB")
    print(f"identical recommendations for all {len(examples)} users; largest score difference "
          f"{largest_difference:.2e}")
    print("| per user, batch of 1 | re-encoding: median ms | cached: median ms | speed-up (median of per-user "
          "ratios) |")
    print("|---|---|---|---|")
    for part in ("encode", "recommend"):
        ratios = [a / b for a, b in zip(times[part], times[part + " cached"])]
        print(f"| {part} | {statistics.median(times[part]):.2f} | {statistics.median(times[part + ' cached']):.2f} "
              f"| {statistics.median(ratios):.2f}x |")
    ratios = [a / b for a, b in zip(batched["recommend"], batched["recommend cached"])]
    print(f"| recommend, batches of {args.batch}: ms per user | {statistics.median(batched['recommend']):.2f} | "
          f"{statistics.median(batched['recommend cached']):.2f} | {statistics.median(ratios):.2f}x (median over "
          f"{len(ratios)} batches) |")


if __name__ == "__main__":
    main()
