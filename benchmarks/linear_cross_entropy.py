"""The full-catalogue next-item loss: fused `linear_cross_entropy` against F.cross_entropy(F.linear(...)).

One timed call = the loss of N states against a (V, d) item table, then its backward (dx and dW),
fp32. The default shapes are the ones the models train at: the `--model gr` ranker on Retail (1,062
next-item positions per batch of 64, d 64, 19,925 items) and SASRec on Amazon Beauty (about 400 real
positions per batch, d 128, 12,101 items). Candidates interleaved, median of --repeats after one
warm-up; the gradients of every candidate are checked against the two-op path's before timing.

  OMP_NUM_THREADS=1 python benchmarks/linear_cross_entropy.py
  OMP_NUM_THREADS=1 python benchmarks/linear_cross_entropy.py --shapes 1062x64x19925 --repeats 21
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cpu_attention import stamp, time_interleaved  # noqa: E402  (the shared timing and stamp)
from sparserec.models import linear_cross_entropy  # noqa: E402

BLOCKS = (1 << 18, 1 << 20, 1 << 22)  # logits per block; 1 << 20 is linear_cross_entropy's default


def parse_shape(text: str):
    try:
        rows, width, items = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is ROWSxWIDTHxITEMS, got {text!r}") from None
    if min(rows, width, items) < 1:
        raise argparse.ArgumentTypeError(f"every size must be positive, got {text!r}")
    return rows, width, items


def loss_steps(rows: int, width: int, items: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=generator) * 0.5).requires_grad_()
    weight = (torch.randn(items, width, generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, items, (rows,), generator=generator)
    losses = {"two-op": lambda: F.cross_entropy(F.linear(x, weight), targets)}
    losses.update({f"fused, {block >> 10}k logits/block": (lambda block: lambda: linear_cross_entropy(
        x, weight, targets, block_elements=block))(block) for block in BLOCKS})

    def step(loss):
        def run():
            x.grad = weight.grad = None
            loss().backward()
            return x.grad, weight.grad
        return run

    steps = {name: step(loss) for name, loss in losses.items()}
    expected = steps["two-op"]()
    for name, run in steps.items():
        for got, want in zip(run(), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name}: gradients differ")
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(1062, 64, 19925), (400, 128, 12101)],
                        help="ROWSxWIDTHxITEMS")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    info = stamp()
    print(f"Device: {info['device']}; torch {info['torch']}; commit {info['commit']}; `{info['command']}`.")
    print("\n| rows x d x items | candidate | loss + backward ms | time vs two-op |\n|---|---|---|---|")
    for rows, width, items in args.shapes:
        milliseconds = time_interleaved(loss_steps(rows, width, items), args.repeats)
        for name, ms in milliseconds.items():
            print(f"| {rows} x {width} x {items:,} | {name} | {ms:.1f} | {ms / milliseconds['two-op']:.2f}x |")


if __name__ == "__main__":
    main()
