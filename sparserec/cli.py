"""`sparserec {demo,prepare,train,evaluate,recommend,bench}` (also `python -m sparserec.cli ...`).

demo       train and evaluate GRACE (JSA encoder) on the embedded Taobao data, then measure JSA's
           FLOP and latency savings against dense attention (`make demo`)
prepare    load a dataset, split it, fit (and cache) the tokenizer; print statistics
train      train GRACE or SASRec, evaluate on the test split, save the run directory
evaluate   evaluate a saved run on its test (or validation) split
recommend  top-K items for one user of a saved run's dataset
bench      JSA vs dense encoder savings (FLOPs, latency) at the dataset's and long lengths
"""
import argparse
import json
import os
import sys
import time

import torch

from . import savings
from .data import dataset_statistics, format_statistics
from .generate import Trie
from .models import recommend as recommend_items
from .pipeline import MODELS, baselines, build_model, evaluate, fit, load_run, prepare, save_run, subsample
from .reference.jsa import BRANCHES
from .tokenize import EMBEDDING_KINDS, TokenizerConfig
from .train import TrainConfig, init_distributed, seed_everything, shutdown_distributed


def _dataset_arguments(parser):
    parser.add_argument("--dataset", default="embedded",
                        help="embedded, taobao-ecomm-cikm2019, amazon-beauty, mbht-retail, or a generic-format folder")
    parser.add_argument("--root", default=None, help="folder holding the named datasets (default: $SPARSEREC_DATA "
                                                     "or ../shared/data)")
    parser.add_argument("--max-lines", type=int, default=None, help="read at most this many lines per file")
    parser.add_argument("--embedding", choices=EMBEDDING_KINDS, default="collab", help="item embeddings for the RQ-VAE")
    parser.add_argument("--full-tokenizer", action="store_true",
                        help="train the RQ-VAE with its full budget (default: the fast setting)")
    parser.add_argument("--cache", default=os.path.join(".cache", "sparserec"), help="tokenizer cache folder")
    parser.add_argument("--no-cot", action="store_true", help="drop the CoT tokens (product type, price, brand)")


def _train_arguments(parser):
    parser.add_argument("--model", choices=MODELS, default="grace")
    parser.add_argument("--attention", choices=("jsa", "dense"), default="jsa", help="GRACE encoder attention")
    parser.add_argument("--disable-branch", action="append", choices=BRANCHES, default=[],
                        help="JSA branch whose gate is fixed to 0 (ablation; repeatable)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers (each)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--patience", type=int, default=0, help="validations without improvement before stopping")
    parser.add_argument("--valid-users", type=int, default=512, help="validation users drawn for early stopping")
    parser.add_argument("--test-users", type=int, default=None,
                        help="evaluate on this many test users drawn with a fixed seed (default: all)")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "latest"), help="run directory to write")


def _prepared(args, progress=True):
    config = TokenizerConfig(embedding=args.embedding) if args.full_tokenizer else TokenizerConfig.fast(
        embedding=args.embedding)
    return prepare(args.dataset, args.root, args.max_lines, config, args.cache, cot=not args.no_cot, progress=progress)


def _model_options(args) -> dict:
    if args.model == "sasrec":
        return dict(d_model=args.d_model, num_heads=args.heads, layers=args.layers)
    return dict(d_model=args.d_model, num_heads=args.heads, encoder_layers=args.layers, decoder_layers=args.layers,
                d_ff=4 * args.d_model, attention=args.attention, disabled_branches=tuple(args.disable_branch))


def format_metrics(results: dict) -> str:
    """results: {model name: {task: per-behavior metrics}} -> a markdown table of the "all" rows."""
    lines = ["| model | task | users | HR@5 | NDCG@5 | HR@10 | NDCG@10 |", "|---|---|---|---|---|---|---|"]
    for name, tasks in results.items():
        for task, metrics in tasks.items():
            m = metrics["all"]
            lines.append(f"| {name} | {task} | {m['count']} | {m['hr@5']:.4f} | {m['ndcg@5']:.4f} | "
                         f"{m['hr@10']:.4f} | {m['ndcg@10']:.4f} |")
    return "\n".join(lines)


