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
import dataclasses
import json
import math
import os
import sys
import time

import torch

from . import runs, savings
from .data import DATASET_NAMES, dataset_statistics, default_split, format_statistics, load_dataset
from .evaluate import task_targets, tasks_for
from .generate import Trie
from .ops.trie import MAX_PADDED_BEAMS
from .models import recommend as recommend_items
from .models.grace import ThinkConfig
from .models.gr import FUSIONS, GRConfig, GenerativeRanker
from .models.gram import GRAMConfig
from .pipeline import (GRACE_PRESETS, MODELS, TRAIN_DEFAULTS, baselines, build_model, evaluate, fit, load_run, prepare,
                       save_run, subsample)
from .reference.jsa import BRANCHES
from .tokenize import EMBEDDING_KINDS, TOKENIZER_METHODS, CoBaConfig, TokenizerConfig
from .tokenize.lexical import LexicalConfig
from .train import TrainConfig, init_distributed, seed_everything, shutdown_distributed
from .train.gr import format_ranker_metrics, train_ranker


# CoBa's options (--coba-window ...), as argparse names; each maps to the CoBaConfig field after "coba_".
COBA_OPTIONS = ("coba_window", "coba_steps", "coba_mix", "coba_uniformity", "coba_balance")
# S²GR thinking's options (--think-clusters ...); each maps to the ThinkConfig field after "think_".
THINK_OPTIONS = ("think_clusters", "think_align_weight", "think_interest_weight", "think_interest_reg",
                 "think_temperature")

# GRAM's options (--gram-c ...), as argparse names (docs/gram.md).
GRAM_OPTIONS = ("gram_c", "gram_l", "gram_branching", "gram_k", "gram_passages", "gram_sasrec_run")

# The generative ranker of issue 11 (docs/action_fusion.md): its training defaults, where an option is not given.
GR_TRAIN_DEFAULTS = dict(d_model=64, heads=2, layers=2, steps=300, batch_size=64, lr=1e-3, warmup=30, dropout=0.1,
                         schedule="cosine", eval_every=0)

# The largest K of the reported metrics (HR@10, NDCG@10): a beam must hold at least this many items.
LARGEST_K = 10


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default (unless its help states it, or it is a flag), and the
    description as written."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def length_list(text: str) -> list:
    """--lengths: comma-separated positive interaction counts."""
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 128,512, got {text!r}") from None
    if any(length < 1 for length in lengths):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return lengths


