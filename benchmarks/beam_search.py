"""Trie-constrained beam search benchmark (SPEC §4): per-step latency, trie build, end to end.

Per step: random tries of 256 codes per level, the inputs of each of the `depth` steps of one
constrained decode driven by random log-probs (as STATIC times its decode loop: the model is
replaced by random log-probs, so only the constraint machinery is timed), and each
implementation's median time per step, averaged over the depth steps. Implementations: the
compiled kernel through the public op `sparserec.ops.trie_beam_step` (C++ on CPU, CUDA on GPU),
the same kernel as the raw `torch.ops.sparserec.trie_beam_step` (no Python validation), the
vectorised pure-PyTorch step (`sparserec.reference.trie`, STATIC-style, given each level's
fan-out), and on CPU a Python dict-of-dicts trie with a Python loop over beams. Every
implementation's results are checked against the kernel's before they are timed.

End to end, on one small encoder-decoder: our constrained generate (`beam_search`), our
unconstrained beam search (the same loop and KV-cache reorder, a plain top-k over the
vocabulary) and, when `transformers` is importable, HuggingFace `generate` with and without
`prefix_allowed_tokens_fn`. With transformers the model is a small T5 (the same model for every
row); GRACE rows (the project's model, dense encoder) are always measured.

    python benchmarks/beam_search.py --device cpu --threads 1          # CPU: ~9 min on 2 cores
    python benchmarks/beam_search.py --device cpu --quick
    python benchmarks/beam_search.py --device cuda --out benchmarks/results
"""
import argparse
import csv
import heapq
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sparserec.generate import Trie, beam_search
from sparserec.models import GRACE, GRACEConfig, recommend
from sparserec.ops import trie_beam_step
from sparserec.reference.trie import build_trie_csr
from sparserec.reference.trie import trie_beam_step as vectorised_trie_beam_step

CODES = 256  # codes per level of every trie
GRIDS = {
    "full": dict(items=(10_000, 100_000, 1_000_000, 10_000_000), depths=(4, 8), batches=(1, 64, 256),
                 beams=(10, 20, 50, 100)),
    "quick": dict(items=(10_000, 100_000), depths=(4,), batches=(1, 64), beams=(10, 50)),
}
# End to end: the SPEC §7 HuggingFace anchor (12k items, 4-token ids, 256 users x beam 20).
E2E = {"full": dict(items=12_000, depth=4, batch=256, beam=20),
       "quick": dict(items=12_000, depth=4, batch=16, beam=20)}
E2E_ROUNDS = 5
HISTORY_TOKENS = 64  # encoder input length of every user
SPECIAL_TOKENS = 4  # token ids below this are not item codes (pad, start/eos, ...)
DECODER_START = 1

# Limits of the Python dict trie baseline on CPU: a dict-of-dicts trie costs ~1 KB per item at
# depth 8 and ~10 s per million items to build; its step loops over every child of every beam.
PYTHON_MAX_ITEMS = 1_000_000
PYTHON_MAX_CANDIDATES = 2_000_000  # batch * beam * 256 children: ~1 s per step in Python
# CPU timing: at least MIN_RUNS runs after one warm-up, then more until CPU_BUDGET_S has passed.
MIN_RUNS, MAX_RUNS, CPU_BUDGET_S = 3, 200, 0.1


# ----------------------------------------------------------------------------------------- timing

