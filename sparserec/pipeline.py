"""The recommender end to end: data -> tokenizer -> model -> training -> evaluation, and saved runs.

    prepared = prepare("embedded", tokenizer_config=TokenizerConfig.fast())
    model = build_model("grace", prepared, attention="jsa")
    fit(model, prepared, "grace", TrainConfig(max_steps=300))
    results = evaluate(model, prepared, "grace")          # {task: per-behavior metrics}
    save_run("runs/demo", model, prepared, spec)  /  load_run("runs/demo")

`sparserec.cli` is a thin command line over these functions.
"""
import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from .data import DataSplit, InteractionData, Targets, default_split, load_dataset
from .evaluate import evaluate_grace, evaluate_popularity, evaluate_recency, evaluate_sasrec, task_targets, tasks_for
from .generate import Trie
from . import runs
from .models import GRACE, SASRec, GRACEConfig, SASRecConfig
from .models.grace import ThinkConfig, ThinkingObjective
from .models.gram import GRAM, GRAMConfig, build_gram, evaluate_gram, gram_examples, gram_loss
from .tokenize import ItemTokenizer, TokenizerConfig
from .train import Trainer, TrainConfig
from .train.examples import DEFAULT_MAX_INTERACTIONS, GRACEExamples, SASRecExamples, grace_loss, sasrec_loss

MODELS = ("grace", "sasrec")

# Training defaults per model (the CLI's, where an option is not given). SASRec's: 128-dim, 2 layers,
# 4 heads, dropout 0.2, batch 64, 5,250 steps = 15 epochs of Amazon Beauty's 22,363 training
# sequences (350 steps each), validated every epoch on all users; measured in benchmarks/RESULTS.md
# ("SASRec that trains right").
TRAIN_DEFAULTS = {
    "grace": dict(d_model=128, heads=4, layers=2, steps=2000, batch_size=64, lr=1e-3, warmup=100, eval_every=500,
                  dropout=0.1, valid_users=512, schedule="cosine"),
    "sasrec": dict(d_model=128, heads=4, layers=2, steps=5250, batch_size=64, lr=1e-3, warmup=100, eval_every=350,
                   dropout=0.2, valid_users=None, schedule="cosine"),
    "gram": dict(d_model=128, heads=4, layers=2, steps=2000, batch_size=64, lr=1e-3, warmup=100, eval_every=500,
                 dropout=0.1, valid_users=512, schedule="cosine"),
}

# GRACE recipes. "small": the CPU-sized model (2 + 2 layers, d_model 128, 4 heads of 32, d_ff 512,
# warmup + cosine, 50 interactions of history). "tiger": TIGER's (arXiv 2305.05065) shape for Amazon
# Beauty: 4 + 4 layers, d_model 128, 6 heads of 64 (attention width 384, projected from and to
# d_model as in T5), d_ff 1024, dropout 0.1, inverse-square-root schedule after a warmup, and the
# 20 most recent interactions. "model" holds GRACEConfig fields (plus max_history), "train" CLI options.
GRACE_PRESETS = {
    "small": {"model": dict(d_ff=512, max_history=DEFAULT_MAX_INTERACTIONS),
              "train": dict(d_model=128, heads=4, layers=2, dropout=0.1, schedule="cosine")},
    "tiger": {"model": dict(d_ff=1024, head_dim=64, max_history=20),
              "train": dict(d_model=128, heads=6, layers=4, dropout=0.1, schedule="inverse_sqrt", warmup=1000,
                            lr=1e-3, batch_size=256)},
}


@dataclass
class Prepared:
    """A dataset with its split and fitted tokenizer (cot=False: the layout without CoT tokens)."""

    dataset: str
    data: InteractionData
    split: DataSplit
    tokenizer: ItemTokenizer


def prepare(dataset: str = "embedded", root=None, max_lines=None, tokenizer_config: TokenizerConfig | None = None,
            cache_dir: str | None = None, cot: bool = True, progress: bool = True, tokenize: bool = True,
            drop_constant: bool = True) -> Prepared:
    """tokenize=False skips fitting the tokenizer (SASRec and the baselines use item ids only);
    drop_constant: leave out the token slots constant on this dataset (`ItemTokenizer`)."""
    data = load_dataset(dataset, root, max_lines=max_lines)
    split = default_split(data)
    tokenizer = ItemTokenizer.fit(data, tokenizer_config or TokenizerConfig(), train_end=split.train_end,
                                  cache_dir=cache_dir, progress=progress, cot=cot,
                                  drop_constant=drop_constant) if tokenize else None
    return Prepared(dataset, data, split, tokenizer)


