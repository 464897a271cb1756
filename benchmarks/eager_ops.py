"""Eager work around the Triton JSA kernels: aten ops of a stack of JourneySparseAttention layers,
forward + backward, with one shared per-batch plan (`layer.plan(...)`) or each layer building its own.

Counts, not times (this runs on CPU tensors under the Triton interpreter; on a GPU each eager op is
a kernel launch, and their time is unmeasured): the outermost aten ops that `torch.profiler` records
(the interpreter's own tensor copies are included in every count, equal for equal launches) and
`aten::searchsorted`, which every index map of a plan calls once (`sparserec.triton_kernels.plan`).

    TRITON_INTERPRET=1 python benchmarks/eager_ops.py --layers 3
"""
import argparse
import collections
import os

import torch
from torch.profiler import ProfilerActivity, profile

from sparserec import JSAConfig
from sparserec.nn import JourneySparseAttention


def outermost_aten_ops(prof) -> collections.Counter:
    def outermost(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and outermost(e))


def count(layers, x, cu_seqlens, anchors, shared: bool) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        plan = layers[0].plan(cu_seqlens, anchors) if shared else None
        h = x
        for layer in layers:
            h = layer(h, cu_seqlens, anchors, plan=plan)
        h.square().sum().backward()
    return outermost_aten_ops(prof)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        parser.error("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3)
    cu_seqlens = torch.tensor([0, 1, 8, 37, 40], device=device)
    anchors = torch.rand(40, device=device) < 0.2
    print(f"{args.layers} layers (32 wide, 4 heads, 2 kv heads), 4 sequences of 1/7/29/3 tokens, forward + backward")
    print("| compressor | plan | outermost aten ops | aten::searchsorted |")
    print("|---|---|---|---|")
    for compress in ("linear", "mlp"):
        layers = [JourneySparseAttention(32, 4, 2, config=config, backend="triton", compress=compress).to(device)
                  for _ in range(args.layers)]
        for shared in (False, True):
            x = torch.randn(40, 32, device=device, requires_grad=True)
            ops = count(layers, x, cu_seqlens, anchors, shared)
            print(f"| {compress} | {'one, shared' if shared else 'one per layer'} | {sum(ops.values())} | "
                  f"{ops['aten::searchsorted']} |")


if __name__ == "__main__":
    main()
