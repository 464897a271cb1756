"""Sequence-length scaling of JSA: the Triton kernels against dense SDPA, FlexAttention and the reference.

A fixed number of tokens per call (default 65,536) is split into equal sequences of 128 ... 32,768
tokens; shapes H x D (GQA: Hq/Hkv x D); causal and bidirectional; forward and forward+backward.
GRACE-like JSA: block 32, stride 16, top-3 of 32-token selection blocks (query tiles of 64),
window 64, anchors ~1 in 16 tokens (random, seeded). Columns, per implementation:

  JSA-Triton   sparserec.ops.triton_backend: compress(K), compress(V), attention (the kernels and
               their glue; the public sparserec.ops entries add input checks that read the device)
  SDPA         torch scaled_dot_product_attention, dense over each sequence (flash on CUDA; GQA
               K/V are expanded to the query heads outside the timed region)
  Flex         the same JSA from FlexAttention calls with the gated sum in PyTorch
               (benchmarks/flex_jsa.py: torch.compile'd flex_attention, the Triton selection
               kernel, batch masks built untimed); CUDA only: compiled flex on CPU is
               inference-only and returns no logsumexp
  Reference    sparserec.reference (pure PyTorch), where it fits (--reference-max-length)

FLOPs (SPEC §1). Useful: JSA: `jsa_flops(...).useful` with the selection actually made; SDPA: the
dense count. Executed: JSA-Triton: the tile products its kernels run (`triton_executed_flops`,
padding included, selection re-scoring included); Flex: the whole sparse blocks its calls visit
(4·D per pair forward, 14·D backward: flex recomputes scores and dP for dQ and dK/dV) plus the
compression and the selection; SDPA: the dense count, x 3.5 forward+backward (flash's backward
recomputes the scores; diagonal tile padding not counted); Reference: its masked dense branches,
x 3 forward+backward. Useful forward+backward: x 3 (backward = 2 x forward).
TFLOP/s = executed FLOPs / time.

Timing: CUDA: triton.testing.do_bench median after an untimed warm-up call (compilation and
autotuning); CPU: perf_counter median after a warm-up call. Triton is never timed under
TRITON_INTERPRET=1 (the interpreter checks correctness, it says nothing about speed).

  python benchmarks/attention_scaling.py                       # CUDA, bf16, the full grid
  python benchmarks/attention_scaling.py --shapes 4x32 --merge # one part of the grid, merged
  python benchmarks/attention_scaling.py --device cpu --quick  # CPU: fp32, fewer tokens and lengths

Outputs: attention_scaling_<device>.md, .csv and .png under --out, stamped with the device,
torch and triton versions and the git commit.
"""
import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flex_jsa import FlexBatch, flex_jsa_attention
from sparserec import JSAConfig
from sparserec import reference
from sparserec.flops import jsa_flops, triton_executed_flops
from sparserec.reference.jsa import num_compressed_blocks

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("JSA-Triton", "SDPA", "Flex", "Reference")
PASSES = ("fwd", "fwd+bwd")
ANCHOR_RATE = 1 / 16
# Backward = 2 x forward matmul FLOPs (dQ, dK, dV from dS and P): the usual fwd+bwd = 3 x fwd.
USEFUL_FWD_BWD = 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLEX_CPU = ("compiled FlexAttention on CPU is inference-only and returns no logsumexp, which the selection "
            "needs (eager flex is an unfused dense fallback, not worth timing)")


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    dim: int

    @classmethod
    def parse(cls, text: str):
        match = re.fullmatch(r"(\d+)(?:/(\d+))?x(\d+)", text.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"shape {text!r} is not HxD or Hq/HkvxD")
        heads, kv_heads, dim = match.groups()
        return cls(int(heads), int(kv_heads or heads), int(dim))

    def __str__(self):
        return f"{self.heads}x{self.dim}" if self.heads == self.kv_heads else f"{self.heads}/{self.kv_heads}x{self.dim}"


def grace_config(causal: bool) -> JSAConfig:
    return JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64, causal=causal)