def build_model(kind: str, prepared: Prepared, max_history: int = DEFAULT_MAX_INTERACTIONS, think: dict | None = None,
                **options):
    """A fresh GRACE (options: GRACEConfig fields; max_history: the most recent interactions its
    encoder sees, which sets max_positions; think: ThinkConfig fields other than levels and dim,
    which come from the tokenizer — S²GR's thinking steps) or SASRec (options: SASRecConfig fields)."""
    if kind == "grace":
        tokenizer = prepared.tokenizer
        per_interaction = tokenizer.tokens_per_interaction
        longest = int(prepared.data.lengths.max())
        options.setdefault("max_positions", min(longest, max_history) * per_interaction)
        if think is not None:
            if tokenizer.codebooks is None:
                raise ValueError("thinking needs the tokenizer's RQ-VAE codebooks, which this tokenizer was saved "
                                 "without: fit it again")
            if think.get("clusters", ThinkConfig.clusters) > tokenizer.config.rqvae.codebook_size:
                raise ValueError(f"think clusters (K_c = {think['clusters']}) cannot exceed the codebook size "
                                 f"({tokenizer.config.rqvae.codebook_size})")
            options["think"] = ThinkConfig(levels=tokenizer.levels, dim=tokenizer.codebooks.shape[-1], **think)
        return GRACE(GRACEConfig(vocab_size=tokenizer.vocab.size, **options))
    if think is not None:
        raise ValueError("think applies to GRACE only")
    if kind == "gram":  # options: build_gram's (lexical, embedding, similar, sasrec_run, cache_dir, GRAMConfig fields)
        return build_gram(prepared.data, prepared.split.train_end, **options)
    if kind == "sasrec":
        options.setdefault("max_length", DEFAULT_MAX_INTERACTIONS)
        return SASRec(SASRecConfig(num_items=prepared.data.num_items, **options))
    raise ValueError(f"model must be one of {MODELS}, got {kind!r}")


def model_kind(model) -> str:
    return "grace" if isinstance(model, GRACE) else "gram" if isinstance(model, GRAM) else "sasrec"


def subsample(targets: Targets, limit: int | None, seed: int = 0) -> Targets:
    """At most `limit` targets, drawn without replacement (fixed seed: the same users every time)."""
    if limit is None or len(targets) <= limit:
        return targets
    keep = np.sort(np.random.default_rng(seed).choice(len(targets), limit, replace=False))
    return Targets(targets.user[keep], targets.position[keep])


def evaluate(model, prepared: Prepared, targets: Targets | None = None, beam_size: int = 20,
             progress: bool = True, mask_history: bool = False, exhaustive: bool = False,
             item_cache: str | None = None) -> dict:
    """{task: per-behavior metrics} on `targets` (default: the test split) for each of the data's tasks.
    mask_history: rank without the user's past items; exhaustive: GRACE ranks by every item's
    full-path log-prob instead of beam search (see `sparserec.evaluate`); item_cache: GRAM reads its
    item encodings from an `ItemEncodingCache` in this folder (None: it re-encodes them)."""
    targets = prepared.split.test if targets is None else targets
    if model_kind(model) == "gram":
        return {"behavior_specific": evaluate_gram(model, prepared.data, targets, beam_size, progress=progress,
                                                   mask_history=mask_history, cache_dir=item_cache)}
    if model_kind(model) == "sasrec":
        return {"behavior_specific": evaluate_sasrec(model, prepared.data, targets, mask_history=mask_history)}
    if exhaustive and model.config.think:
        raise ValueError("exhaustive ranking scores paths without the thinking steps; a thinking model "
                         "(GRACEConfig.think) is evaluated by beam search")
    trie = Trie(prepared.tokenizer.item_paths(), device=next(model.parameters()).device)
    return {task: evaluate_grace(model, prepared.tokenizer, prepared.data, targets, task, trie=trie,
                                 beam_size=beam_size, max_interactions=model.config.max_positions
                                 // prepared.tokenizer.tokens_per_interaction, progress=progress,
                                 mask_history=mask_history, exhaustive=exhaustive)
            for task in tasks_for(prepared.data)}


def baselines(prepared: Prepared, targets: Targets | None = None, mask_history: bool = False) -> dict:
    """{"popularity": ..., "recent items": ...} on every task's targets, in `evaluate`'s format
    (with mask_history, recent items is left out: it ranks only history items)."""
    targets = prepared.split.test if targets is None else targets
    data, tasks = prepared.data, tasks_for(prepared.data)
    results = {"popularity": {task: evaluate_popularity(data, prepared.split.train_end, task_targets(data, targets, task),
                                                        mask_history=mask_history)
                              for task in tasks}}
    if not mask_history:
        results["recent items"] = {task: evaluate_recency(data, task_targets(data, targets, task)) for task in tasks}
    return results