def cpu_median_seconds(fn) -> float:
    """Median wall time of fn() after one warm-up call: at least MIN_RUNS runs, more until CPU_BUDGET_S."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or (len(times) < MAX_RUNS and time.perf_counter() - start < CPU_BUDGET_S):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def build_seconds(fn):
    """Median of up to 3 calls of a build, a single one when it takes over 2 s; (seconds, last result)."""
    times = []
    while len(times) < 3 and sum(times) < 2.0:
        begin = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), result


def interleaved_seconds(fns: dict, device: torch.device, rounds: int) -> dict:
    """(median, min) wall time of each fn over `rounds` rounds that call every fn once, after a
    warm-up round: load from other processes then hits every implementation alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for round_ in range(rounds + 1):
        for name, fn in fns.items():
            sync()
            begin = time.perf_counter()
            fn()
            sync()
            if round_ > 0:
                times[name].append(time.perf_counter() - begin)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def step_seconds(fn, device: torch.device):
    """Median time of one short call: triton's do_bench on CUDA (L2 flushed between runs), else wall time."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return cpu_median_seconds(fn)


# ------------------------------------------------------------------------------------------ tries

def random_paths(num_items: int, depth: int, seed: int = 0) -> torch.Tensor:
    """num_items distinct uniformly random paths (num_items, depth) of codes in [0, 256), random item order."""
    generator = torch.Generator().manual_seed(seed)
    bits = 8 * depth  # a path is one integer of `bits` bits; depth 8 uses all 64 (two's complement)
    low, high = (-2**63, 2**63 - 1) if bits == 64 else (0, 2**bits)
    if num_items > high - low:
        raise ValueError(f"{num_items} items do not fit in {CODES}^{depth} paths")
    keys = torch.empty(0, dtype=torch.long)
    while keys.numel() < num_items:  # oversample a little; collisions are rare at these sizes
        draw = torch.randint(low, high, (int(num_items * 1.01) + 16,), generator=generator)
        keys = torch.cat([keys, draw]).unique()
    keys = keys[torch.randperm(keys.numel(), generator=generator)[:num_items]]
    return (keys[:, None] >> (torch.arange(depth - 1, -1, -1) * 8)) & (CODES - 1)


def build_dict_trie(paths: torch.Tensor) -> dict:
    """The Python baseline's trie: nested dicts token -> child, the last level token -> item id."""
    root = {}
    for item, path in enumerate(paths.tolist()):
        node = root
        for token in path[:-1]:
            node = node.setdefault(token, {})
        node[path[-1]] = item
    return root


def python_dict_step(log_probs: torch.Tensor, beam_scores: list, beam_nodes: list, beam_size: int) -> list:
    """One beam step over a dict trie, a Python loop over beams and children.

    beam_scores / beam_nodes: per batch row, each beam's score and dict node (None: dead beam).
    Returns per batch row the best beam_size (score, -parent, -token, child) tuples, best first
    (ties to the lower parent, then the lower token, as the kernels).
    """
    results = []
    for row_log_probs, row_scores, row_nodes in zip(log_probs, beam_scores, beam_nodes):
        candidates = []
        for parent, (base, node) in enumerate(zip(row_scores, row_nodes)):
            if node is None:
                continue
            token_log_probs = row_log_probs[parent].tolist()
            for token, child in node.items():
                candidates.append((base + token_log_probs[token], -parent, -token, child))
        results.append(heapq.nlargest(beam_size, candidates))
    return results


@dataclass
class StepInputs:
    level: int
    log_probs: torch.Tensor  # (B, K, V)
    beam_scores: torch.Tensor  # (B, K)
    nodes: torch.Tensor  # (B, K)
    prefixes: torch.Tensor  # (B, K, level) each beam's tokens so far (for the dict trie)


def decode_inputs(trie: Trie, batch: int, beam: int, seed: int = 0, vocab: int = CODES) -> list:
    """The inputs of each step of one constrained decode whose log-probs (over `vocab` tokens) are random."""
    device = trie.device
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0
    nodes = torch.zeros(batch, beam, dtype=torch.long, device=device)
    prefixes = torch.zeros(batch, beam, 0, dtype=torch.long, device=device)
    steps = []
    for level in range(trie.depth):
        log_probs = torch.randn(batch, beam, vocab, generator=generator, device=device).log_softmax(-1)
        steps.append(StepInputs(level, log_probs, scores, nodes, prefixes))
        scores, parents, tokens, nodes = trie_beam_step(log_probs, scores, nodes, trie, beam)
        kept = parents.clamp(min=0)[..., None].expand(-1, -1, level)
        prefixes = torch.cat([prefixes.gather(1, kept), tokens[..., None]], dim=2)
    return steps


def dict_beam_state(root: dict, step: StepInputs):
    """The Python baseline's beam state (scores, dict nodes) equal to a step's tensor state."""
    scores = step.beam_scores.tolist()
    nodes = []
    for row_scores, row_prefixes in zip(scores, step.prefixes.tolist()):
        row_nodes = []
        for score, prefix in zip(row_scores, row_prefixes):
            node = None
            if score > float("-inf"):
                node = root
                for token in prefix:
                    node = node[token]
            row_nodes.append(node)
        nodes.append(row_nodes)
    return scores, nodes


