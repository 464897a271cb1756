"""GRACE training step on the CPU: JSA encoder against the dense encoder, at the datasets' own lengths.

For each dataset, the `sparserec train` defaults (small preset, fast tokenizer, histories capped at 50
interactions, batch 64) build two GRACE models that differ only in the encoder's attention (JSA with
the fused C++ kernels, or dense SDPA per history), with the same initial weights where they share
parameters; a third is the dense model without dropout on attention probabilities (see make_models). Both run the same fixed training batches (the first --batches batches of the training
examples in a seeded order); one step = loss forward, backward, gradient clipping and AdamW.
Candidates are interleaved within each repeat; the median over repeats and batches is reported
after one untimed warm-up step each. The encoder alone (forward, forward+backward) is timed the same
way, so the share of the step that the attention choice can change is visible.

  python benchmarks/grace_step.py                                  # Taobao sample and Amazon Beauty, 1 and 2 threads
  python benchmarks/grace_step.py --datasets embedded --threads 1  # quicker
  PYTHONPATH=/path/to/older/checkout python benchmarks/grace_step.py --step-only --datasets amazon-beauty \
      --threads 1 --cache /tmp/older-cache   # the JSA step of another commit, to compare

Outputs grace_step.md and .csv under --out, stamped with the CPU, torch version and commit.
"""
import argparse
import csv
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparserec.models import GRACE
from sparserec.pipeline import build_model, prepare
from sparserec.tokenize import TokenizerConfig
from sparserec.train.examples import DEFAULT_MAX_INTERACTIONS, GRACEExamples, grace_loss

ROOT = Path(__file__).resolve().parents[1]


def make_batches(prepared, count: int, batch_size: int, seed: int = 0):
    examples = GRACEExamples(prepared.data, prepared.tokenizer, prepared.split.train_targets(prepared.data),
                             DEFAULT_MAX_INTERACTIONS)
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples.collate([examples[i] for i in order[b * batch_size:(b + 1) * batch_size]]) for b in range(count)]


def make_models(prepared):
    """JSA, dense, and dense without attention-probability dropout (the model's dropout of 0.1 also
    drops attention probabilities in the dense encoder, which sends the CPU's SDPA to its unfused
    math path; JSA has no such dropout)."""
    jsa = build_model("grace", prepared)
    models = {"JSA": jsa}
    for name in ("dense", "dense, no attention dropout"):
        dense = GRACE(dataclasses.replace(jsa.config, attention="dense", disabled_branches=()))
        shared = {key: value for key, value in jsa.state_dict().items()
                  if key in dense.state_dict() and value.shape == dense.state_dict()[key].shape}
        dense.load_state_dict(shared, strict=False)
        if name != "dense":
            for layer in dense.encoder_layers:
                layer.self_attention.attention.dropout = 0.0
        models[name] = dense
    return {name: model.train() for name, model in models.items()}


def step_functions(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        grace_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def encode():
        with torch.no_grad():
            model.encode(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"])

    def encode_backward():
        model.zero_grad(set_to_none=True)
        model.encode(batch["tokens"], batch["cu_seqlens"], batch["anchor_mask"]).states.sum().backward()

    return {"step": train_step, "encoder fwd": encode, "encoder fwd+bwd": encode_backward}


MEASURED = ("step", "encoder fwd", "encoder fwd+bwd")


def measure(models, batches, repeats: int, measured=MEASURED) -> dict:
    """{(what, candidate): median ms} over repeats x batches, candidates interleaved."""
    functions = {name: [step_functions(model, batch) for batch in batches] for name, model in models.items()}
    times = {}
    for what in measured:
        for per_batch in functions.values():
            per_batch[0][what]()  # warm-up
        for _ in range(repeats):
            for index in range(len(batches)):
                for name, per_batch in functions.items():
                    start = time.perf_counter()
                    per_batch[index][what]()
                    times.setdefault((what, name), []).append(1000 * (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="embedded,amazon-beauty")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", type=int, default=4, help="distinct training batches timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "sparserec"), help="tokenizer cache folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--step-only", action="store_true",
                        help="time only the JSA model's training step and print it, no files: this runs against "
                             "older checkouts too (PYTHONPATH=<checkout>), to compare commits")
    args = parser.parse_args()
    datasets = [name for name in args.datasets.split(",") if name]
    threads = [int(value) for value in args.threads.split(",")]
    if not datasets or any(t < 1 for t in threads) or min(args.batches, args.batch_size, args.repeats) < 1:
        parser.error("need at least one dataset, thread counts >= 1, and positive --batches/--batch-size/--repeats")
    rows = []
    for dataset in datasets:
        prepared = prepare(dataset, tokenizer_config=TokenizerConfig.fast(), cache_dir=args.cache, progress=False)
        torch.manual_seed(0)
        models = {"JSA": build_model("grace", prepared).train()} if args.step_only else make_models(prepared)
        batches = make_batches(prepared, args.batches, args.batch_size)
        tokens = statistics.mean(int(b["cu_seqlens"][-1]) / (len(b["cu_seqlens"]) - 1) for b in batches)
        for count in threads:
            torch.set_num_threads(count)
            if args.step_only:
                step_ms = measure(models, batches, args.repeats, measured=("step",))[("step", "JSA")]
                print(f"{dataset}, {count} thread(s): JSA training step {step_ms:.1f} ms (median), "
                      f"{tokens:.1f} tokens/history, {prepared.tokenizer.tokens_per_interaction} tokens/interaction")
                continue
            medians = measure(models, batches, args.repeats)
            for what in MEASURED:
                jsa, dense, plain = (medians[(what, name)] for name in models)
                rows.append({"dataset": dataset, "tokens_per_history": round(tokens, 1), "threads": count,
                             "what": what, "dense_ms": round(dense, 1), "jsa_ms": round(jsa, 1),
                             "speedup": round(dense / jsa, 3), "dense_no_attn_dropout_ms": round(plain, 1),
                             "speedup_vs_no_attn_dropout": round(plain / jsa, 3)})
                print(rows[-1], flush=True)

    if args.step_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "grace_step.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_attention import stamp  # here: it imports the fused kernels, which --step-only's older checkouts lack

    info = stamp()
    lines = [f"Device: {info['device']}; torch {info['torch']}; commit {info['commit']}; `{info['command']}`.",
             f"GRACE `sparserec train` defaults, batch {args.batch_size}, {args.batches} fixed training batches x "
             f"{args.repeats} repeats; median ms; speed-up = dense ms / JSA ms (> 1: JSA faster). \"dense\" is "
             "the default dense model (dropout 0.1, attention probabilities included); \"no attn. dropout\" the "
             "same without dropout on attention probabilities.", "",
             "| dataset | tokens/history | threads | measured | JSA ms | dense ms | speed-up | dense, no attn. dropout ms "
             "| speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['tokens_per_history']} | {r['threads']} | {r['what']} | {r['jsa_ms']} | "
              f"{r['dense_ms']} | {r['speedup']:.2f}x | {r['dense_no_attn_dropout_ms']} | "
              f"{r['speedup_vs_no_attn_dropout']:.2f}x |" for r in rows]
    (args.out / "grace_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