def fit(model, prepared: Prepared, config: TrainConfig, valid_users: int | None = 512, beam_size: int = 20,
        checkpoint: str | None = None, mask_history: bool = False):
    """Trains on every training prefix; validation NDCG@10 (behavior_specific task, up to
    `valid_users` users; None: all) drives early stopping. Resumes from `checkpoint` when it exists."""
    data, split = prepared.data, prepared.split
    valid = subsample(split.valid, valid_users)
    if model_kind(model) == "grace":
        max_interactions = model.config.max_positions // prepared.tokenizer.tokens_per_interaction
        examples = GRACEExamples(data, prepared.tokenizer, split.train_targets(data), max_interactions)
        loss_fn = grace_loss
        if model.config.think:
            targets = prepared.tokenizer.thinking_targets(model.config.think.clusters, config.seed)
            loss_fn = ThinkingObjective(*targets)
        trie = Trie(prepared.tokenizer.item_paths())

        def evaluate_fn(trained):
            trie_on_device = trie.to(next(trained.parameters()).device)
            return evaluate_grace(trained, prepared.tokenizer, data, valid, "behavior_specific", trie=trie_on_device,
                                  beam_size=beam_size, max_interactions=max_interactions, progress=config.progress,
                                  mask_history=mask_history)["all"]
    elif model_kind(model) == "gram":
        examples = gram_examples(model, data, split.train_targets(data))
        loss_fn = gram_loss

        def evaluate_fn(trained):  # the weights change between validations: item prompts are re-encoded
            return evaluate_gram(trained, data, valid, beam_size, progress=config.progress,
                                 mask_history=mask_history)["all"]
    else:
        examples = SASRecExamples(data, split.train_end, model.config.max_length)
        loss_fn = sasrec_loss

        def evaluate_fn(trained):
            return evaluate_sasrec(trained, data, valid, mask_history=mask_history)["all"]
    config = dataclasses.replace(config, checkpoint_path=checkpoint)
    trainer = Trainer(model, examples, loss_fn, config, collate_fn=examples.collate, evaluate_fn=evaluate_fn,
                      count_batch=examples.counts)
    if checkpoint and os.path.isfile(checkpoint):
        try:
            trainer.load_checkpoint(checkpoint)
        except Exception as error:  # a truncated file, or the state of another model
            raise ValueError(f"{checkpoint} cannot be resumed (truncated, or written for another model or "
                             f"options): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                             ) from None
    return trainer.fit()


def save_run(directory: str, model, prepared: Prepared, spec: dict):
    """Writes run.json (spec: how to rebuild the data; the model config; the fingerprints of the
    data and tokenizer, computed here unless spec has them), model.pt and tokenizer.pt."""
    os.makedirs(directory, exist_ok=True)
    if prepared.tokenizer is not None:
        prepared.tokenizer.save(os.path.join(directory, "tokenizer.pt"))
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    tokenizer = prepared.tokenizer
    run = {"fingerprints": runs.fingerprints(prepared), "complete": True, **spec,
           "model": model_kind(model), "model_config": _to_dict(model.config),
           "cot": tokenizer.cot if tokenizer is not None else None,
           "drop_constant": tokenizer.drop_constant if tokenizer is not None else None}
    runs.write_run(directory, run)  # last, atomically: a complete run.json means the other files are written


def load_run(directory: str, device=None):
    """(model, prepared, run spec) of a directory written by `save_run`. Refuses a run whose data
    or tokenizer no longer match its recorded fingerprints (see `sparserec.runs`)."""
    run = runs.read_run(directory)
    if not run.get("complete", False):
        raise ValueError(f"{directory} holds an unfinished run (training was interrupted); continue it with "
                         "`sparserec train --resume` and the same options")
    data = load_dataset(runs.run_field(run, directory, "dataset"), run.get("root"), max_lines=run.get("max_lines"))
    tokenizer_path = os.path.join(directory, runs.TOKENIZER_FILE)
    tokenizer = None
    if os.path.isfile(tokenizer_path):
        try:
            # Runs written before drop_constant existed kept every slot.
            tokenizer = ItemTokenizer.load(tokenizer_path, cot=run["cot"], drop_constant=bool(run.get("drop_constant")))
        except Exception as error:  # torch.load of a truncated file raises RuntimeError, EOFError, ...
            raise ValueError(f"{tokenizer_path} cannot be read as a tokenizer (truncated or corrupt?): "
                             f"{type(error).__name__}: {error}") from None
    prepared = Prepared(run["dataset"], data, default_split(data), tokenizer)
    runs.check_fingerprints(directory, run, prepared)
    try:
        if runs.run_field(run, directory, "model") == "grace":
            model = GRACE(GRACEConfig.from_dict(runs.run_field(run, directory, "model_config")))
        elif run["model"] == "gram":
            model = GRAM(GRAMConfig(**runs.run_field(run, directory, "model_config")))
        else:
            model = SASRec(SASRecConfig(**runs.run_field(run, directory, "model_config")))
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{os.path.join(directory, runs.RUN_FILE)}: bad model_config: {error}") from None
    model_path = os.path.join(directory, runs.MODEL_FILE)
    try:
        model.load_state_dict(runs.load_file(model_path, "the model's weights"))
    except RuntimeError as error:  # missing or unexpected keys, other shapes
        raise ValueError(f"{model_path} does not fit the model_config of its run.json: "
                         f"{str(error).splitlines()[0]}") from None
    return model.to(device or "cpu").eval(), prepared, run


def _to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