def _train_and_evaluate(args, prepared):
    seed_everything(args.seed)
    model = build_model(args.model, prepared, **_model_options(args))
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         eval_every=args.eval_every, patience=args.patience, seed=args.seed)
    started = time.perf_counter()
    result = fit(model, prepared, config, valid_users=args.valid_users, beam_size=args.beam,
                 checkpoint=os.path.join(args.out, "checkpoint.pt"))
    train_seconds = time.perf_counter() - started
    rank = init_distributed()[0]
    shutdown_distributed()
    if rank != 0:  # under torchrun, rank 0 holds the best weights and does the rest
        return model, None, train_seconds
    spec = {"dataset": args.dataset, "root": args.root, "max_lines": args.max_lines}
    save_run(args.out, model, prepared, spec)
    test = subsample(prepared.split.test, args.test_users)
    results = {args.model: evaluate(model, prepared, test, beam_size=args.beam), **baselines(prepared, test)}
    with open(os.path.join(args.out, "metrics.json"), "w") as file:
        json.dump({"results": results, "train_seconds": train_seconds, "steps": result.step}, file, indent=2)
    return model, results, train_seconds


def cmd_prepare(args):
    prepared = _prepared(args)
    print(format_statistics(dataset_statistics(prepared.data)))
    tokenizer = prepared.tokenizer
    print(f"split: {prepared.split.protocol}, {len(prepared.split.valid)} validation and "
          f"{len(prepared.split.test)} test targets")
    print(f"tokenizer: {tokenizer.tokens_per_interaction} tokens per interaction, vocabulary {tokenizer.vocab.size}")
    print("tokenizer stats: " + json.dumps(tokenizer.stats, default=float))


def cmd_train(args):
    prepared = _prepared(args)
    _, results, seconds = _train_and_evaluate(args, prepared)
    if results is None:
        return
    print(f"trained in {seconds:.0f} s; run saved to {args.out}")
    print(format_metrics(results))


