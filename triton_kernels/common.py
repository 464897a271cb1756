"""Shared pieces of the JSA Triton kernels: jagged work lists built on the device, launch configs.

Helpers here (import what you need; none of them synchronises with the host, so every kernel
launch stays capturable in a CUDA graph and traceable by torch.compile):

  LOG2E                               log2(e) as a tl.constexpr: @triton.jit code may read a global
                                      only when it is a constexpr (a plain float builds under the
                                      interpreter but not for a GPU); host code reads LOG2E.value
  HOPPER_SHARED_MEMORY                227 KiB, the shared memory one H100/H200 block may use
  interpreting()                      True under TRITON_INTERPRET=1 (kernels run on CPU tensors)
  cdiv(a, b), next_power_of_2(n)      integer helpers for grid and block sizes
  max_tiles(total, num_seqs, block)   upper bound on sum_b ceil(len_b / block): total // block + B
  enumerate_jagged(counts, num_items)
                                      (item_seq, item_index) int32: sequence b owns counts[b]
                                      consecutive items; item_seq == -1 past the last one
  jagged_tiles(cu_seqlens, block, num_tiles)
                                      (tile_seq, tile_start) int32 (num_tiles,): program p works on
                                      tokens [tile_start, tile_start + block) of sequence tile_seq
                                      (sequence-local); tile_seq == -1 marks a spare program
  dot_precision(dtype)                "ieee" for fp32/fp64 (tl.dot would round fp32 to tf32), else "tf32"
  launch_configs(configs)             an autotune list; only its first entry under the interpreter
  pipeline_configs(max_stages), prune_narrow_warps(widest)
                                      autotune candidates of warps and pipeline depth only (tile
                                      sizes stay fixed: the batch plan and the FLOP count follow them),
                                      and a pruner keeping 8 warps above head dim `widest`
  size_bucket(n)                      the next power of two: an autotune key's size class
  chosen_config(kernel)               an autotuned kernel's config as last chosen (before any launch:
                                      its first candidate); launch_geometry functions report it
  POISON_ALLOCATIONS, empty(shape, dtype, device)
                                      outputs a kernel must write in full: NaN-filled when a test
                                      sets POISON_ALLOCATIONS = True, else torch.empty
  online_softmax_step(acc, row_max, row_sum, scores, v, PRECISION)  (@triton.jit)
                                      one key chunk of FlashAttention's forward (log2 units)
  tile_bounds(tile_seq_ptr, tile_start_ptr, cu_seqlens_ptr, pid)   (@triton.jit)
                                      -> (seq, bos, length, start) of a program's tile; seq < 0: spare
"""
import os

import torch
import triton
import triton.language as tl


# Tests set this so that every float output allocated through `empty` starts as NaN: a row a
# kernel forgets to write cannot pass as a plausible value.
POISON_ALLOCATIONS = False

LOG2E = tl.constexpr(1.4426950408889634)
HOPPER_SHARED_MEMORY = 227 * 1024  # bytes one H100/H200 thread block may use (opt-in maximum)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _squeeze_interpreter_index():
    """Triton 3.6's interpreter turns a scalar into int() of a 1-element array, which numpy >= 2.4
    rejects, so `range(program-dependent bound)` fails (triton-lang/triton#9171, fixed upstream in
    #9172): squeeze first."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _squeeze_interpreter_index()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def max_tiles(total: int, num_seqs: int, block: int) -> int:
    """sum_b ceil(len_b / block) <= total // block + num_seqs, known from shapes alone."""
    return max(1, total // block + num_seqs)


def enumerate_jagged(counts: torch.Tensor, num_items: int):
    """(item_seq, item_index) int32 (num_items,): item p is the item_index-th of sequence item_seq
    when sequence b owns counts[b] consecutive items; items past the last get item_seq = -1."""
    ends = torch.cumsum(counts, 0)
    item = torch.arange(num_items, device=counts.device, dtype=ends.dtype)
    seq = torch.searchsorted(ends, item, right=True)
    valid = seq < counts.numel()
    seq = torch.clamp(seq, max=counts.numel() - 1)
    index = item - (ends[seq] - counts[seq])
    return torch.where(valid, seq, -1).to(torch.int32), torch.where(valid, index, 0).to(torch.int32)


def jagged_tiles(cu_seqlens: torch.Tensor, block: int, num_tiles: int):
    """Map programs to (sequence, local tile start) over a jagged batch, on the device.

    Tiles never straddle sequences. Programs past the last tile get tile_seq = -1.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tile_seq, tile_index = enumerate_jagged((lengths + block - 1) // block, num_tiles)
    return tile_seq, tile_index * block


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if POISON_ALLOCATIONS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def launch_configs(configs):
    """Autotune candidates; the interpreter would run each one, so it gets the first only."""
    return configs[:1] if interpreting() else configs


def pipeline_configs(max_stages: int = 3):
    """Candidates that change only warps and pipeline stages, never a tile size: the batch plan's
    tile maps and sparserec.flops follow the tiles, so those stay fixed per head dim. (4 warps with
    3 stages spilled in the backward kernels at head dim 64.)"""
    return launch_configs([triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (8, 3))
                           if s <= max_stages])


def prune_narrow_warps(widest: int = 64):
    """An autotune early_config_prune: head dims above `widest` keep 8 warps only. With 4, the fp32
    accumulators plus the q/do and k/v tiles need more than 255 registers a thread and ptxas spills
    (tools/compile_triton.py): above 64 in every attention kernel; from 64 on in the key-major
    backward, which also forms each step's dq tile, and in the sparse launch, whose backward also
    holds the compact and overflow programs' paths."""
    def prune(configs, named_args, **kwargs):
        wide = max(kwargs.get("BLOCK_D", 0), kwargs.get("BLOCK_DV", 0)) > widest
        return [c for c in configs if not wide or c.num_warps == 8] or configs[:1]
    return prune


def size_bucket(n: int) -> int:
    """An autotune key's size class, the next power of two of n: the best config follows the
    grid's size, but keying on n itself would retune (benchmark every config) for every batch."""
    return next_power_of_2(max(n, 1))


def chosen_config(kernel) -> triton.Config:
    return getattr(kernel, "best_config", None) or kernel.configs[0]


@triton.jit
def online_softmax_step(acc, row_max, row_sum, scores, v, PRECISION: tl.constexpr):
    """One key chunk of FlashAttention's forward, in log2 units: scores (rows, keys) scaled and -inf
    where hidden; state (acc, row_max, row_sum). A row that has seen no key keeps row_max = -inf and
    is shifted by 0, so exp2 gives 0, not NaN (no inf - inf)."""
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(scores - shift[:, None])
    alpha = tl.exp2(row_max - shift)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, new_max, row_sum


@triton.jit
def tile_bounds(tile_seq_ptr, tile_start_ptr, cu_seqlens_ptr, pid):
    seq = tl.load(tile_seq_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    safe = tl.maximum(seq, 0)
    bos = tl.load(cu_seqlens_ptr + safe).to(tl.int32)
    length = tl.load(cu_seqlens_ptr + safe + 1).to(tl.int32) - bos
    return seq, bos, length, start
