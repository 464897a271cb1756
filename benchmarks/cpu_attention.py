"""JSA on the CPU: the fused C++ kernels (`cpp` backend) against dense SDPA and the reference.

A fixed number of tokens per call (default 8,192) split into equal sequences of 128 ... 8,192
tokens; 8 heads x 64 (MHA), fp32; GRACE-like JSA (block 32, stride 16, top-3 of 32-token blocks
for query tiles of 64, window 64, anchors ~1 in 16 tokens, random and seeded); bidirectional and
causal; forward and forward+backward; 1 and 2 threads. Candidates, each timed as one call:

  JSA-cpp    sparserec.ops.fused_cpu: compress(K), compress(V), attention (the kernels and their
             glue; the public sparserec.ops entries add input checks)
  SDPA       torch scaled_dot_product_attention, dense over each sequence (B, H, L, D)
  Reference  sparserec.reference (pure PyTorch, masked dense math), up to --reference-max-length

FLOPs (SPEC §1, `sparserec.flops.jsa_flops` with the selection the kernel made): useful/dense is
the share of dense attention work JSA needs; "vs FLOP-proportional" = (JSA/SDPA time) /
(useful/dense): 1 means JSA runs exactly as fast per useful FLOP as SDPA, < 1 faster.
Timing: perf_counter, candidates interleaved within each repeat, median of --repeats after one
untimed warm-up call. Peak memory: a fresh process runs one forward+backward while a thread samples
its RSS (glibc's mmap threshold fixed, so RSS follows live buffers); reported above the RSS after
building the inputs (--memory-lengths). Gradients of q, k, v and gates count for both.

  python benchmarks/cpu_attention.py                  # the grid; ~15 min on 2 cores
  python benchmarks/cpu_attention.py --quick          # 2 lengths, 1 thread, 2 repeats

Outputs: cpu_attention.md, .csv and .png under --out, stamped with the CPU, torch version and
the git commit.
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparserec import JSAConfig, reference
from sparserec.flops import jsa_flops
from sparserec.ops import fused_cpu

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM = 8, 64


def grace_config(causal: bool) -> JSAConfig:
    return JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64, causal=causal)


def make_case(tokens: int, length: int, causal: bool, seed: int = 0) -> dict:
    """Inputs of one call: `tokens // length` sequences of `length` tokens."""
    gen = torch.Generator().manual_seed(seed)
    count = max(1, tokens // length)
    total = count * length
    config = grace_config(causal)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    cu_seqlens = torch.arange(count + 1, dtype=torch.int64) * length
    return dict(
        config=config, count=count, length=length, cu_seqlens=cu_seqlens,
        q=randn(total, HEADS, DIM), k=randn(total, HEADS, DIM), v=randn(total, HEADS, DIM),
        weights=[randn(HEADS, config.block, DIM, DIM, scale=(config.block * DIM) ** -0.5) for _ in range(2)],
        pes=[randn(HEADS, config.block, DIM, scale=0.1) for _ in range(2)],
        gates=torch.rand(total, HEADS, 4, generator=gen),
        anchors=torch.rand(total, generator=gen) < 1 / 16,
    )


def jsa_step(case, compress, attention, backward: bool):
    leaves = [case[name].clone().requires_grad_(backward) for name in ("q", "k", "v", "gates")]
    weights = [w.clone().requires_grad_(backward) for w in case["weights"]]

    def run():
        q, k, v, gates = leaves
        config, cu = case["config"], case["cu_seqlens"]
        k_cmp, cu_cmp = compress(k, weights[0], case["pes"][0], cu, config.block, config.stride)
        v_cmp, _ = compress(v, weights[1], case["pes"][1], cu, config.block, config.stride)
        out = attention(q, k, v, k_cmp, v_cmp, gates, case["anchors"], cu, cu_cmp, config=config)
        if backward:
            out.backward(torch.ones_like(out))
        return out
    return run


def sdpa_step(case, backward: bool):
    count, length = case["count"], case["length"]
    q, k, v = (case[name].view(count, length, *case[name].shape[1:]).transpose(1, 2).clone().requires_grad_(backward)
               for name in "qkv")

    def run():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=case["config"].causal)
        if backward:
            out.backward(torch.ones_like(out))
        return out
    return run


def candidates(case, backward: bool, reference_max_length: int) -> dict:
    steps = {"JSA-cpp": jsa_step(case, fused_cpu.compress, fused_cpu.attention, backward),
             "SDPA": sdpa_step(case, backward)}
    if case["length"] <= reference_max_length:
        steps["Reference"] = jsa_step(case, reference.jsa_compress, reference.jsa_attention, backward)
    return steps


def time_interleaved(steps: dict, repeats: int) -> dict:
    times = {name: [] for name in steps}
    with torch.inference_mode(False):
        for step in steps.values():
            step()  # warm-up, untimed
        for _ in range(repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def flop_share(case) -> float:
    """Useful / dense attention FLOPs of JSA with the selection the kernel makes."""
    config, cu = case["config"], case["cu_seqlens"]
    k_cmp, cu_cmp = fused_cpu.compress(case["k"], case["weights"][0], case["pes"][0], cu, config.block, config.stride)
    v_cmp, _ = fused_cpu.compress(case["v"], case["weights"][1], case["pes"][1], cu, config.block, config.stride)
    _, selection = fused_cpu.attention(case["q"], case["k"], case["v"], k_cmp, v_cmp, case["gates"], case["anchors"],
                                       cu, cu_cmp, config=config, return_selection=True)
    counts = jsa_flops([case["length"]] * case["count"], config, HEADS, DIM, HEADS, anchor_mask=case["anchors"],
                       selection=selection)
    return counts.useful / counts.dense


MEMORY_PROBE = """
import os, sys, threading, time
sys.path.insert(0, {folder!r})
import torch
import cpu_attention as bench
torch.set_num_threads(1)
case = bench.make_case({tokens}, {length}, {causal})
step = bench.candidates(case, True, 0)[{candidate!r}]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
base, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
step()
done.set()
sampler.join()
print(max(0, peak[0] - base))
"""


def peak_memory_mb(candidate: str, tokens: int, length: int, causal: bool) -> float:
    """Peak extra resident memory of one forward+backward, in a fresh process (MB): RSS sampled every
    0.5 ms above the RSS after building the inputs. glibc's mmap threshold is fixed so freed buffers
    go back to the system and RSS follows the live allocations."""
    code = MEMORY_PROBE.format(folder=str(Path(__file__).parent), tokens=tokens, length=length, causal=causal,
                               candidate=candidate)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1]) / 2**20


def stamp() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"device": f"{cpu}, {torch.get_num_threads()} torch threads available",
            "torch": torch.__version__, "commit": commit.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else ""),
            "command": "python " + " ".join(sys.argv)}


def write_outputs(rows, memory, info, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with open(out / "cpu_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Device: {info['device']}; torch {info['torch']}; commit {info['commit']}; `{info['command']}`.",
             "fp32, 8 heads x 64, GRACE-like JSA; ms = median of repeats (candidates interleaved); "
             "speed-up = SDPA ms / JSA-cpp ms; vs FLOP-prop. = (JSA/SDPA time) / (useful/dense FLOPs).", "",
             "| tokens/seq | mode | pass | threads | JSA-cpp ms | SDPA ms | Reference ms | speed-up vs SDPA "
             "| useful/dense FLOPs | vs FLOP-prop. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reference_ms = f"{r['reference_ms']:.1f}" if r["reference_ms"] is not None else "—"
        lines.append(f"| {r['length']:,} | {r['mode']} | {r['pass']} | {r['threads']} | {r['jsa_ms']:.1f} | "
                     f"{r['sdpa_ms']:.1f} | {reference_ms} | {r['speedup']:.2f}x | {r['flop_share']:.3f} | "
                     f"{r['vs_flop_proportional']:.2f} |")
    if memory:
        lines += ["", "Peak extra memory of one forward+backward (sampled RSS above the inputs, 1 thread, "
                  "fresh process, first call: includes one-time allocations):", "", "| tokens/seq | mode | JSA-cpp MB | SDPA MB |", "|---|---|---|---|"]
        lines += [f"| {m['length']:,} | {m['mode']} | {m['JSA-cpp']:.0f} | {m['SDPA']:.0f} |" for m in memory]
    (out / "cpu_attention.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "cpu_attention.png")


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["mode"], r["pass"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (mode, kind) in zip(axes[0], panels):
        for threads in sorted({r["threads"] for r in rows}):
            part = [r for r in rows if (r["mode"], r["pass"], r["threads"]) == (mode, kind, threads)]
            lengths = [r["length"] for r in part]
            ax.plot(lengths, [r["speedup"] for r in part], marker="o", label=f"JSA-cpp, {threads} thr")
            ax.plot(lengths, [1 / r["flop_share"] for r in part], ls=":", color="gray",
                    label="FLOP-proportional" if threads == 1 else None)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, {kind}")
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel("speed-up over SDPA (x)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per call")
    parser.add_argument("--lengths", default="128,512,1024,2048,4096,8192", help="tokens per sequence")
    parser.add_argument("--modes", default="bidirectional,causal")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-max-length", type=int, default=1024)
    parser.add_argument("--memory-lengths", default="1024,4096", help="tokens/seq of the peak-memory runs ('' for none)")
    parser.add_argument("--quick", action="store_true", help="lengths 512,4096; 1 thread; 2 repeats; no memory runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.threads, args.repeats, args.memory_lengths = "512,4096", "1", 2, ""
    lengths = [int(x) for x in args.lengths.split(",")]
    for value, name in ((args.tokens, "--tokens"), (args.repeats, "--repeats"), *((n, "--lengths") for n in lengths)):
        if value < 1:
            parser.error(f"{name} must be positive, got {value}")
    info = stamp()
    rows = []
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for mode in args.modes.split(","):
            for length in lengths:
                case = make_case(args.tokens, length, mode == "causal")
                share = flop_share(case)
                for kind in args.passes.split(","):
                    ms = time_interleaved(candidates(case, kind == "fwd+bwd", args.reference_max_length), args.repeats)
                    ratio = ms["SDPA"] / ms["JSA-cpp"]
                    rows.append({"length": length, "mode": mode, "pass": kind, "threads": threads,
                                 "jsa_ms": ms["JSA-cpp"], "sdpa_ms": ms["SDPA"], "reference_ms": ms.get("Reference"),
                                 "speedup": ratio, "flop_share": share, "vs_flop_proportional": (1 / ratio) / share})
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                          flush=True)
    memory = []
    for length in [int(x) for x in args.memory_lengths.split(",") if x]:
        for mode in args.modes.split(","):
            memory.append({"length": length, "mode": mode, **{
                name: peak_memory_mb(name, args.tokens, length, mode == "causal") for name in ("JSA-cpp", "SDPA")}})
            print(json.dumps(memory[-1]), flush=True)
    write_outputs(rows, memory, info, args.out)


if __name__ == "__main__":
    main()