@dataclass
class Case:
    """One call's inputs: `tokens` packed tokens in sequences of `length`, leaves for autograd."""

    shape: Shape
    length: int
    config: JSAConfig
    cu_seqlens: torch.Tensor
    anchor_mask: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    weight_k: torch.Tensor
    weight_v: torch.Tensor
    pe_k: torch.Tensor
    pe_v: torch.Tensor
    gates: torch.Tensor

    @property
    def jsa_leaves(self):
        return [self.q, self.k, self.v, self.weight_k, self.weight_v, self.pe_k, self.pe_v, self.gates]


def make_case(shape: Shape, tokens: int, length: int, causal: bool, dtype, device, seed: int) -> Case:
    config = grace_config(causal)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    num_seqs = tokens // length
    total = num_seqs * length
    cu_seqlens = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * length
    block = config.block
    return Case(
        shape=shape, length=length, config=config, cu_seqlens=cu_seqlens,
        anchor_mask=torch.rand(total, generator=gen, device=device) < ANCHOR_RATE,
        q=randn(total, shape.heads, shape.dim), k=randn(total, shape.kv_heads, shape.dim),
        v=randn(total, shape.kv_heads, shape.dim),
        weight_k=randn(shape.kv_heads, block, shape.dim, shape.dim, scale=(block * shape.dim) ** -0.5),
        weight_v=randn(shape.kv_heads, block, shape.dim, shape.dim, scale=(block * shape.dim) ** -0.5),
        pe_k=randn(shape.kv_heads, block, shape.dim, scale=0.1),
        pe_v=randn(shape.kv_heads, block, shape.dim, scale=0.1),
        gates=torch.sigmoid(torch.randn(total, shape.heads, 4, generator=gen, device=device))
        .to(dtype).requires_grad_(),
    )


# ---------------------------------------------------------------------------------------------
# The implementations: each returns (forward function, its leaves)
# ---------------------------------------------------------------------------------------------


def jsa_call(case: Case, compress, attention, **kwargs):
    """compress(K), compress(V), then attention: one JSA call through a backend's entries."""
    c = case.config
    k_cmp, cu_cmp = compress(case.k, case.weight_k, case.pe_k, case.cu_seqlens, c.block, c.stride)
    v_cmp, _ = compress(case.v, case.weight_v, case.pe_v, case.cu_seqlens, c.block, c.stride)
    return attention(case.q, case.k, case.v, k_cmp, v_cmp, case.gates, case.anchor_mask, case.cu_seqlens, cu_cmp,
                     c, **kwargs)


def triton_forward(case: Case):
    from sparserec.ops import triton_backend

    return lambda: jsa_call(case, triton_backend.compress, triton_backend.attention), case.jsa_leaves


def sdpa_forward(case: Case):
    shape, num_seqs = case.shape, case.cu_seqlens.numel() - 1

    def per_sequence(x):  # (T, H, D) -> (B, H, L, D), GQA heads expanded to the query heads
        x = x.detach().repeat_interleave(shape.heads // x.shape[1], dim=1)
        return x.view(num_seqs, case.length, shape.heads, shape.dim).transpose(1, 2).contiguous().requires_grad_()

    q, k, v = per_sequence(case.q), per_sequence(case.k), per_sequence(case.v)
    flash_only = case.q.is_cuda and case.q.dtype in (torch.float16, torch.bfloat16)

    def forward():
        if flash_only:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.config.causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.config.causal)
    return forward, [q, k, v]


def flex_forward(case: Case, attend, batch: FlexBatch):
    from sparserec.triton_kernels.jsa_cmp import cmp_select

    def forward():
        k_cmp = batch.compress(case.k, case.weight_k, case.pe_k)
        v_cmp = batch.compress(case.v, case.weight_v, case.pe_v)
        return flex_jsa_attention(case.q, case.k, case.v, k_cmp, v_cmp, case.gates, batch, select=cmp_select,
                                  attend=attend)
    return forward, case.jsa_leaves


def reference_forward(case: Case):
    return lambda: jsa_call(case, reference.jsa_compress, reference.jsa_attention), case.jsa_leaves


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def step_function(forward, backward: bool):
    if not backward:
        def run():
            with torch.no_grad():
                forward()
        return run

    def run():
        out = forward()
        out.backward(torch.ones_like(out))
    return run