def _check_arguments(parser, args) -> None:
    """Checks that tie options together, before any work; a failure exits with a one-line message."""
    def fail(message):
        parser.exit(2, f"{parser.prog} {args.command}: error: {message}\n")

    coba_given = [f"--{name.replace('_', '-')}" for name in COBA_OPTIONS if getattr(args, name, None) is not None]
    if coba_given and args.tokenizer != "coba":
        fail(f"{', '.join(coba_given)} applies to --tokenizer coba only")
    think_given = [f"--{name.replace('_', '-')}" for name in THINK_OPTIONS if getattr(args, name, None) is not None]
    if think_given and not args.think:
        fail(f"{', '.join(think_given)} applies to --think only")
    if getattr(args, "think", False):
        if args.model != "grace":
            fail("--think applies to --model grace only")
        codebook_size = TokenizerConfig().rqvae.codebook_size
        if args.think_clusters is not None and args.think_clusters > codebook_size:
            fail(f"--think-clusters ({args.think_clusters}) cannot exceed the codebook size ({codebook_size})")
    if getattr(args, "beam", None) is not None and args.command in ("train", "evaluate") and args.beam < LARGEST_K:
        fail(f"--beam ({args.beam}) must be at least {LARGEST_K}: the metrics rank the top {LARGEST_K} "
                     "items of the beam")
    gram_given = [f"--{name.replace('_', '-')}" for name in GRAM_OPTIONS if getattr(args, name, None) is not None]
    if gram_given and args.model != "gram":
        fail(f"{', '.join(gram_given)} applies to --model gram only")
    if args.command == "train" and args.model == "gram":
        if args.disable_branch:
            fail("--disable-branch does not apply to --model gram (its encoder is dense)")
        if _gram_value(args, "gram_k") and args.gram_sasrec_run is None:
            fail(f"--gram-k {_gram_value(args, 'gram_k')} needs --gram-sasrec-run DIR, a trained SASRec run of the "
                 "same dataset (its item embeddings give the similar items), or --gram-k 0")
    if args.command == "train" and (args.model == "gr") != (args.action_fusion is not None):
        fail("--model gr needs --action-fusion" if args.model == "gr" else "--action-fusion applies to --model gr only")
    if args.command == "train" and args.model == "gr":
        for flag, given in (("--disable-branch", args.disable_branch), ("--patience", args.patience),
                            ("--mask-history", args.mask_history)):
            if given:
                fail(f"{flag} does not apply to --model gr (it trains a fixed number of steps and ranks without masking)")
    if args.command == "train":
        fixed_head_dim = args.model == "grace" and GRACE_PRESETS[args.preset]["model"].get("head_dim")
        if args.d_model % args.heads and not fixed_head_dim:
            fail(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
        if args.resume and args.overwrite:
            fail("--resume and --overwrite exclude each other")
        if args.disable_branch and args.attention != "jsa":
            fail("--disable-branch applies to --attention jsa only")
        if len(set(args.disable_branch)) == len(BRANCHES):
            fail("--disable-branch: disabling all four branches leaves the encoder no attention")


def _dataset_arguments(parser):
    parser.add_argument("--dataset", default="embedded",
                        help="embedded, taobao-ecomm-cikm2019, amazon-beauty, mbht-retail, or a generic-format folder")
    parser.add_argument("--root", default=None, help="folder holding the named datasets (default: $SPARSEREC_DATA "
                                                     "or ../shared/data)")
    parser.add_argument("--max-lines", type=positive_int, default=None,
                        help="read at most this many lines per file (default: all)")
    parser.add_argument("--embedding", choices=EMBEDDING_KINDS, default="collab", help="item embeddings for the RQ-VAE")
    parser.add_argument("--full-tokenizer", action="store_true",
                        help="train the RQ-VAE with its full budget (default: the fast setting)")
    parser.add_argument("--tokenizer", choices=TOKENIZER_METHODS, default="rqvae",
                        help="semantic IDs: TIGER's RQ-VAE, or S²GR's CoBa RQ-VAE (co-occurrence propagation, "
                             "uniformity loss, load balancing)")
    defaults = CoBaConfig()
    parser.add_argument("--coba-window", type=positive_int, default=None,
                        help=f"CoBa: co-occurrence window in events (default: {defaults.window})")
    parser.add_argument("--coba-steps", type=non_negative_int, default=None,
                        help=f"CoBa: neighbour-averaging steps before quantization (default: {defaults.steps})")
    parser.add_argument("--coba-mix", type=fraction, default=None,
                        help=f"CoBa: weight of the neighbour average in each step (default: {defaults.mix})")
    parser.add_argument("--coba-uniformity", type=non_negative_float, default=None,
                        help=f"CoBa: weight of the codeword uniformity loss (default: {defaults.uniformity})")
    parser.add_argument("--coba-balance", type=non_negative_float, default=None,
                        help=f"CoBa: strength of the usage-based load balancing (default: {defaults.balance})")
    parser.add_argument("--cache", default=os.path.join(".cache", "sparserec"), help="tokenizer cache folder")
    parser.add_argument("--no-cot", action="store_true", help="drop the CoT tokens (product type, price, brand)")
    parser.add_argument("--keep-constant-slots", action="store_true",
                        help="keep token slots that are constant on this dataset (a single behavior, no prices)")


def _train_arguments(parser):
    parser.add_argument("--model", choices=MODELS + ("gr", "gram"), default="grace",
                        help="the recommender to train (gr: the causal generative ranker of docs/action_fusion.md; "
                             "gram: GRAM's lexical IDs and late fusion, docs/gram.md)")
    parser.add_argument("--attention", choices=("jsa", "dense"), default="jsa",
                        help="GRACE encoder attention; the gr ranker's causal attention")
    parser.add_argument("--action-fusion", choices=FUSIONS, default=None,
                        help="--model gr: interleaved item/action tokens, AttnLFA or AttnMVP (required with gr)")
    parser.add_argument("--disable-branch", action="append", choices=BRANCHES, default=[],
                        help="JSA branch whose gate is fixed to 0 (ablation; repeatable)")
    # Options whose default depends on --model (pipeline.TRAIN_DEFAULTS) are filled in by _model_defaults.
    per_model = dict(default=argparse.SUPPRESS)
    parser.add_argument("--d-model", type=positive_int, **per_model,
                        help="model width (a multiple of --heads; default: per model, grace 128, sasrec 128)")
    parser.add_argument("--heads", type=positive_int, **per_model, help="attention heads (default: grace 4, sasrec 4)")
    parser.add_argument("--layers", type=positive_int, **per_model,
                        help="encoder and decoder layers, each (default: grace 2, sasrec 2)")
    parser.add_argument("--steps", type=positive_int, **per_model,
                        help="training steps (batches; default: grace 2000, sasrec 5250 = 15 Beauty epochs)")
    parser.add_argument("--batch-size", type=positive_int, **per_model, help="training examples per step (default: 64)")
    parser.add_argument("--lr", type=positive_float, **per_model, help="peak learning rate (AdamW; default: 1e-3)")
    parser.add_argument("--warmup", type=non_negative_int, **per_model, help="linear warmup steps (default: 100)")
    parser.add_argument("--eval-every", type=non_negative_int, **per_model,
                        help="steps between validations (0: only at the end; default: grace 500, sasrec 350); "
                             "gr: steps between points of the test learning curve (no selection; default 0)")
    parser.add_argument("--dropout", type=float, **per_model, help="dropout (default: grace 0.1, sasrec 0.2)")
    parser.add_argument("--head", choices=("tied", "untied"), default="tied",
                        help="SASRec output head: the item embedding (tied) or its own matrix")
    parser.add_argument("--preset", choices=("small", "tiger"), default="small",
                        help="GRACE shape and schedule (pipeline.GRACE_PRESETS); --d-model/--heads/--layers override")
    parser.add_argument("--max-history", type=positive_int, default=None,
                        help="GRACE: keep each user's most recent N interactions (default: the preset's)")
    parser.add_argument("--mask-history", action="store_true",
                        help="rank without the user's own past items (S3-Rec full-sort convention; default: off)")
    parser.add_argument("--time-limit", type=positive_float, default=None,
                        help="stop training after this many minutes, validate and evaluate (default: no limit)")
    parser.add_argument("--patience", type=non_negative_int, default=0,
                        help="validations without improvement before stopping (0: never stop early)")
    parser.add_argument("--valid-users", type=positive_int, **per_model,
                        help="validation users drawn for early stopping (default: grace 512, sasrec all)")
    parser.add_argument("--test-users", type=positive_int, default=None,
                        help="evaluate on this many test users drawn with a fixed seed (default: all)")
    parser.add_argument("--beam", type=positive_int, default=20,
                        help=f"beam size of the constrained generation (at least {LARGEST_K}, the largest K)")
    parser.add_argument("--think", action="store_true",
                        help="GRACE: S²GR's thinking step before each SID level (forced in generation), aligned "
                             "with k-means clusters of the codebooks, plus the holistic-interest head")
    parser.add_argument("--think-clusters", type=_int_at_least(2), default=None,
                        help=f"--think: K_c, k-means clusters per level's codebook (default: {ThinkConfig.clusters})")
    parser.add_argument("--think-align-weight", type=non_negative_float, default=None,
                        help=f"--think: weight of the thought-centroid InfoNCE (default: {ThinkConfig.align_weight})")
    parser.add_argument("--think-interest-weight", type=non_negative_float, default=None,
                        help="--think: weight of the holistic-interest InfoNCE "
                             f"(default: {ThinkConfig.interest_weight})")
    parser.add_argument("--think-interest-reg", type=non_negative_float, default=None,
                        help=f"--think: lambda of lambda*(1 - cos(t_1, sg(v_g))) (default: {ThinkConfig.interest_reg})")
    parser.add_argument("--think-temperature", type=positive_float, default=None,
                        help=f"--think: temperature of both InfoNCE losses (default: {ThinkConfig.temperature})")
    lexical, gram = LexicalConfig(), GRAMConfig
    parser.add_argument("--gram-c", type=_int_at_least(2), default=None,
                        help=f"--model gram: a cluster of at least c items is split further (default: {lexical.max_cluster})")
    parser.add_argument("--gram-l", type=positive_int, default=None,
                        help=f"--model gram: the most cluster levels of an ID (default: {lexical.max_depth})")
    parser.add_argument("--gram-branching", type=_int_at_least(2), default=None,
                        help=f"--model gram: clusters per k-means split (default: {lexical.branching})")
    parser.add_argument("--gram-k", type=non_negative_int, default=None,
                        help=f"--model gram: similar items in each item prompt, from --gram-sasrec-run (0: none; "
                             f"default: {GRAM_DEFAULT_K})")
    parser.add_argument("--gram-passages", type=non_negative_int, default=None,
                        help=f"--model gram: item prompts fused per user (0: the coarse prompt alone; "
                             f"default: {gram.passages})")
    parser.add_argument("--gram-sasrec-run", default=None,
                        help="--model gram: a trained SASRec run directory of the same dataset (the similar items)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data order and sampling")
    parser.add_argument("--out", default=os.path.join("runs", "latest"), help="run directory to write")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=100,
                        help="steps between checkpoints in --out (0: only at validations and the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint in --out (same options and data only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (by default an existing run is refused)")