def cmd_evaluate(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, prepared, _ = load_run(args.run, device)
    targets = prepared.split.test if args.split == "test" else prepared.split.valid
    targets = subsample(targets, args.max_users)
    results = {os.path.basename(os.path.normpath(args.run)): evaluate(model, prepared, targets, args.beam),
               **baselines(prepared, targets)}
    print(format_metrics(results))


def cmd_recommend(args):
    model, prepared, run = load_run(args.run)
    data, tokenizer = prepared.data, prepared.tokenizer
    if args.user not in data.user_ids:
        raise ValueError(f"user {args.user!r} is not in {data.name}")
    items, behaviors = data.history(data.user_ids.index(args.user))
    if run["model"] != "grace":
        raise ValueError("recommend needs a GRACE run (SASRec runs are for evaluation only)")
    tokens, anchors = tokenizer.history_tokens(items[-model.config.max_positions // tokenizer.tokens_per_interaction:],
                                               behaviors[-model.config.max_positions // tokenizer.tokens_per_interaction:])
    behavior = data.behavior_code(args.behavior or data.target_behavior or data.behaviors[0])
    start = tokenizer.behavior_tokens([behavior])[:, None]
    ranked, scores = recommend_items(model, Trie(tokenizer.item_paths()), tokens, torch.tensor([0, len(tokens)]),
                                     anchors, max(args.top, 1), start_tokens=start)
    print(f"user {args.user}: {len(items)} past interactions; top {args.top} for behavior "
          f"{data.behaviors[behavior]!r}")
    for rank, (item, score) in enumerate(zip(ranked[0].tolist(), scores[0].tolist()), 1):
        if item >= 0:
            print(f"{rank:3d}. item {data.items.ids[item]}  log-prob {score:.3f}  "
                  f"type {data.items.product_type[item]}")


def _savings_batches(prepared, lengths, max_interactions, count: int = 64):
    data, tokenizer = prepared.data, prepared.tokenizer
    test = subsample(prepared.split.test, count)
    histories = [data.history(u, end=p) for u, p in zip(test.user, test.position)]
    batches = [(f"dataset ({len(histories)} test users)", tokenizer.batch_history_tokens(histories, max_interactions))]
    for interactions in lengths:
        long = savings.chained_histories(data, interactions, count=1)
        batches.append((f"{interactions} interactions", tokenizer.batch_history_tokens(long)))
    return batches


def _measure_savings(model, prepared, lengths, repeats, beam):
    device = next(model.parameters()).device
    batches = _savings_batches(prepared, lengths, model.config.max_positions // prepared.tokenizer.tokens_per_interaction)
    trie = Trie(prepared.tokenizer.item_paths(), device=device)
    rows = savings.measure(model, batches, trie, beam_size=beam, repeats=repeats)
    return savings.format_table(rows, _device_name(device))


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _long_lengths(args, device):
    if args.lengths:
        return [int(n) for n in args.lengths.split(",")]
    return [128, 256, 512, 1024] if device.type == "cpu" else [128, 512, 1024, 2048, 4096]


def cmd_bench(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = _long_lengths(args, device)
    if args.run:
        model, prepared, _ = load_run(args.run, device)
    else:
        prepared = prepare("embedded", tokenizer_config=TokenizerConfig.fast(), cache_dir=args.cache)
        model = build_model("grace", prepared).to(device)
    # Long synthetic histories need positions for every token.
    model = savings.with_max_positions(model, max(lengths) * prepared.tokenizer.tokens_per_interaction)
    print(_measure_savings(model, prepared, lengths, args.repeats, args.beam))


def cmd_demo(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    print("== data: the Taobao sample shipped in the package ==")
    prepared = prepare("embedded", tokenizer_config=TokenizerConfig.fast(), cache_dir=args.cache)
    print(format_statistics(dataset_statistics(prepared.data)))
    print(f"tokenizer: {prepared.tokenizer.tokens_per_interaction} tokens per interaction, vocabulary "
          f"{prepared.tokenizer.vocab.size}, collision rate {prepared.tokenizer.stats['collision_rate']:.3f}")
    print(f"\n== training GRACE with a JSA encoder for {args.steps} steps on {_device_name(device)} ==")
    train_args = argparse.Namespace(
        model="grace", attention="jsa", disable_branch=[], d_model=128, heads=4, layers=2, steps=args.steps,
        batch_size=64, lr=2e-3, warmup=min(100, args.steps // 10), eval_every=args.steps, patience=0,
        valid_users=256, test_users=None, beam=20, seed=0, out=args.out, dataset="embedded", root=None,
        max_lines=None)
    model, results, train_seconds = _train_and_evaluate(train_args, prepared)
    print(f"\n== test metrics (full ranking, trie-constrained beam 20; trained {train_seconds:.0f} s) ==")
    print(format_metrics(results))
    lengths = _long_lengths(args, device)
    model = savings.with_max_positions(model, max(lengths) * prepared.tokenizer.tokens_per_interaction)
    print("\n== JSA against dense attention in this model's encoder ==")
    table = _measure_savings(model, prepared, lengths, args.repeats, beam=20)
    print(table)
    with open(os.path.join(args.out, "savings.md"), "w") as file:
        file.write(table + "\n")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sparserec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train + evaluate on the embedded data, then measure JSA savings")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--lengths", default=None, help="comma-separated synthetic history lengths (interactions)")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--out", default=os.path.join("runs", "demo"))
    demo.add_argument("--cache", default=os.path.join(".cache", "sparserec"))
    demo.set_defaults(handler=cmd_demo)

    prep = commands.add_parser("prepare", help="load, split and tokenize a dataset")
    _dataset_arguments(prep)
    prep.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", help="train a model and save the run")
    _dataset_arguments(train)
    _train_arguments(train)
    train.set_defaults(handler=cmd_train)

    evaluation = commands.add_parser("evaluate", help="evaluate a saved run")
    evaluation.add_argument("run", help="run directory written by `sparserec train`")
    evaluation.add_argument("--split", choices=("test", "valid"), default="test")
    evaluation.add_argument("--max-users", type=int, default=None)
    evaluation.add_argument("--beam", type=int, default=20)
    evaluation.set_defaults(handler=cmd_evaluate)

    rec = commands.add_parser("recommend", help="top-K items for one user of a saved GRACE run")
    rec.add_argument("run")
    rec.add_argument("--user", required=True, help="the user's id as in the dataset")
    rec.add_argument("--behavior", default=None, help="behavior to recommend for (default: the target behavior)")
    rec.add_argument("--top", type=int, default=10)
    rec.set_defaults(handler=cmd_recommend)

    bench = commands.add_parser("bench", help="JSA vs dense encoder FLOPs and latency")
    bench.add_argument("--run", default=None, help="a saved GRACE run (default: a fresh model on the embedded data)")
    bench.add_argument("--lengths", default=None, help="comma-separated synthetic history lengths (interactions)")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--beam", type=int, default=20)
    bench.add_argument("--cache", default=os.path.join(".cache", "sparserec"))
    bench.set_defaults(handler=cmd_bench)

    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"sparserec {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
