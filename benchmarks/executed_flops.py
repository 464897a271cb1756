"""Executed against useful FLOPs of the Triton JSA path (issue 14, item 4), split by kernel part.

Counts, not times: `sparserec.flops.triton_executed_flops` (every tile product the kernels' programs
run, from their own launch geometry; tests/test_executed_flops.py checks it against an interpreted
run's tl.dot calls) over `sparserec.flops.jsa_flops` (useful work), for one sequence per length with
GRACE-like settings and a valid selection: `random` (3 of the blocks each selection tile may see) or
`nearest` (the 3 visible blocks nearest the tile, as when attention is mostly local: the selection
then overlaps the window, whose rows the backward serves once for both branches).

    python benchmarks/executed_flops.py --lengths 8192,32768 [--selection nearest]
"""
import argparse

import torch
import torch.nn.functional as F

from sparserec import JSAConfig
from sparserec.flops import jsa_flops, triton_executed_flops


def make_selection(length: int, config: JSAConfig, kv_heads: int, gen, nearest: bool = False) -> torch.Tensor:
    """(length, kv_heads, top_n): per selection tile, top_n distinct blocks it may see, ascending:
    random ones, or the nearest to the tile's first token."""
    blocks = -(-length // config.select_block)
    rows = []
    for start in range(0, length, config.select_q_block):
        last = min(start + config.select_q_block, length) - 1
        visible = last // config.select_block + 1 if config.causal else blocks

        def pick():
            if nearest:
                return (torch.arange(visible) - start // config.select_block).abs().argsort(stable=True)
            return torch.randperm(visible, generator=gen)
        picks = [F.pad(pick()[:config.top_n].sort().values, (0, max(0, config.top_n - visible)), value=-1)
                 for _ in range(kv_heads)]
        rows.append(torch.stack(picks).expand(min(config.select_q_block, length - start), -1, -1))
    return torch.cat(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--anchor-rate", type=float, default=1 / 16)
    parser.add_argument("--selection", choices=("random", "nearest"), default="random")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if min(lengths) < 1 or args.heads % args.kv_heads or not 0 <= args.anchor_rate <= 1:
        parser.error("lengths must be positive, heads a multiple of kv heads, the anchor rate in [0, 1]")
    gen = torch.Generator().manual_seed(0)
    print(f"{args.heads} x {args.head_dim} heads, {args.kv_heads} kv heads, anchors {args.anchor_rate:.4g}; "
          f"block 32, stride 16, top-3 of 32-token blocks ({args.selection}), select tiles 64, window 64")
    print("| mode | tokens | forward | re-scoring | forward without it | forward + backward |")
    print("|---|---|---|---|---|---|")
    for causal in (True, False):
        config = JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64, causal=causal)
        for length in lengths:
            anchors = torch.rand(length, generator=gen) < args.anchor_rate
            selection = make_selection(length, config, args.kv_heads, gen, args.selection == "nearest")
            useful = jsa_flops([length], config, args.heads, args.head_dim, args.kv_heads, anchor_mask=anchors,
                               selection=selection).useful
            executed = triton_executed_flops([length], config, args.heads, args.head_dim, args.kv_heads, anchors,
                                             selection)
            forward = sum(executed.forward.values())
            both = forward + sum(executed.backward.values())
            print(f"| {'causal' if causal else 'bidirectional'} | {length:,} | {forward / useful:.3f} | "
                  f"{executed.forward['select'] / useful:.3f} | {(forward - executed.forward['select']) / useful:.3f} | "
                  f"{both / (3 * useful):.3f} |")


if __name__ == "__main__":
    main()