GRAM_DEFAULT_K = 3


def _gram_value(args, name: str):
    """A GRAM option as given, else its default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    lexical = LexicalConfig()
    return {"gram_c": lexical.max_cluster, "gram_l": lexical.max_depth, "gram_branching": lexical.branching,
            "gram_k": GRAM_DEFAULT_K, "gram_passages": GRAMConfig.passages}.get(name)


def _tokenizer_config(args) -> TokenizerConfig:
    coba = CoBaConfig(**{name[len("coba_"):]: getattr(args, name) for name in COBA_OPTIONS
                         if getattr(args, name) is not None})
    options = dict(embedding=args.embedding, method=args.tokenizer, coba=coba)
    return TokenizerConfig(**options) if args.full_tokenizer else TokenizerConfig.fast(**options)


def _prepared(args, progress=True):
    config = _tokenizer_config(args)
    return prepare(args.dataset, args.root, args.max_lines, config, args.cache, cot=not args.no_cot, progress=progress,
                   tokenize=getattr(args, "model", "grace") not in ("sasrec", "gram"),
                   drop_constant=not args.keep_constant_slots)


def _model_defaults(args) -> None:
    """Fills the per-model options the command line left out (pipeline.TRAIN_DEFAULTS, GRACE presets)."""
    if args.command != "train":
        return
    defaults = dict(GR_TRAIN_DEFAULTS if args.model == "gr" else TRAIN_DEFAULTS[args.model])
    if args.model == "grace":
        defaults.update(GRACE_PRESETS[args.preset]["train"])
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)


def _model_options(args) -> dict:
    if args.model == "sasrec":
        return dict(d_model=args.d_model, num_heads=args.heads, layers=args.layers, dropout=args.dropout,
                    head=args.head)
    if args.model == "gram":
        lexical = LexicalConfig(max_cluster=_gram_value(args, "gram_c"), max_depth=_gram_value(args, "gram_l"),
                                branching=_gram_value(args, "gram_branching"), seed=args.seed)
        return dict(lexical=lexical, embedding=args.embedding, similar=_gram_value(args, "gram_k"),
                    sasrec_run=args.gram_sasrec_run, cache_dir=args.cache, passages=_gram_value(args, "gram_passages"),
                    d_model=args.d_model, num_heads=args.heads, encoder_layers=args.layers, decoder_layers=args.layers,
                    d_ff=4 * args.d_model, dropout=args.dropout)
    options = dict(GRACE_PRESETS[args.preset]["model"], d_model=args.d_model, num_heads=args.heads,
                   encoder_layers=args.layers, decoder_layers=args.layers, dropout=args.dropout,
                   attention=args.attention, disabled_branches=tuple(args.disable_branch))
    if args.max_history is not None:
        options["max_history"] = args.max_history
    if args.think:
        options["think"] = {name[len("think_"):]: getattr(args, name) for name in THINK_OPTIONS
                            if getattr(args, name) is not None}
    return options


def format_metrics(results: dict) -> str:
    """results: {model name: {task: per-behavior metrics}} -> a markdown table of the "all" rows."""
    lines = ["| model | task | users | HR@5 | NDCG@5 | HR@10 | NDCG@10 | SE of HR@10 / NDCG@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, tasks in results.items():
        for task, metrics in tasks.items():
            m = metrics["all"]
            lines.append(f"| {name} | {task} | {m['count']} | {m['hr@5']:.4f} | {m['ndcg@5']:.4f} | "
                         f"{m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@10_se']:.4f} / {m['ndcg@10_se']:.4f} |")
    return "\n".join(lines)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; rank 0 owns the run directory


def _absolute_dataset(args) -> None:
    """A run records where its data is: a folder (generic dataset, --root) as an absolute path."""
    if args.dataset not in DATASET_NAMES and os.path.isdir(args.dataset):
        args.dataset = os.path.abspath(args.dataset)
    if args.root is not None:
        args.root = os.path.abspath(args.root)


def _train_and_evaluate(args, prepared, saved_run=None):
    """saved_run: the run.json being resumed (its data and tokenizer must match `prepared`)."""
    seed_everything(args.seed)
    model = build_model(args.model, prepared, **_model_options(args))
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         eval_every=args.eval_every, patience=args.patience, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, schedule=args.schedule,
                         time_limit_s=60 * (args.time_limit or 0))
    run = {"dataset": args.dataset, "root": args.root, "max_lines": args.max_lines,
           "options": runs.json_options(args), "fingerprints": runs.fingerprints(prepared)}
    if _is_main_process():
        if saved_run is not None:
            runs.check_fingerprints(args.out, saved_run, prepared)
        runs.write_run(args.out, {**run, "complete": False})  # a killed run still says what it trains on
    started = time.perf_counter()
    result = fit(model, prepared, config, valid_users=args.valid_users, beam_size=args.beam,
                 checkpoint=os.path.join(args.out, "checkpoint.pt"), mask_history=args.mask_history)
    train_seconds = time.perf_counter() - started
    rank = init_distributed()[0]
    shutdown_distributed()
    if rank != 0:  # under torchrun, rank 0 holds the best weights and does the rest
        return model, None, train_seconds
    save_run(args.out, model, prepared, {**run, "complete": True})
    test = subsample(prepared.split.test, args.test_users)
    results = {args.model: evaluate(model, prepared, test, beam_size=args.beam, mask_history=args.mask_history,
                                    item_cache=args.cache if args.model == "gram" else None),
               **baselines(prepared, test, mask_history=args.mask_history)}
    with open(os.path.join(args.out, "metrics.json"), "w") as file:
        json.dump({"results": results, "train_seconds": train_seconds, "steps": result.step,
                   "history": result.history}, file, indent=2)
    return model, results, train_seconds


def cmd_prepare(args):
    prepared = _prepared(args)
    print(format_statistics(dataset_statistics(prepared.data)))
    tokenizer = prepared.tokenizer
    print(f"split: {prepared.split.protocol}, {len(prepared.split.valid)} validation and "
          f"{len(prepared.split.test)} test targets")
    print(f"tokenizer: {tokenizer.tokens_per_interaction} tokens per interaction, vocabulary {tokenizer.vocab.size}")
    print("tokenizer stats: " + json.dumps(tokenizer.stats, default=float))
    print(format_codebook_stats(tokenizer.stats, tokenizer.levels))


def format_codebook_stats(stats: dict, levels: int) -> str:
    """Per SID level: codebook utilisation (codes used / codes) and the share of items whose code
    prefix through that level is unique (at the last level: unique before the collision index)."""
    lines = ["| SID level | codebook utilisation | items with a unique prefix |", "|---|---|---|"]
    for level in range(1, levels + 1):
        unique = stats.get(f"unique_level_{level}")
        lines.append(f"| {level} | {stats[f'utilisation_level_{level}']:.4f} | "
                     f"{'not recorded' if unique is None else f'{unique:.4f}'} |")
    return "\n".join(lines)


def _train_ranker(args):
    """--model gr: train the generative ranker for --steps, evaluate, save metrics.json in --out."""
    saved_run = runs.prepare_out_dir(args.out, args.resume, args.overwrite)
    if saved_run is not None:
        runs.check_resumable(args.out, saved_run, runs.json_options(args))
    data = load_dataset(args.dataset, args.root, max_lines=args.max_lines)
    split = default_split(data)
    if len(split.test) == 0:
        raise ValueError(f"{data.name}: no user has the 3 interactions leave-one-out evaluation needs; use more data")
    seed_everything(args.seed)
    config = GRConfig(num_items=data.num_items, num_actions=len(data.behaviors), fusion=args.action_fusion,
                      attention=args.attention, d_model=args.d_model, num_heads=args.heads, layers=args.layers,
                      d_ff=4 * args.d_model, dropout=args.dropout, max_length=args.max_history or 50)
    model = GenerativeRanker(config)
    run = {"dataset": args.dataset, "root": args.root, "max_lines": args.max_lines, "model": "gr",
           "options": runs.json_options(args), "model_config": dataclasses.asdict(config)}
    runs.write_run(args.out, {**run, "complete": False})
    train_config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                               seed=args.seed, checkpoint_every=args.checkpoint_every, schedule=args.schedule,
                               time_limit_s=60 * (args.time_limit or 0))
    metrics = train_ranker(model, data, split, train_config, args.out, resume=args.resume,
                           test_users=args.test_users, seed=args.seed, curve_every=args.eval_every)
    runs.write_run(args.out, {**run, "complete": True})
    print(f"{data.name}, --action-fusion {args.action_fusion}, --attention {args.attention}; run saved to {args.out}")
    print(format_ranker_metrics(metrics, data.behaviors))


def cmd_train(args):
    # Here rather than in _check_arguments: the README's commands are parsed where no run exists.
    if args.model == "gram" and args.gram_sasrec_run is not None and \
            not os.path.isfile(os.path.join(args.gram_sasrec_run, runs.RUN_FILE)):
        raise ValueError(f"--gram-sasrec-run {args.gram_sasrec_run}: no SASRec run there (no {runs.RUN_FILE}); train "
                         "one with `sparserec train --model sasrec --out DIR`")
    _absolute_dataset(args)
    if args.model == "gr":
        return _train_ranker(args)
    saved_run = None
    if _is_main_process():
        saved_run = runs.prepare_out_dir(args.out, args.resume, args.overwrite)
        if saved_run is not None:
            runs.check_resumable(args.out, saved_run, runs.json_options(args))
    prepared = _prepared(args)
    _check_targets(prepared, prepared.split.valid, "validation", "--valid-users", args.valid_users,
                   tasks=("behavior_specific",))
    _check_targets(prepared, subsample(prepared.split.test, args.test_users), "test", "--test-users", args.test_users,
                   tasks=("behavior_specific",) if args.model in ("sasrec", "gram") else None)
    if args.model == "grace" and args.beam > max(prepared.data.num_items, MAX_PADDED_BEAMS):
        raise ValueError(f"--beam {args.beam} is larger than the {prepared.data.num_items} items of {args.dataset} "
                         "(the beam search could not fill it)")
    _, results, seconds = _train_and_evaluate(args, prepared, saved_run)
    if results is None:
        return
    print(f"trained in {seconds:.0f} s; run saved to {args.out}")
    print(f"test split, history masking: {'on' if args.mask_history else 'off'}")
    print(format_metrics(results))


def cmd_evaluate(args):
    if runs.read_run(args.run).get("model") == "gr":
        raise ValueError(f"{args.run} holds a --model gr run, which `train` evaluates: its test metrics are in "
                         f"{os.path.join(args.run, runs.METRICS_FILE)}")
    if args.exhaustive and (runs.read_run(args.run).get("model_config") or {}).get("think"):
        raise ValueError("--exhaustive scores paths without the thinking steps; this run thinks (--think): "
                         "evaluate it by beam search")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, prepared, _ = load_run(args.run, device)
    targets = prepared.split.test if args.split == "test" else prepared.split.valid
    targets = subsample(targets, args.max_users)
    _check_targets(prepared, targets, args.split, "--max-users", args.max_users)
    name = os.path.basename(os.path.normpath(args.run))
    results = {name: evaluate(model, prepared, targets, args.beam, mask_history=args.mask_history)}
    if args.exhaustive:
        results[f"{name} (exhaustive)"] = evaluate(model, prepared, targets, args.beam, mask_history=args.mask_history,
                                                   exhaustive=True)
    results.update(baselines(prepared, targets, mask_history=args.mask_history))
    print(f"history masking: {'on' if args.mask_history else 'off'}")
    print(format_metrics(results))


def _check_targets(prepared, targets, split: str, option: str, limit, tasks=None) -> None:
    """Before any training or evaluation: each task (default: the data's) has targets in `targets`."""
    data = prepared.data
    if len(targets) == 0:
        raise ValueError(f"{data.name}: the {split} split is empty ({data.num_users} users, "
                         f"{data.num_interactions} events after filtering); use more data")
    for task in tasks or tasks_for(data):
        if task != "behavior_specific" and len(task_targets(data, targets, task)) == 0:
            raise ValueError(f"{data.name}: the {len(targets)} {split} users"
                             f"{f' drawn by {option} {limit}' if limit else ''} hold no target for the {task} "
                             f"task ({data.target_behavior!r} events); use more users or more data")


def _require_grace_run(directory: str, command: str) -> None:
    kind = runs.run_field(runs.read_run(directory), directory, "model")
    if kind != "grace":
        raise ValueError(f"{command} needs a GRACE run; {directory} holds a {kind} run")


def cmd_recommend(args):
    _require_grace_run(args.run, "recommend")
    model, prepared, run = load_run(args.run)
    data, tokenizer = prepared.data, prepared.tokenizer
    if args.user not in data.user_ids:
        raise ValueError(f"user {args.user!r} is not in {data.name}")
    items, behaviors = data.history(data.user_ids.index(args.user))
    tokens, anchors = tokenizer.history_tokens(items[-model.config.max_positions // tokenizer.tokens_per_interaction:],
                                               behaviors[-model.config.max_positions // tokenizer.tokens_per_interaction:])
    behavior = data.behavior_code(args.behavior or data.target_behavior or data.behaviors[0])
    start = tokenizer.behavior_tokens([behavior])[:, None]
    ranked, scores = recommend_items(model, Trie(tokenizer.item_paths()), tokens, torch.tensor([0, len(tokens)]),
                                     anchors, args.top, start_tokens=start)
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
        return args.lengths
    return [128, 256, 512, 1024] if device.type == "cpu" else [128, 512, 1024, 2048, 4096]


def cmd_bench(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = _long_lengths(args, device)
    if args.run:
        _require_grace_run(args.run, "bench")
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
        max_lines=None, checkpoint_every=100, dropout=0.1, head="tied", preset="small", max_history=None,
        mask_history=False, schedule="cosine", time_limit=None, think=False)
    if _is_main_process():
        runs.prepare_out_dir(args.out, resume=False, overwrite=True)  # the demo always starts afresh
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


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (every subcommand and option)."""
    parser = argparse.ArgumentParser(prog="sparserec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train + evaluate on the embedded data, then measure JSA savings",
                               formatter_class=_HelpFormatter)
    demo.add_argument("--steps", type=positive_int, default=300, help="training steps")
    demo.add_argument("--lengths", type=length_list, default=None,
                      help="comma-separated synthetic history lengths (interactions; default: by device)")
    demo.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per measurement")
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="run directory (replaced)")
    demo.add_argument("--cache", default=os.path.join(".cache", "sparserec"), help="tokenizer cache folder")
    demo.set_defaults(handler=cmd_demo)

    prep = commands.add_parser("prepare", help="load, split and tokenize a dataset", formatter_class=_HelpFormatter)
    _dataset_arguments(prep)
    prep.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", help="train a model and save the run", formatter_class=_HelpFormatter,
                                description="Train a model on a dataset; save the run directory --out. An existing "
                                            "run there is refused unless --resume or --overwrite.")
    _dataset_arguments(train)
    _train_arguments(train)
    train.set_defaults(handler=cmd_train)

    evaluation = commands.add_parser("evaluate", help="evaluate a saved run", formatter_class=_HelpFormatter)
    evaluation.add_argument("run", help="run directory written by `sparserec train`")
    evaluation.add_argument("--split", choices=("test", "valid"), default="test", help="the split to evaluate on")
    evaluation.add_argument("--mask-history", action="store_true",
                            help="rank without the user's own past items (S3-Rec full-sort convention)")
    evaluation.add_argument("--exhaustive", action="store_true",
                            help="GRACE: also rank by every item's full-path log-prob (true full ranking; "
                                 "num_items decoder passes per user: use --max-users)")
    evaluation.add_argument("--max-users", type=positive_int, default=None,
                            help="evaluate on this many users drawn with a fixed seed (default: all)")
    evaluation.add_argument("--beam", type=positive_int, default=20,
                            help=f"beam size of the constrained generation (at least {LARGEST_K}, the largest K)")
    evaluation.set_defaults(handler=cmd_evaluate)

    rec = commands.add_parser("recommend", help="top-K items for one user of a saved GRACE run",
                              formatter_class=_HelpFormatter)
    rec.add_argument("run", help="run directory written by `sparserec train`")
    rec.add_argument("--user", required=True, help="the user's id as in the dataset")
    rec.add_argument("--behavior", default=None, help="behavior to recommend for (default: the target behavior)")
    rec.add_argument("--top", type=positive_int, default=10, help="how many items to recommend (the beam size)")
    rec.set_defaults(handler=cmd_recommend)

    bench = commands.add_parser("bench", help="JSA vs dense encoder FLOPs and latency", formatter_class=_HelpFormatter)
    bench.add_argument("--run", default=None, help="a saved GRACE run (default: a fresh model on the embedded data)")
    bench.add_argument("--lengths", type=length_list, default=None,
                       help="comma-separated synthetic history lengths (interactions; default: by device)")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per measurement")
    bench.add_argument("--beam", type=positive_int, default=20, help="beam size of the timed generation")
    bench.add_argument("--cache", default=os.path.join(".cache", "sparserec"), help="tokenizer cache folder")
    bench.set_defaults(handler=cmd_bench)

    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed, completed and checked arguments; a bad one exits (status 2) with a one-line message
    before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _model_defaults(args)
    _check_arguments(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"sparserec {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