def check_python_step(result: list, kernel_scores: torch.Tensor, kernel_parents: torch.Tensor,
                      kernel_tokens: torch.Tensor):
    """The Python baseline picked the kernel's candidates: equal scores up to float32 rounding (it
    adds in float64), equal (parent, token) wherever no other candidate's score is that close."""
    for row, best in enumerate(result):
        scores = [score for score in kernel_scores[row].tolist() if score > float("-inf")]
        assert len(best) == len(scores), f"row {row}: {len(best)} candidates, the kernel {len(scores)}"
        picks = list(zip(kernel_parents[row].tolist(), kernel_tokens[row].tolist()))
        for slot, ((score, minus_parent, minus_token, _), kernel_score) in enumerate(zip(best, scores)):
            assert abs(score - kernel_score) < 1e-4, f"row {row}: score {score} vs the kernel's {kernel_score}"
            near = [other for other in scores[max(slot - 1, 0):slot + 2] if abs(other - kernel_score) < 1e-4]
            if len(near) == 1:
                assert (-minus_parent, -minus_token) == picks[slot], f"row {row}, slot {slot}: pick differs"


# ---------------------------------------------------------------------------------------- per step

def bench_steps(trie: Trie, dict_trie, batch: int, beam: int, device: torch.device, notes: list) -> dict:
    """Mean over the decode's steps of each implementation's median time per step (seconds)."""
    steps = decode_inputs(trie, batch, beam)
    run_python = dict_trie is not None and batch * beam * CODES <= PYTHON_MAX_CANDIDATES
    if device.type == "cpu" and dict_trie is not None and not run_python:
        notes.append(f"Python dict trie step skipped at batch {batch}, beam {beam}: up to {batch * beam * CODES:,} "
                     f"candidate children per step (> {PYTHON_MAX_CANDIDATES:,}, a second or more per step)")
    totals = {}
    for step in steps:
        args = (step.log_probs, step.beam_scores, step.nodes)
        fanout = trie.max_fanout[step.level]
        implementations = {
            "kernel": lambda: trie_beam_step(*args, trie, beam),
            "raw_op": lambda: torch.ops.sparserec.trie_beam_step(*args, trie.child_ptr, trie.node_token, beam, False),
            "vectorised": lambda: vectorised_trie_beam_step(*args, trie.child_ptr, trie.node_token, beam,
                                                            max_fanout=fanout),
        }
        expected = implementations["kernel"]()
        for name in ("raw_op", "vectorised"):
            for got, want in zip(implementations[name](), expected):
                assert torch.equal(got, want), f"{name} disagrees with the kernel at level {step.level}"
        if run_python:
            scores, nodes = dict_beam_state(dict_trie, step)
            check_python_step(python_dict_step(step.log_probs, scores, nodes, beam), expected[0], expected[1],
                              expected[2])
            implementations["python_dict"] = lambda: python_dict_step(step.log_probs, scores, nodes, beam)
        for name, fn in implementations.items():
            totals[name] = totals.get(name, 0.0) + step_seconds(fn, device)
    return {name: total / trie.depth for name, total in totals.items()}


# ----------------------------------------------------------------------------------- end to end

def unconstrained_beam_search(step_fn, batch_size: int, beam_size: int, steps: int):
    """Plain beam search over the whole vocabulary, the loop of `beam_search` without the trie.

    Same step_fn contract (the model reorders its KV cache by parent_rows). Returns the token
    sequences (B, K, steps) and their summed log-probs (B, K), best first.
    """
    scores = torch.full((batch_size, beam_size), float("-inf"))
    scores[:, 0] = 0.0
    first_row = torch.arange(batch_size).unsqueeze(1) * beam_size
    sequences = torch.zeros(batch_size, beam_size, 0, dtype=torch.long)
    tokens = parent_rows = None
    for _ in range(steps):
        log_probs = step_fn(tokens, parent_rows).reshape(batch_size, beam_size, -1).float()
        if tokens is None:  # state tensors follow the model's device
            scores, first_row, sequences = (t.to(log_probs.device) for t in (scores, first_row, sequences))
        vocab = log_probs.shape[-1]
        scores, flat = (scores.unsqueeze(-1) + log_probs).reshape(batch_size, -1).topk(beam_size, dim=1)
        parents, chosen = flat // vocab, flat % vocab
        kept = parents.unsqueeze(-1).expand(-1, -1, sequences.shape[2])
        sequences = torch.cat([sequences.gather(1, kept), chosen.unsqueeze(-1)], dim=2)
        parent_rows = (first_row + parents).reshape(-1)
        tokens = chosen.reshape(-1, 1)
    return sequences, scores