def median_ms(run, leaves, device: torch.device, cpu_budget_s: float) -> float:
    run()  # warm-up: compilation, autotuning, allocator
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        return triton.testing.do_bench(run, grad_to_none=leaves, return_mode="median")
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < 20 and time.perf_counter() - start < cpu_budget_s):
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def flex_block_pairs(batch: FlexBatch, selection, heads: int) -> int:
    """(query, key) pairs in the whole sparse blocks the four flex calls visit, over all heads."""
    pairs = 0
    for mask in (batch.cmp_mask, batch.jrn_mask, batch.win_mask, batch.slc_mask(selection, heads)):
        if mask is None:
            continue
        blocks = int(mask.kv_num_blocks.sum())
        if mask.full_kv_num_blocks is not None:
            blocks += int(mask.full_kv_num_blocks.sum())
        broadcast_heads = heads if mask.kv_num_blocks.shape[1] == 1 else 1
        pairs += blocks * broadcast_heads * mask.BLOCK_SIZE[0] * mask.BLOCK_SIZE[1]
    return pairs


def reference_pairs(case: Case) -> int:
    """Pairs the reference computes: each branch is a masked dense attention per sequence."""
    num_seqs, length, c = case.cu_seqlens.numel() - 1, case.length, case.config
    num_cmp = num_compressed_blocks(length, c.block, c.stride)
    return num_seqs * case.shape.heads * length * (num_cmp + 3 * length)


@dataclass
class Flops:
    useful: int
    executed: int


