"""Cost of a second value stream through the same softmax (issue 11: AttnLFA's pooled actions).

A fused second value stream is `Da` extra value columns: v (T, Hkv, D + Da) and v_cmp likewise, so
one softmax pools both (sparserec.ops.jsa_attention with a value width other than the key width); the
extra columns have their own compressor (a Da x Da map per block offset), as a model would give them.
This times the fused C++ JSA kernels (`cpp`, compression of K and V included) and dense SDPA with
value width D + Da against the same call with width D, on the same inputs, candidates interleaved,
median of --repeats after one warm-up: cost = time(D + Da) / time(D) - 1.

  python benchmarks/action_values.py                    # causal and bidirectional, 1 thread
  python benchmarks/action_values.py --extra 16 --lengths 1024

Settings as benchmarks/cpu_attention.py: fp32, 8 heads x 64, 8,192 tokens per call, GRACE-like JSA.
Outputs action_values.md and .csv under --out, stamped with the CPU, torch version and commit.
"""
import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cpu_attention as bench  # noqa: E402  (the shared cases, steps, timing and stamp)
from sparserec.ops import fused_cpu  # noqa: E402


def widen(case, extra: int, seed: int = 1):
    """The case with `extra` random value columns appended to v, compressed by their own compressor."""
    gen = torch.Generator().manual_seed(seed)
    total, heads, dim = case["v"].shape
    block = case["config"].block
    return dict(case, v=torch.cat([case["v"], torch.randn(total, heads, extra, generator=gen)], dim=-1),
                extra_weight=torch.randn(heads, block, extra, extra, generator=gen) * (block * extra) ** -0.5,
                extra_pe=torch.randn(heads, block, extra, generator=gen) * 0.1)


def wide_jsa_step(case, backward: bool):
    """As cpu_attention.jsa_step, with v_cmp = [compress(v[..., :D]) | compress(v[..., D:])]."""
    leaves = [case[name].clone().requires_grad_(backward) for name in ("q", "k", "v", "gates")]
    weights = [w.clone().requires_grad_(backward) for w in (*case["weights"], case["extra_weight"])]
    pes = (*case["pes"], case["extra_pe"])
    dim = case["k"].shape[-1]

    def run():
        q, k, v, gates = leaves
        config, cu = case["config"], case["cu_seqlens"]
        k_cmp, cu_cmp = fused_cpu.compress(k, weights[0], pes[0], cu, config.block, config.stride)
        v_cmp = torch.cat([fused_cpu.compress(part, weight, pe, cu, config.block, config.stride)[0]
                           for part, weight, pe in ((v[..., :dim], weights[1], pes[1]),
                                                    (v[..., dim:], weights[2], pes[2]))], dim=-1)
        out = fused_cpu.attention(q, k, v, k_cmp, v_cmp, gates, case["anchors"], cu, cu_cmp, config=config)
        if backward:
            out.backward(torch.ones_like(out))
        return out
    return run


def measure(case, extra: int, backward: bool, repeats: int) -> dict:
    wide = widen(case, extra)
    steps = {("JSA-cpp", 0): bench.jsa_step(case, fused_cpu.compress, fused_cpu.attention, backward),
             ("JSA-cpp", extra): wide_jsa_step(wide, backward),
             ("SDPA", 0): bench.sdpa_step(case, backward), ("SDPA", extra): bench.sdpa_step(wide, backward)}
    return bench.time_interleaved(steps, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--lengths", default="512,1024,4096")
    parser.add_argument("--extra", default="16,64", help="extra value columns per head (Da)")
    parser.add_argument("--modes", default="causal,bidirectional")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    extras = [int(x) for x in args.extra.split(",")]
    modes = args.modes.split(",")
    if any(x < 1 for x in lengths + extras) or args.repeats < 1 or not set(modes) <= {"causal", "bidirectional"}:
        parser.error("lengths and --extra must be positive, --repeats >= 1, modes causal/bidirectional")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in modes:
        for length in lengths:
            case = bench.make_case(args.tokens, length, mode == "causal")
            for extra in extras:
                for backward in (False, True):
                    ms = measure(case, extra, backward, args.repeats)
                    rows.append({"mode": mode, "tokens_per_seq": length, "extra_columns": extra,
                                 "pass": "fwd+bwd" if backward else "fwd", "jsa_ms": round(ms[("JSA-cpp", 0)], 1),
                                 "jsa_wide_ms": round(ms[("JSA-cpp", extra)], 1),
                                 "jsa_cost": round(ms[("JSA-cpp", extra)] / ms[("JSA-cpp", 0)] - 1, 3),
                                 "sdpa_cost": round(ms[("SDPA", extra)] / ms[("SDPA", 0)] - 1, 3)})
                    print(rows[-1], flush=True)
    with open(args.out / "action_values.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    info = bench.stamp()
    lines = [f"Device: {info['device']}; torch {info['torch']}; commit {info['commit']}; `{info['command']}`; 1 thread.",
             "fp32, 8 heads x 64, GRACE-like JSA; cost = time with D + Da value columns / time with D - 1 "
             "(median of repeats, interleaved).", "",
             "| mode | tokens/seq | Da | pass | JSA-cpp ms (D) | JSA-cpp ms (D + Da) | JSA cost | SDPA cost |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['tokens_per_seq']:,} | {r['extra_columns']} | {r['pass']} | {r['jsa_ms']} | "
              f"{r['jsa_wide_ms']} | {100 * r['jsa_cost']:+.1f}% | {100 * r['sdpa_cost']:+.1f}% |" for r in rows]
    (args.out / "action_values.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