def t5_step_fn(model, input_ids, attention_mask, beam_size: int):
    """A `beam_search` step_fn for a HuggingFace encoder-decoder: encoder run once, KV cache reordered."""
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    # HuggingFace's beam search also expands the encoder output to one row per beam.
    encoder_outputs = (encoded.last_hidden_state.repeat_interleave(beam_size, dim=0),)
    attention_mask = attention_mask.repeat_interleave(beam_size, dim=0)
    rows = attention_mask.shape[0]
    state = {"cache": None}

    def step_fn(tokens, parent_rows):
        if tokens is None:
            tokens = torch.full((rows, 1), model.config.decoder_start_token_id, device=input_ids.device)
        else:
            state["cache"].reorder_cache(parent_rows)
        out = model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=tokens,
                    past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[:, -1].float().log_softmax(-1)

    return step_fn


def bench_end_to_end(grid_name: str, device: torch.device, notes: list) -> list:
    """Rows (model, impl, seconds, runs) of whole generate calls on one random item catalogue."""
    setup = E2E[grid_name]
    depth, batch, beam = setup["depth"], setup["batch"], setup["beam"]
    vocab = SPECIAL_TOKENS + CODES * depth
    # Item ids as in TIGER/GRACE: level l's code c is token SPECIAL_TOKENS + 256 l + c.
    paths = random_paths(setup["items"], depth, seed=1) + SPECIAL_TOKENS + CODES * torch.arange(depth)
    trie = Trie(paths, device=device)
    generator = torch.Generator().manual_seed(2)
    history = torch.randint(SPECIAL_TOKENS, vocab, (batch, HISTORY_TOKENS), generator=generator).to(device)
    rows = []

    def time_all(model_name, fns):
        for impl, (seconds, fastest) in interleaved_seconds(fns, device, E2E_ROUNDS).items():
            rows.append(dict(model=model_name, impl=impl, seconds=seconds, fastest=fastest, **setup))

    torch.manual_seed(0)
    grace = GRACE(GRACEConfig(vocab_size=vocab, attention="dense", dropout=0.0,
                              decoder_start_token_id=DECODER_START)).to(device).eval()
    tokens = history.reshape(-1)
    cu_seqlens = torch.arange(0, batch * HISTORY_TOKENS + 1, HISTORY_TOKENS, device=device)
    with torch.inference_mode():
        time_all("GRACE", {
            "ours constrained": lambda: recommend(grace, trie, tokens, cu_seqlens, None, beam),
            "ours unconstrained": lambda: unconstrained_beam_search(
                grace.make_step_fn(grace.encode(tokens, cu_seqlens), beam), batch, beam, depth)})

    try:
        import transformers
    except ImportError as error:
        notes.append(f"HuggingFace generate skipped: transformers is not importable ({error})")
        return rows
    torch.manual_seed(0)
    t5_config = transformers.T5Config(vocab_size=vocab, d_model=128, d_kv=32, d_ff=512, num_layers=2,
                                      num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
                                      eos_token_id=DECODER_START, decoder_start_token_id=0)
    t5 = transformers.T5ForConditionalGeneration(t5_config).to(device).eval()
    mask = torch.ones_like(history)
    allowed = {}  # prefix tuple -> allowed next tokens: the usual prefix_allowed_tokens_fn index
    for path in paths.tolist():
        for level in range(depth):
            allowed.setdefault(tuple(path[:level]), []).append(path[level])
    allowed = {prefix: sorted(set(tokens_)) for prefix, tokens_ in allowed.items()}

    def prefix_allowed_tokens_fn(batch_id, sent):
        return allowed[tuple(sent[1:].tolist())]  # sent[0] is the decoder start token

    # The constraint alone, no model: over the depth steps of one decode (random log-probs),
    # HuggingFace's logits processor (the whole difference between its constrained and
    # unconstrained generate) against our trie_beam_step.
    steps = decode_inputs(trie, batch, beam, vocab=vocab)
    processor = transformers.generation.logits_process.PrefixConstrainedLogitsProcessor(
        prefix_allowed_tokens_fn, num_beams=beam)
    start = torch.full((batch * beam, 1), t5_config.decoder_start_token_id, device=device)
    decoder_ids = [torch.cat([start, step.prefixes.reshape(batch * beam, -1)], dim=1) for step in steps]
    time_all("none (constraint only)", {
        "ours trie_beam_step": lambda: [trie_beam_step(step.log_probs, step.beam_scores, step.nodes, trie, beam)
                                        for step in steps],
        "HF PrefixConstrainedLogitsProcessor": lambda: [processor(ids, step.log_probs.reshape(batch * beam, -1))
                                                        for ids, step in zip(decoder_ids, steps)]})

    generate_args = dict(attention_mask=mask, num_beams=beam, num_return_sequences=beam, do_sample=False,
                         max_new_tokens=depth, min_new_tokens=depth)
    with torch.inference_mode():
        time_all("T5 (HF)", {
            "ours constrained": lambda: beam_search(t5_step_fn(t5, history, mask, beam), trie, batch, beam),
            "ours unconstrained": lambda: unconstrained_beam_search(t5_step_fn(t5, history, mask, beam), batch,
                                                                    beam, depth),
            "HF constrained": lambda: t5.generate(history, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                                                  **generate_args),
            "HF unconstrained": lambda: t5.generate(history, **generate_args)})
        # Same model, same exact search: the best item of each user should agree.
        ours, _ = beam_search(t5_step_fn(t5, history, mask, beam), trie, batch, beam)
        theirs = t5.generate(history, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, **generate_args)
    item_of_path = {tuple(path): item for item, path in enumerate(paths.tolist())}
    best_hf = [item_of_path[tuple(seq)] for seq in theirs[::beam, 1:].tolist()]
    agree = sum(a == b for a, b in zip(ours[:, 0].tolist(), best_hf))
    notes.append(f"T5: our constrained top-1 item equals HuggingFace's constrained top-1 for {agree}/{batch} users "
                 f"(transformers {transformers.__version__})")
    return rows


