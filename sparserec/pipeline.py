"""The recommender end to end: data -> tokenizer -> model -> training -> evaluation, and saved runs.

    prepared = prepare("embedded", tokenizer_config=TokenizerConfig.fast())
    model = build_model("grace", prepared, attention="jsa")
    fit(model, prepared, "grace", TrainConfig(max_steps=300))
    results = evaluate(model, prepared, "grace")          # {task: per-behavior metrics}
    save_run("runs/demo", model, prepared, spec)  /  load_run("runs/demo")

`sparserec.cli` is a thin command line over these functions.
"""
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .data import DataSplit, InteractionData, Targets, default_split, load_dataset
from .evaluate import evaluate_grace, evaluate_popularity, evaluate_recency, evaluate_sasrec, task_targets, tasks_for
from .generate import Trie
from .models import GRACE, SASRec, GRACEConfig, SASRecConfig
from .tokenize import ItemTokenizer, TokenizerConfig
from .train import Trainer, TrainConfig
from .train.examples import DEFAULT_MAX_INTERACTIONS, GRACEExamples, SASRecExamples, grace_loss, sasrec_loss

MODELS = ("grace", "sasrec")


@dataclass
class Prepared:
    """A dataset with its split and fitted tokenizer (cot=False: the layout without CoT tokens)."""

    dataset: str
    data: InteractionData
    split: DataSplit
    tokenizer: ItemTokenizer


def prepare(dataset: str = "embedded", root=None, max_lines=None, tokenizer_config: TokenizerConfig | None = None,
            cache_dir: str | None = None, cot: bool = True, progress: bool = True) -> Prepared:
    data = load_dataset(dataset, root, max_lines=max_lines)
    split = default_split(data)
    tokenizer = ItemTokenizer.fit(data, tokenizer_config or TokenizerConfig(), train_end=split.train_end,
                                  cache_dir=cache_dir, progress=progress, cot=cot)
    return Prepared(dataset, data, split, tokenizer)


def build_model(kind: str, prepared: Prepared, **options):
    """A fresh GRACE (options: GRACEConfig fields) or SASRec (options: SASRecConfig fields)."""
    if kind == "grace":
        longest = int(prepared.data.lengths.max()) * prepared.tokenizer.tokens_per_interaction
        options.setdefault("max_positions", min(longest, DEFAULT_MAX_INTERACTIONS * prepared.tokenizer.tokens_per_interaction))
        return GRACE(GRACEConfig(vocab_size=prepared.tokenizer.vocab.size, **options))
    if kind == "sasrec":
        options.setdefault("max_length", DEFAULT_MAX_INTERACTIONS)
        return SASRec(SASRecConfig(num_items=prepared.data.num_items, **options))
    raise ValueError(f"model must be one of {MODELS}, got {kind!r}")


def model_kind(model) -> str:
    return "grace" if isinstance(model, GRACE) else "sasrec"


def subsample(targets: Targets, limit: int | None, seed: int = 0) -> Targets:
    """At most `limit` targets, drawn without replacement (fixed seed: the same users every time)."""
    if limit is None or len(targets) <= limit:
        return targets
    keep = np.sort(np.random.default_rng(seed).choice(len(targets), limit, replace=False))
    return Targets(targets.user[keep], targets.position[keep])


def evaluate(model, prepared: Prepared, targets: Targets | None = None, beam_size: int = 20,
             progress: bool = True) -> dict:
    """{task: per-behavior metrics} on `targets` (default: the test split) for each of the data's tasks."""
    targets = prepared.split.test if targets is None else targets
    if model_kind(model) == "sasrec":
        return {"behavior_specific": evaluate_sasrec(model, prepared.data, targets)}
    trie = Trie(prepared.tokenizer.item_paths(), device=next(model.parameters()).device)
    return {task: evaluate_grace(model, prepared.tokenizer, prepared.data, targets, task, trie=trie,
                                 beam_size=beam_size, max_interactions=model.config.max_positions
                                 // prepared.tokenizer.tokens_per_interaction, progress=progress)
            for task in tasks_for(prepared.data)}


def baselines(prepared: Prepared, targets: Targets | None = None) -> dict:
    """{"popularity": ..., "recent items": ...} on every task's targets, in `evaluate`'s format."""
    targets = prepared.split.test if targets is None else targets
    data, tasks = prepared.data, tasks_for(prepared.data)
    return {
        "popularity": {task: evaluate_popularity(data, prepared.split.train_end, task_targets(data, targets, task))
                       for task in tasks},
        "recent items": {task: evaluate_recency(data, task_targets(data, targets, task)) for task in tasks},
    }


def fit(model, prepared: Prepared, config: TrainConfig, valid_users: int | None = 512, beam_size: int = 20,
        checkpoint: str | None = None):
    """Trains on every training prefix; validation NDCG@10 (behavior_specific task, up to
    `valid_users` users) drives early stopping. Resumes from `checkpoint` when it exists."""
    data, split = prepared.data, prepared.split
    valid = subsample(split.valid, valid_users)
    if model_kind(model) == "grace":
        max_interactions = model.config.max_positions // prepared.tokenizer.tokens_per_interaction
        examples = GRACEExamples(data, prepared.tokenizer, split.train_targets(data), max_interactions)
        loss_fn = grace_loss
        trie = Trie(prepared.tokenizer.item_paths())

        def evaluate_fn(trained):
            trie_on_device = trie.to(next(trained.parameters()).device)
            return evaluate_grace(trained, prepared.tokenizer, data, valid, "behavior_specific", trie=trie_on_device,
                                  beam_size=beam_size, max_interactions=max_interactions, progress=False)["all"]
    else:
        examples = SASRecExamples(data, split.train_end, model.config.max_length)
        loss_fn = sasrec_loss

        def evaluate_fn(trained):
            return evaluate_sasrec(trained, data, valid)["all"]
    config = dataclasses.replace(config, checkpoint_path=checkpoint)
    trainer = Trainer(model, examples, loss_fn, config, collate_fn=examples.collate, evaluate_fn=evaluate_fn)
    if checkpoint and os.path.isfile(checkpoint):
        trainer.load_checkpoint(checkpoint)
    return trainer.fit()


def save_run(directory: str, model, prepared: Prepared, spec: dict):
    """Writes run.json (spec: how to rebuild the data; the model config), model.pt and tokenizer.pt."""
    os.makedirs(directory, exist_ok=True)
    prepared.tokenizer.save(os.path.join(directory, "tokenizer.pt"))
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    run = {**spec, "model": model_kind(model), "model_config": _to_dict(model.config), "cot": prepared.tokenizer.cot}
    with open(os.path.join(directory, "run.json"), "w") as file:
        json.dump(run, file, indent=2)


def load_run(directory: str, device=None):
    """(model, prepared, run spec) of a directory written by `save_run`."""
    path = os.path.join(directory, "run.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not a sparserec run (no run.json); create one with `sparserec train`")
    with open(path) as file:
        run = json.load(file)
    data = load_dataset(run["dataset"], run.get("root"), max_lines=run.get("max_lines"))
    tokenizer = ItemTokenizer.load(os.path.join(directory, "tokenizer.pt"), cot=run["cot"])
    prepared = Prepared(run["dataset"], data, default_split(data), tokenizer)
    if run["model"] == "grace":
        model = GRACE(GRACEConfig.from_dict(run["model_config"]))
    else:
        model = SASRec(SASRecConfig(**run["model_config"]))
    model.load_state_dict(torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True))
    return model.to(device or "cpu").eval(), prepared, run


def _to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
