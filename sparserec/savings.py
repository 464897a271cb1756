"""Measured savings of a GRACE encoder with JSA against the same model with dense attention.

For batches of packed histories (the dataset's own, and long synthetic ones made by chaining real
users' histories so that journeys and anchors stay realistic) this reports:
- attention FLOPs per encoder pass (all layers): dense, and JSA's useful FLOPs from
  `sparserec.flops.jsa_flops` (slc counted at its upper bound, so savings are never overstated);
- encoder-forward latency of both models (median of `repeats` timed runs after one warm-up);
- encoder forward+backward time (what a training step spends in the encoder; the decoder is the
  same in both models);
- per-user recommend latency (encode + trie-constrained beam search, batch of one).
Both models share every setting but the encoder attention; latency does not depend on the
weights, so the dense model is freshly initialised.
"""
import dataclasses
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .flops import jsa_flops
from .generate import Trie
from .models import GRACE, recommend
from .tokenize import PackedHistories


@dataclasses.dataclass
class SavingsRow:
    label: str
    sequences: int
    tokens_per_sequence: float
    dense_gflops: float
    jsa_gflops: float
    dense_ms: float
    jsa_ms: float
    dense_train_ms: float
    jsa_train_ms: float
    dense_recommend_ms: float | None = None
    jsa_recommend_ms: float | None = None

    @property
    def flop_ratio(self) -> float:
        return self.dense_gflops / self.jsa_gflops

    @property
    def latency_ratio(self) -> float:
        return self.dense_ms / self.jsa_ms

    @property
    def train_ratio(self) -> float:
        return self.dense_train_ms / self.jsa_train_ms


def chained_histories(data, interactions: int, count: int, seed: int = 0):
    """`count` synthetic (items, behaviors) histories of exactly `interactions` events, each the
    concatenation of randomly drawn real users' histories (cut to length)."""
    rng = np.random.default_rng(seed)
    histories = []
    for _ in range(count):
        items, behaviors = [], []
        while sum(map(len, items)) < interactions:
            user_items, user_behaviors = data.history(int(rng.integers(data.num_users)))
            items.append(user_items)
            behaviors.append(user_behaviors)
        histories.append((np.concatenate(items)[:interactions], np.concatenate(behaviors)[:interactions]))
    return histories


def with_max_positions(model: GRACE, positions: int) -> GRACE:
    """The same model with a larger learned position table (new rows randomly initialised), for
    timing and FLOP measurement at lengths beyond those it was trained on."""
    if positions <= model.config.max_positions:
        return model
    longer = GRACE(dataclasses.replace(model.config, max_positions=positions)).to(next(model.parameters()).device)
    state = model.state_dict()
    table = longer.encoder_positions.weight.detach().clone()
    table[: model.config.max_positions] = state["encoder_positions.weight"]
    state["encoder_positions.weight"] = table
    longer.load_state_dict(state)
    return longer.eval()


def attention_flops(model: GRACE, packed: PackedHistories, dense: bool) -> int:
    """Attention-core FLOPs of one encoder pass over `packed`, summed over the encoder layers."""
    config = model.config
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
    counts = jsa_flops(lengths, config.jsa, config.num_heads, config.d_model // config.num_heads,
                       config.num_kv_heads, anchor_mask=packed.anchor_mask)
    return config.encoder_layers * (counts.dense if dense else counts.useful)


def median_ms(function, repeats: int) -> float:
    function()  # warm-up: first-call allocations and lazy imports are not what we measure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def encoder_forward_backward(model: GRACE, packed: PackedHistories):
    """One encoder forward and backward (gradients of the sum of the encoder states)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model.encode(*packed).states.sum().backward()


@torch.no_grad()
def measure(jsa_model: GRACE, batches, trie: Trie | None = None, beam_size: int = 20, repeats: int = 5,
            progress: bool = True):
    """SavingsRow per (label, PackedHistories) in `batches`; with a trie, also the per-user
    recommend latency on the first history of each batch. progress: a bar over the batches."""
    if jsa_model.config.attention != "jsa":
        raise ValueError("measure() compares a JSA model against dense; got a dense model")
    device = next(jsa_model.parameters()).device
    dense_model = GRACE(dataclasses.replace(jsa_model.config, attention="dense", disabled_branches=())).to(device)
    models = {"jsa": jsa_model.eval(), "dense": dense_model.eval()}
    rows = []
    for label, packed in tqdm(batches, desc="bench", disable=not progress):
        packed = PackedHistories(*(tensor.to(device) for tensor in packed))
        sequences = len(packed.cu_seqlens) - 1
        latency, train_latency, recommend_latency = {}, {}, {}
        for name, model in models.items():
            latency[name] = median_ms(lambda: model.encode(*packed), repeats)
            train_latency[name] = median_ms(lambda: encoder_forward_backward(model, packed), repeats)
            if trie is not None:
                first = int(packed.cu_seqlens[1])
                single = (packed.tokens[:first], packed.cu_seqlens[:2], packed.anchor_mask[:first])
                recommend_latency[name] = median_ms(lambda: recommend(model, trie, *single, beam_size), repeats)
        rows.append(SavingsRow(
            label, sequences, packed.tokens.shape[0] / sequences,
            attention_flops(jsa_model, packed, dense=True) / 1e9, attention_flops(jsa_model, packed, dense=False) / 1e9,
            latency["dense"], latency["jsa"], train_latency["dense"], train_latency["jsa"],
            recommend_latency.get("dense"), recommend_latency.get("jsa")))
    return rows


def format_table(rows, device: str) -> str:
    """The rows as a markdown table."""
    lines = [
        f"Encoder attention FLOPs per pass and latency on {device} (median ms; ratios are dense / JSA)",
        "",
        "| histories | seqs | tokens/seq | dense GFLOP | JSA GFLOP | FLOP saving | dense encode ms | JSA encode ms "
        "| encode speedup | dense enc. fwd+bwd ms | JSA enc. fwd+bwd ms | fwd+bwd speedup "
        "| dense recommend ms/user | JSA recommend ms/user |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        recommend_cells = ("-", "-") if row.jsa_recommend_ms is None else (
            f"{row.dense_recommend_ms:.1f}", f"{row.jsa_recommend_ms:.1f}")
        lines.append(
            f"| {row.label} | {row.sequences} | {row.tokens_per_sequence:.0f} | {row.dense_gflops:.3f} | "
            f"{row.jsa_gflops:.3f} | {row.flop_ratio:.2f}x | {row.dense_ms:.1f} | {row.jsa_ms:.1f} | "
            f"{row.latency_ratio:.2f}x | {row.dense_train_ms:.1f} | {row.jsa_train_ms:.1f} | {row.train_ratio:.2f}x | "
            f"{recommend_cells[0]} | {recommend_cells[1]} |")
    return "\n".join(lines)