# ---------------------------------------------------------------------------------------- report

def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, torch threads: {torch.get_num_threads()}"


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes" if dirty.strip() else "")


def fmt_us(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e6:,.1f}"


def fmt_ratio(numerator, denominator, digits: int = 1) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:,.{digits}f}×"


def constraint_ms(by_impl: dict, who: str) -> float:
    return (by_impl[f"{who} constrained"] - by_impl[f"{who} unconstrained"]) * 1e3


def write_report(out_dir, device, step_rows, build_rows, e2e_rows, notes):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"beam_search_{device.type}")
    kernel_name = "CUDA kernel" if device.type == "cuda" else "C++ kernel"
    header = [f"# Trie-constrained beam search benchmark ({device.type})", "",
              f"- device: {device_description(device)}",
              f"- torch {torch.__version__}, Python {platform.python_version()}, git {git_commit()}",
              f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
              f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    lines = header + [
        "## Per step", "",
        "Random tries, 256 codes per level; log-probs random (only the constraint is timed). Each "
        "cell: the median time of one step, averaged over the depth steps of one decode (levels with "
        "fan-out up to 256 near the root, ~1 near the leaves). "
        f"`{kernel_name}` = `sparserec.ops.trie_beam_step` (validation included); `raw op` = "
        "`torch.ops.sparserec.trie_beam_step`; `PyTorch vectorised` = `sparserec.reference.trie` "
        "(STATIC-style, given each level's fan-out)"
        + ("; `Python dict` = dict-of-dicts trie, Python loop over beams. " if device.type == "cpu" else ". ")
        + "Ratios are from the same run.", ""]
    columns = ["items", "depth", "batch", "beam", f"{kernel_name} µs", "raw op µs", "PyTorch vectorised µs"]
    if device.type == "cpu":
        columns += ["Python dict µs", "vectorised / kernel", "Python dict / kernel"]
    else:
        columns += ["vectorised / kernel"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in step_rows:
        t = row["times"]
        cells = [f"{row['items']:,}", row["depth"], row["batch"], row["beam"], fmt_us(t.get("kernel")),
                 fmt_us(t.get("raw_op")), fmt_us(t.get("vectorised"))]
        if device.type == "cpu":
            cells += [fmt_us(t.get("python_dict")), fmt_ratio(t.get("vectorised"), t.get("kernel")),
                      fmt_ratio(t.get("python_dict"), t.get("kernel"))]
        else:
            cells += [fmt_ratio(t.get("vectorised"), t.get("kernel"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    ratio_names = [("vectorised", "PyTorch vectorised")] + ([("python_dict", "Python dict")]
                                                              if device.type == "cpu" else [])
    for impl, label in ratio_names:
        ratios = sorted(r["times"][impl] / r["times"]["kernel"] for r in step_rows if impl in r["times"])
        if ratios:
            lines += ["", f"{label} / {kernel_name} over the {len(ratios)} configurations measured: min "
                          f"{ratios[0]:,.1f}×, median {statistics.median(ratios):,.1f}×, max {ratios[-1]:,.1f}×."]

    lines += ["", "## Trie build", "",
              f"`Trie(paths, device={device.type!r})` with the C++ builder (includes the copy to the device); the "
              "PyTorch builder `build_trie_csr` (CPU); the Python dict-of-dicts trie. Seconds; the builders: median "
              "of up to 3 runs (one for builds over 2 s); the dict trie: one run.", "",
              "| items | depth | nodes | C++ builder s | PyTorch builder s | Python dict trie s |", "|---|---|---|---|---|---|"]
    for row in build_rows:
        cells = [f"{row['items']:,}", row["depth"], f"{row['nodes']:,}"] + [
            "—" if row.get(key) is None else f"{row[key]:.3f}" for key in ("cpp", "pytorch", "python_dict")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    lines += ["", "## End to end", ""]
    if e2e_rows:
        setup = e2e_rows[0]
        lines += [f"{setup['items']:,} random items, {setup['depth']}-token ids (vocabulary "
                  f"{SPECIAL_TOKENS + CODES * setup['depth']}), batch {setup['batch']}, beam {setup['beam']}, "
                  f"{HISTORY_TOKENS}-token histories; models d_model 128, 2+2 layers, 4 heads, float32, random "
                  f"weights. Whole generate call (encoder included), median of {E2E_ROUNDS} rounds that run every "
                  "implementation once (interleaved, so load from other processes hits all alike).", "",
                  "| model | generate | median ms | min ms | median / ours unconstrained |", "|---|---|---|---|---|"]
        for row in e2e_rows:
            reference = next((r["seconds"] for r in e2e_rows
                              if r["model"] == row["model"] and r["impl"] == "ours unconstrained"), None)
            lines.append(f"| {row['model']} | {row['impl']} | {row['seconds'] * 1e3:,.1f} | "
                         f"{row['fastest'] * 1e3:,.1f} | {fmt_ratio(row['seconds'], reference, digits=2)} |")
        constraint_only = {r["impl"]: r["seconds"] for r in e2e_rows if r["model"] == "none (constraint only)"}
        if constraint_only:
            lines += ["", "Constraint only (no model, one decode's depth steps): HuggingFace's processor / our "
                          f"trie_beam_step = {fmt_ratio(constraint_only['HF PrefixConstrainedLogitsProcessor'], constraint_only['ours trie_beam_step'])}"]
        for model in sorted({r["model"] for r in e2e_rows} - {"none (constraint only)"}):
            by_impl = {r["impl"]: r["seconds"] for r in e2e_rows if r["model"] == model}
            lines += ["", f"{model}: the constraint costs {constraint_ms(by_impl, 'ours'):,.1f} ms in ours "
                          "(constrained − unconstrained)"]
            if "HF constrained" in by_impl:
                lines[-1] += (f", {constraint_ms(by_impl, 'HF'):,.1f} ms in HuggingFace's; HF constrained / ours "
                              f"constrained = {by_impl['HF constrained'] / by_impl['ours constrained']:.1f}×")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in dict.fromkeys(notes)]  # each note once
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n\n![per-step latency](" + os.path.basename(base) + ".png)\n")

    with open(base + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["section", "impl", "model", "items", "depth", "batch", "beam", "seconds", "device", "torch",
                         "git"])
        meta = [device_description(device), torch.__version__, git_commit()]
        for row in step_rows:
            for impl, seconds in row["times"].items():
                writer.writerow(["step", impl, "", row["items"], row["depth"], row["batch"], row["beam"],
                                 f"{seconds:.9f}"] + meta)
        for row in build_rows:
            for impl in ("cpp", "pytorch", "python_dict"):
                if row.get(impl) is not None:
                    writer.writerow(["build", impl, "", row["items"], row["depth"], "", "", f"{row[impl]:.6f}"] + meta)
        for row in e2e_rows:
            writer.writerow(["end_to_end", row["impl"], row["model"], row["items"], row["depth"], row["batch"],
                             row["beam"], f"{row['seconds']:.6f}"] + meta)
    write_plot(base + ".png", device, step_rows, kernel_name)
    return base


def write_plot(path, device, step_rows, kernel_name):
    """Per-step latency against the number of items, one panel per depth, at beam 50 and batch 256 on
    CUDA, batch 64 on CPU (where the Python dict trie runs); else the largest batch and beam measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not step_rows:
        return
    batches = {r["batch"] for r in step_rows}
    preferred_batch = 256 if device.type == "cuda" else 64
    batch = preferred_batch if preferred_batch in batches else max(batches)
    beams = {r["beam"] for r in step_rows if r["batch"] == batch}
    beam = 50 if 50 in beams else max(beams)
    depths = sorted({r["depth"] for r in step_rows})
    labels = {"kernel": kernel_name, "vectorised": "PyTorch vectorised", "python_dict": "Python dict trie"}
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4.6), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        rows = sorted((r for r in step_rows if r["depth"] == depth and r["batch"] == batch and r["beam"] == beam),
                      key=lambda r: r["items"])
        for impl, label in labels.items():
            points = [(r["items"], r["times"][impl] * 1e6) for r in rows if impl in r["times"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="items", ylabel="µs per step",
               title=f"depth {depth}, batch {batch}, beam {beam} ({device.type})")
        ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names))  # below the panels, clear of the lines
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small grid (minutes on a laptop CPU)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--skip-e2e", action="store_true", help="per-step and build sections only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 makes CPU "
                        "timings robust to other load and compares the C++ kernel with Python thread for thread")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    grid_name = "quick" if args.quick else "full"
    grid = GRIDS[grid_name]
    notes = []
    step_rows, build_rows = [], []

    configs = [(items, depth) for depth in grid["depths"] for items in grid["items"]]
    progress = tqdm(total=len(configs) * len(grid["batches"]) * len(grid["beams"]), desc="per step", unit="cfg")
    for items, depth in configs:
        progress.set_postfix(items=f"{items:,}", depth=depth, stage="build")
        paths = random_paths(items, depth)
        build = dict(items=items, depth=depth)
        build["cpp"], trie = build_seconds(lambda: Trie(paths, device=device))
        build["pytorch"], _ = build_seconds(lambda: build_trie_csr(paths))
        build["nodes"] = trie.num_nodes
        dict_trie = None
        if device.type == "cpu":
            if items <= PYTHON_MAX_ITEMS:
                begin = time.perf_counter()
                dict_trie = build_dict_trie(paths)
                build["python_dict"] = time.perf_counter() - begin
            else:
                notes.append(f"Python dict trie not built at {items:,} items, depth {depth}: over "
                             f"{PYTHON_MAX_ITEMS:,} items it needs many GB and minutes to build")
        build_rows.append(build)
        del paths
        for batch in grid["batches"]:
            for beam in grid["beams"]:
                progress.set_postfix(items=f"{items:,}", depth=depth, batch=batch, beam=beam)
                times = bench_steps(trie, dict_trie, batch, beam, device, notes)
                step_rows.append(dict(items=items, depth=depth, batch=batch, beam=beam, times=times))
                progress.update()
        del trie, dict_trie
    progress.close()

    e2e_rows = []
    if args.skip_e2e:
        notes.append("end-to-end section skipped (--skip-e2e)")
    else:
        print("end to end ...", file=sys.stderr)
        e2e_rows = bench_end_to_end(grid_name, device, notes)

    notes.append(f"1-minute load average of this machine: {load_at_start:.2f} at the start, "
                 f"{os.getloadavg()[0]:.2f} at the end (above the thread count: other processes competed for the CPUs)")
    base = write_report(args.out, device, step_rows, build_rows, e2e_rows, notes)
    with open(base + ".md") as f:
        print(f.read())
    print(f"wrote {base}.md, {base}.csv, {base}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