def case_flops(case: Case, selection, flex_batch: FlexBatch) -> dict:
    """{(impl, pass): Flops} for the selection the kernels (or the reference) made."""
    s, c = case.shape, case.config
    lengths = [case.length] * (case.cu_seqlens.numel() - 1)
    anchors = case.anchor_mask.cpu()
    dense = jsa_flops(lengths, c, s.heads, s.dim, s.kv_heads).dense
    # Flash's backward recomputes the scores: 5 tile products per pair against the forward's 2.
    result = {("SDPA", "fwd"): Flops(dense, dense), ("SDPA", "fwd+bwd"): Flops(USEFUL_FWD_BWD * dense, dense * 7 // 2)}
    useful = jsa_flops(lengths, c, s.heads, s.dim, s.kv_heads, anchors, selection.cpu().long())
    kernels = triton_executed_flops(lengths, c, s.heads, s.dim, s.kv_heads, anchors, selection)
    result[("JSA-Triton", "fwd")] = Flops(useful.useful, kernels.forward_total)
    result[("JSA-Triton", "fwd+bwd")] = Flops(USEFUL_FWD_BWD * useful.useful,
                                              kernels.forward_total + kernels.backward_total)
    ref = 4 * s.dim * reference_pairs(case) + useful.compress
    result[("Reference", "fwd")] = Flops(useful.useful, ref)
    result[("Reference", "fwd+bwd")] = Flops(USEFUL_FWD_BWD * useful.useful, 3 * ref)  # autograd: no recompute
    pairs = flex_block_pairs(flex_batch, selection, s.heads)
    forward = 4 * s.dim * pairs + useful.compress + kernels.forward["select"]  # the same selection kernel
    result[("Flex", "fwd")] = Flops(useful.useful, forward)
    result[("Flex", "fwd+bwd")] = Flops(USEFUL_FWD_BWD * useful.useful,
                                        forward + 14 * s.dim * pairs + 2 * useful.compress)
    return result


def selection_of(case: Case):
    """The top-N selection the kernels make (CUDA) or the reference makes (CPU), untimed."""
    with torch.no_grad():
        if case.q.is_cuda:
            from sparserec.ops import triton_backend

            return jsa_call(case, triton_backend.compress, triton_backend.attention, return_selection=True)[1]
        return jsa_call(case, reference.jsa_compress, reference.jsa_attention, return_selection=True)[1]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def triton_unavailable(device: torch.device):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "not timed under TRITON_INTERPRET=1: the interpreter checks correctness, not speed"
    if device.type != "cuda":
        return "needs CUDA (on CPU Triton runs only in its interpreter, a correctness tool)"
    return None


def time_case(case: Case, args, attend, skip: dict, log) -> list:
    """Every implementation and pass on one case -> result rows."""
    selection = selection_of(case)
    flex_batch = FlexBatch.build(case.cu_seqlens, case.anchor_mask, case.config)
    flops = case_flops(case, selection, flex_batch)
    builders = {
        "JSA-Triton": lambda: triton_forward(case),
        "SDPA": lambda: sdpa_forward(case),
        "Flex": lambda: flex_forward(case, attend, flex_batch),
        "Reference": lambda: reference_forward(case),
    }
    shape, device, rows = case.shape, case.q.device, []
    for pass_name in args.passes:
        timings = {}
        for impl in IMPLS:
            if skip.get(impl):
                timings[impl] = None
                continue
            forward, leaves = builders[impl]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flex's and triton's advisories, once per compile
                timings[impl] = median_ms(step_function(forward, pass_name == "fwd+bwd"), leaves, device,
                                          args.cpu_budget)
            del forward, leaves
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for impl, ms in timings.items():
            f = flops[impl, pass_name]
            rows.append(dict(
                shape=str(shape), heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.dim,
                causal=case.config.causal, **{"pass": pass_name}, tokens_per_call=int(case.cu_seqlens[-1]),
                tokens_per_seq=case.length, impl=impl, ms=ms,
                speedup_vs_sdpa=timings["SDPA"] / ms if ms else None, useful_flops=f.useful,
                executed_flops=f.executed, useful_tflops=f.useful / ms * 1e-9 if ms else None,
                executed_tflops=f.executed / ms * 1e-9 if ms else None, note=skip.get(impl) or ""))
        log(f"{shape} {'causal' if case.config.causal else 'bidir'} {case.length:>6} {pass_name:>7} | "
            + " | ".join(f"{impl} {_fmt(ms, '.3f')}" for impl, ms in timings.items()))
    return rows


def run_grid(args, device, dtype, log):
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: each (shape, mode, mask) compiles once (FlexBatch pads its key lists to a few
    # sizes); past the default recompile limit dynamo would silently run flex eagerly.
    torch._dynamo.config.recompile_limit = 1024
    attend = torch.compile(flex_attention, dynamic=False)
    unavailable = {"JSA-Triton": triton_unavailable(device), "Flex": None if device.type == "cuda" else FLEX_CPU}
    notes = [f"{impl} not timed: {reason}." for impl, reason in unavailable.items() if reason]
    if device.type == "cpu":
        notes.append("JSA-Triton FLOPs on CPU: counted for the reference's selection at the kernels' first "
                     "autotune candidates (no kernel ran).")
    rows = []
    for shape in args.shapes:
        for causal in args.modes:
            for length in args.lengths:
                if args.tokens % length:
                    raise SystemExit(f"--tokens {args.tokens} is not a multiple of the length {length}")
                skip = dict(unavailable)
                if length > args.reference_max_length:
                    skip["Reference"] = f"not run above {args.reference_max_length} tokens per sequence"
                skip.update({impl: "not requested (--impls)" for impl in IMPLS if impl not in args.impls})
                case = make_case(shape, args.tokens, length, causal, dtype, device, args.seed)
                rows += time_case(case, args, attend, skip, log)
                del case
    return rows, notes


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def stamp(device, dtype, args) -> dict:
    import triton

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain"):
        commit += " (uncommitted changes)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor() or "CPU") \
            if Path("/proc/cpuinfo").exists() else platform.processor()
        name = f"{name}, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "dtype": str(dtype).replace("torch.", ""), "tokens per call": f"{args.tokens:,}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}


def check_targets(rows):
    """The issue's targets against the measured rows: [(target, measured, verdict)]."""
    def where(r):
        return f"{r['shape']} {'causal' if r['causal'] else 'bidir'} {r['tokens_per_seq']} {r['pass']}"

    def target(name, values, ok, show_worst=None):
        """values: [(where, value)]; PASS when ok(value) for all; shows all, or the worst few."""
        if not values:
            return name, "—", "not measured"
        shown = sorted(values, key=lambda x: x[1], reverse=show_worst == "largest")[:3] if show_worst else values
        measured = ", ".join(f"{w}: {v:.2f}" for w, v in shown)
        return name, measured, "PASS" if all(ok(v) for _, v in values) else "FAIL"

    triton = [r for r in rows if r["impl"] == "JSA-Triton" and r["ms"]]
    triton_ms = {where(r): r["ms"] for r in triton}
    flex = [(where(r), r["ms"] / triton_ms[where(r)]) for r in rows
            if r["impl"] == "Flex" and r["ms"] and where(r) in triton_ms]
    grace = [(where(r), r["speedup_vs_sdpa"]) for r in triton if r["tokens_per_seq"] == 2048
             or (not r["causal"] and 512 <= r["tokens_per_seq"] <= 2048)]
    long_causal = [(where(r), r["speedup_vs_sdpa"]) for r in triton
                   if r["causal"] and r["tokens_per_seq"] == 32768 and r["pass"] == "fwd+bwd"]
    flop_ratio = {p: [(where(r), r["executed_flops"] / r["useful_flops"]) for r in rows
                      if r["impl"] == "JSA-Triton" and r["pass"] == p and r["tokens_per_seq"] >= 8192
                      and r["executed_flops"]] for p in PASSES}
    return [
        target("JSA-Triton ≥ 5× SDPA, fwd+bwd, 32,768 tokens, causal", long_causal, lambda v: v >= 5),
        target("JSA-Triton ≥ 1× SDPA: bidir 512–2,048, causal 2,048 (3 slowest)", grace, lambda v: v >= 1,
               "smallest"),
        target("JSA-Triton ≥ 1.5× faster than Flex (3 slowest)", flex, lambda v: v >= 1.5, "smallest"),
        *(target(f"JSA-Triton executed ≤ 1.3× useful FLOPs, ≥ 8,192 tokens, {p} (3 largest)", flop_ratio[p],
                 lambda v: v <= 1.3, "largest") for p in PASSES),
    ]


def write_markdown(path, rows, notes, info, args):
    lines = [f"# JSA attention scaling — {info['device']}", ""]
    lines += [f"- **{key}**: {value}" for key, value in info.items()]
    lines += [f"- **JSA config**: {grace_config(True)} (causal per table), anchors ≈ 1 in "
              f"{round(1 / ANCHOR_RATE)} tokens (random, seed {args.seed})", ""]
    lines += ["Times are medians in ms; ×SDPA = SDPA time / this time; exec/useful = executed / useful FLOPs; "
              "TFLOP/s = executed FLOPs / time. FLOP conventions and implementations: see the docstring of "
              "`benchmarks/attention_scaling.py`.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in check_targets(rows)] + [""]
    header = ("| tokens/seq | SDPA ms | JSA-Triton ms | ×SDPA | Flex ms | ×SDPA | Reference ms | ×SDPA "
              "| useful GFLOP | Triton exec/useful | Flex exec/useful | SDPA TFLOP/s | Triton TFLOP/s | Flex TFLOP/s |")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for causal in dict.fromkeys(r["causal"] for r in rows):
            for pass_name in PASSES:
                block = [r for r in rows if r["shape"] == shape and r["causal"] == causal and r["pass"] == pass_name]
                if not block:
                    continue
                lines += [f"## {shape}, {'causal' if causal else 'bidirectional'}, {pass_name}", "", header,
                          "|" + "---|" * (header.count("|") - 1)]
                for length in sorted({r["tokens_per_seq"] for r in block}):
                    by = {r["impl"]: r for r in block if r["tokens_per_seq"] == length}
                    cells = [f"{length:,}", _fmt(by["SDPA"]["ms"], ".3f")]
                    for impl in ("JSA-Triton", "Flex", "Reference"):
                        cells += [_fmt(by[impl]["ms"], ".3f"), _fmt(by[impl]["speedup_vs_sdpa"], ".2f")]
                    cells.append(format(by["JSA-Triton"]["useful_flops"] * 1e-9, ".3g"))
                    cells += [format(by[impl]["executed_flops"] / by[impl]["useful_flops"], ".2f")
                              for impl in ("JSA-Triton", "Flex")]
                    cells += [_fmt(by[impl]["executed_tflops"], ".3g") for impl in ("SDPA", "JSA-Triton", "Flex")]
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
    path.write_text("\n".join(lines))


def read_csv(path) -> list:
    """Rows written by `write_csv`, with their numbers back (empty cells: None)."""
    def value(text):
        if text in ("", "None"):
            return None
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with path.open() as f:
        lines = [line for line in f if not line.startswith("#")]
    return [{key: (text if key in ("shape", "pass", "impl", "note") else value(text)) for key, text in row.items()}
            for row in csv.DictReader(lines)]


def write_csv(path, rows, info):
    with path.open("w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path, rows, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    panels = [(c, p) for c in dict.fromkeys(r["causal"] for r in rows) for p in PASSES
              if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(len(shapes), len(panels), figsize=(4.2 * len(panels), 3.4 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, (causal, pass_name) in enumerate(panels):
            ax = axes[i][j]
            for impl in IMPLS:
                points = sorted((r["tokens_per_seq"], r["ms"]) for r in rows if r["shape"] == shape
                                and r["causal"] == causal and r["pass"] == pass_name and r["impl"] == impl and r["ms"])
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}, {'causal' if causal else 'bidir'}, {pass_name}", fontsize=9)
            ax.set_xlabel("tokens per sequence")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"JSA scaling, {info['tokens per call']} tokens per call, {info['dtype']} — {info['device']}\n"
                 f"torch {info['torch']}, triton {info['triton']}, commit {info['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid (CPU: 4,096 tokens per call, lengths 128-2,048, 2 shapes; "
                             "CUDA: 4 lengths, 8x64)")
    parser.add_argument("--tokens", type=int, help="tokens per call (default 65,536; --quick on CPU: 4,096)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                        help="tokens per sequence, comma-separated (default 128,256,...,32768)")
    parser.add_argument("--shapes", type=lambda s: [Shape.parse(x) for x in s.split(",")],
                        help="HxD or Hq/HkvxD, comma-separated (default 8x64,4x32,16/2x128)")
    parser.add_argument("--modes", choices=["both", "causal", "bidirectional"], default="both")
    parser.add_argument("--passes", choices=["both", "fwd", "fwd+bwd"], default="both")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS),
                        help=f"implementations to time, comma-separated (default {','.join(IMPLS)})")
    parser.add_argument("--reference-max-length", type=int,
                        help="longest sequence the reference is timed on (default 2,048)")
    parser.add_argument("--cpu-budget", type=float, default=1.0, help="seconds of repeats per CPU timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier run in the output files (new rows replace equal cells)")
    args = parser.parse_args(argv)
    cpu = torch.device(args.device).type == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.tokens = args.tokens or (4096 if args.quick and cpu else 65536)
    quick_lengths = [128, 512, 2048] if cpu else [512, 2048, 8192, 32768]
    args.lengths = args.lengths or (quick_lengths if args.quick else [2 ** i for i in range(7, 16)])
    args.lengths = [n for n in args.lengths if n <= args.tokens]
    default_shapes = [Shape(8, 8, 64), Shape(4, 4, 32)] if cpu else [Shape(8, 8, 64)]
    all_shapes = [Shape(8, 8, 64), Shape(4, 4, 32), Shape(16, 2, 128)]
    args.shapes = args.shapes or (default_shapes if args.quick else all_shapes)
    args.modes = {"both": [True, False], "causal": [True], "bidirectional": [False]}[args.modes]
    args.passes = list(PASSES) if args.passes == "both" else [args.passes]
    args.reference_max_length = 2048 if args.reference_max_length is None else args.reference_max_length
    unknown = set(args.impls) - set(IMPLS)
    if unknown or "SDPA" not in args.impls:
        parser.error(f"--impls: choose from {', '.join(IMPLS)}, SDPA included (the baseline); got {args.impls}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = stamp(device, dtype, args)
    if args.tokens != 65536:
        info["tokens per call"] += " (reduced from 65,536)"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, notes = run_grid(args, device, dtype, log=lambda line: print(line, flush=True))
    info["wall time"] = f"{time.perf_counter() - started:.0f} s"
    stem = args.out / f"attention_scaling_{device_slug(device)}"
    if args.merge and stem.with_suffix(".csv").exists():
        def key(r):
            return r["shape"], r["causal"], r["pass"], r["tokens_per_seq"], r["impl"]
        fresh = {key(r) for r in rows}
        rows = [r for r in read_csv(stem.with_suffix(".csv")) if key(r) not in fresh] + rows
        info["command"] += " (merged with the rows already in this file)"
    write_csv(stem.with_suffix(".csv"), rows, info)
    write_markdown(stem.with_suffix(".md"), rows, notes, info, args)
    write_plot(stem.with_suffix(".png"), rows, info)
    print(f"wrote {stem}.md, .csv, .png")


if __name__ == "__main__":
    main()
