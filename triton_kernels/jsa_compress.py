"""JSA block compression (SPEC §1 cmp), forward and backward, over packed jagged batches.

Compressed block i of a sequence covers its tokens [i*stride, i*stride + block); only full blocks
exist. Per kv head h:  out[i] = sum_r (x[i*stride + r] + pe[h, r]) @ W[h, r]  — a GEMM of the
gathered, flattened blocks (Tc, block*D) against W (block*D, D), which the forward kernel runs as
`block` accumulated (BLOCK_C, D) x (D, D) dots without materialising the gathered blocks.

Backward:
  dW[h, r]  = sum_i (x[i*stride + r] + pe[h, r])^T @ dout[i]   (split over blocks, summed after)
  dpe[h, r] = W[h, r] @ sum_i dout[i]                          (tiny; PyTorch)
  dx[t]     = sum over the blocks i covering t of dout[i] @ W[h, t - i*stride]^T.
The dx kernel walks "stride rows": row m of a sequence is its tokens [m*stride, (m+1)*stride), and
program axis 2 picks the offset rho within the row, so every dot uses one W[h, rho + j*stride] for
all rows of the tile (j = 0 .. ceil(block/stride) - 1, block m - j). Tokens no full block covers
get zero gradient.

The three kernels are autotuned per head dim, block (and stride), and power-of-two bucket of the
compressed row count (`rows_bucket`): the best tile follows the grid's size, and a bucket retunes
once per size class instead of once per batch length.
"""
import torch
import triton
import triton.language as tl

from .common import (HOPPER_SHARED_MEMORY, cdiv, chosen_config, dot_precision, empty, launch_configs, next_power_of_2,
                     size_bucket)
from .plan import compress_plan


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Offsets of each sequence's compressed blocks, computed on the device (no host sync)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = torch.where(lengths >= block, (lengths - block) // stride + 1, 0)
    return torch.cat([cu_seqlens.new_zeros(1), torch.cumsum(counts, 0).to(cu_seqlens.dtype)])


def _configs():
    return launch_configs([
        triton.Config({"BLOCK_C": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_C": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_C": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_C": 32}, num_warps=8, num_stages=2),  # what fp32 at head dim 128 keeps
    ])


def _fits_hopper(configs, named_args, **kwargs):
    """Drop configs that would not build well on Hopper (tools/compile_triton.py): pipelined tiles
    above a block's 227 KiB of shared memory (fp32 at head dim 128 asked for up to 321 KiB; the
    estimate, num_stages buffers of a (BLOCK_C + BLOCK_D) x BLOCK_D tile, errs high), and in fp32,
    whose tl.dot runs as FMA loops holding the (BLOCK_D, BLOCK_D) weight tile in registers, more
    than 64 registers a thread for that tile (it spilled at head dim 128 with 4 warps)."""
    element = next(a for a in named_args.values() if isinstance(a, torch.Tensor)).element_size()
    block_d = kwargs["BLOCK_D"]
    fits = [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_C"] + block_d) * block_d * element <= HOPPER_SHARED_MEMORY
            and (element < 4 or block_d * block_d <= 64 * 32 * c.num_warps)]
    return fits or [min(configs, key=lambda c: (c.kwargs["BLOCK_C"], -c.num_warps))]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK", "rows_bucket"],
                 prune_configs_by={"early_config_prune": _fits_hopper})
@triton.jit
def _compress_fwd(
    x_ptr, w_ptr, pe_ptr, out_ptr, start_ptr, num_blocks,
    stride_xt, stride_xh, stride_wh, stride_wr, stride_wd, stride_ph, stride_pr, stride_ot, stride_oh, rows_bucket,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_blocks
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    start = tl.load(start_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    real = start >= 0  # padding rows (start -1) are written as zeros
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for r in range(BLOCK):
        x = tl.load(x_ptr + (start + r)[:, None] * stride_xt + head * stride_xh + dims[None, :],
                    mask=real[:, None] & dim_ok[None, :], other=0.0)
        pe = tl.load(pe_ptr + head * stride_ph + r * stride_pr + dims, mask=dim_ok, other=0.0)
        w = tl.load(w_ptr + head * stride_wh + r * stride_wr + dims[:, None] * stride_wd + dims[None, :],
                    mask=dim_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = tl.dot((x + pe[None, :]).to(w.dtype), w, acc, input_precision=PRECISION)
    acc = tl.where(real[:, None], acc, 0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK", "rows_bucket"],
                 prune_configs_by={"early_config_prune": _fits_hopper})
@triton.jit
def _compress_bwd_dw(
    x_ptr, pe_ptr, dout_ptr, dw_ptr, start_ptr, num_blocks, blocks_per_split,
    stride_xt, stride_xh, stride_ph, stride_pr, stride_gt, stride_gh,
    stride_ws, stride_wh, stride_wr, stride_wd, rows_bucket,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    pe = tl.load(pe_ptr + head * stride_ph + r * stride_pr + dims, mask=dim_ok, other=0.0)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    lo = split * blocks_per_split
    for c0 in range(lo, lo + blocks_per_split, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        row_ok = (rows < lo + blocks_per_split) & (rows < num_blocks)
        start = tl.load(start_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mask = row_ok[:, None] & dim_ok[None, :]
        x = tl.load(x_ptr + (start + r)[:, None] * stride_xt + head * stride_xh + dims[None, :], mask=mask, other=0.0)
        x = tl.where(mask, x + pe[None, :], 0.0).to(x_ptr.dtype.element_ty)
        g = tl.load(dout_ptr + rows.to(tl.int64)[:, None] * stride_gt + head * stride_gh + dims[None, :],
                    mask=mask, other=0.0)
        acc = tl.dot(tl.trans(x), g, acc, input_precision=PRECISION)
    tl.store(dw_ptr + split * stride_ws + head * stride_wh + r * stride_wr + dims[:, None] * stride_wd + dims[None, :],
             acc, mask=dim_ok[:, None] & dim_ok[None, :])


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK", "STRIDE", "rows_bucket"],
                 prune_configs_by={"early_config_prune": _fits_hopper})
@triton.jit
def _compress_bwd_dx(
    dout_ptr, w_ptr, dx_ptr, row_seq_ptr, row_index_ptr, cu_seqlens_ptr, cu_cmp_ptr, num_rows,
    stride_gt, stride_gh, stride_wh, stride_wr, stride_wd, stride_xt, stride_xh, rows_bucket,
    BLOCK: tl.constexpr, STRIDE: tl.constexpr, NUM_SHIFTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rho = tl.program_id(2)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    seq = tl.load(row_seq_ptr + rows, mask=rows < num_rows, other=-1)
    m = tl.load(row_index_ptr + rows, mask=rows < num_rows, other=0)
    seq_ok = seq >= 0
    safe = tl.maximum(seq, 0)
    bos = tl.load(cu_seqlens_ptr + safe, mask=seq_ok, other=0).to(tl.int64)
    cmp_bos = tl.load(cu_cmp_ptr + safe, mask=seq_ok, other=0).to(tl.int32)
    num_cmp = tl.load(cu_cmp_ptr + safe + 1, mask=seq_ok, other=0).to(tl.int32) - cmp_bos
    pos = m * STRIDE + rho
    # Covered tokens: those inside the last full block of their sequence.
    row_ok = seq_ok & (pos < (num_cmp - 1) * STRIDE + BLOCK)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(NUM_SHIFTS):
        offset = rho + j * STRIDE
        if offset < BLOCK:
            block = m - j
            ok = row_ok & (block >= 0) & (block < num_cmp)
            g = tl.load(dout_ptr + (cmp_bos + block).to(tl.int64)[:, None] * stride_gt + head * stride_gh + dims[None, :],
                        mask=ok[:, None] & dim_ok[None, :], other=0.0)
            # W[h, offset] transposed: element (e, d) = W[h, offset, d, e].
            w_t = tl.load(w_ptr + head * stride_wh + offset * stride_wr + dims[None, :] * stride_wd + dims[:, None],
                          mask=dim_ok[:, None] & dim_ok[None, :], other=0.0)
            acc = tl.dot(g, w_t, acc, input_precision=PRECISION)
    tl.store(dx_ptr + (bos + pos)[:, None] * stride_xt + head * stride_xh + dims[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def compress_fwd(x, weight, pe, cu_seqlens, cu_cmp, num_blocks: int, block: int, stride: int, plan=None):
    """(num_blocks, Hkv, D) compressed keys or values; rows past cu_cmp[-1] are zeros. plan: the
    batch's `plan.CompressPlan` for these num_blocks (built here when None)."""
    _, kv_heads, dim = x.shape
    x, weight, pe = x.contiguous(), weight.contiguous(), pe.contiguous()
    out = empty((num_blocks, kv_heads, dim), x.dtype, x.device)
    if num_blocks == 0:
        return out
    starts = _plan(plan, cu_seqlens, cu_cmp, num_blocks, block, stride).starts
    grid = lambda meta: (cdiv(num_blocks, meta["BLOCK_C"]), kv_heads)  # noqa: E731
    _compress_fwd[grid](
        x, weight, pe, out, starts, num_blocks,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        pe.stride(0), pe.stride(1), out.stride(0), out.stride(1), size_bucket(num_blocks),
        BLOCK=block, HEAD_DIM=dim, BLOCK_D=max(16, next_power_of_2(dim)), PRECISION=dot_precision(x.dtype),
    )
    return out


def dw_splits(num_blocks: int, programs: int) -> int:
    """Split the block reduction of dW so that about 512 programs run, at >= 128 blocks each."""
    return max(1, min(cdiv(num_blocks, 128), cdiv(512, programs)))


def launch_geometry(head_dim: int) -> dict:
    """Tile sizes of this module's launches; sparserec.flops counts executed FLOPs from them. Each
    kernel's BLOCK_C is the one last chosen (before any launch: the first candidate); dW's split
    count for (num_blocks, programs) is `dw_splits`."""
    return dict(block_d=max(16, next_power_of_2(head_dim)), fwd_block_c=chosen_config(_compress_fwd).kwargs["BLOCK_C"],
                dw_block_c=chosen_config(_compress_bwd_dw).kwargs["BLOCK_C"],
                dx_block_c=chosen_config(_compress_bwd_dx).kwargs["BLOCK_C"], dw_splits=dw_splits)


def _plan(plan, cu_seqlens, cu_cmp, num_blocks: int, block: int, stride: int):
    if plan is None:
        return compress_plan(cu_seqlens, cu_cmp, num_blocks, block, stride)
    if plan.starts.shape[0] != num_blocks:
        raise ValueError(f"the compress plan covers {plan.starts.shape[0]} compressed rows, this call has {num_blocks}")
    return plan


def compress_bwd(dout, x, weight, pe, cu_seqlens, cu_cmp, block: int, stride: int, plan=None):
    """Gradients (dx, dweight, dpe) of `compress_fwd` given dout (Tc_total, Hkv, D)."""
    total, kv_heads, dim = x.shape
    num_blocks = dout.shape[0]
    dout, x, weight, pe = dout.contiguous(), x.contiguous(), weight.contiguous(), pe.contiguous()
    dx = torch.zeros_like(x)
    if num_blocks == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(pe)
    block_d = max(16, next_power_of_2(dim))
    precision = dot_precision(x.dtype)
    plan = _plan(plan, cu_seqlens, cu_cmp, num_blocks, block, stride)
    starts = plan.starts
    # Padding rows (start -1, past cu_cmp[-1]) are constants: their gradients are dropped here, and dW
    # reads token 0 for them (in bounds) times a zero gradient.
    real = starts >= 0
    dout = torch.where(real[:, None, None], dout, 0)
    starts = torch.where(real, starts, 0)

    splits = dw_splits(num_blocks, block * kv_heads)
    per_split = cdiv(num_blocks, splits)
    dw = torch.empty(splits, kv_heads, block, dim, dim, dtype=torch.float32, device=x.device)
    _compress_bwd_dw[(block, kv_heads, splits)](
        x, pe, dout, dw, starts, num_blocks, per_split,
        x.stride(0), x.stride(1), pe.stride(0), pe.stride(1), dout.stride(0), dout.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2), dw.stride(3), size_bucket(num_blocks),
        HEAD_DIM=dim, BLOCK=block, BLOCK_D=block_d, PRECISION=precision,
    )
    dweight = dw.sum(0).to(weight.dtype)
    dpe = torch.einsum("hrde,he->hrd", weight.float(), dout.float().sum(0)).to(pe.dtype)

    shifts = cdiv(block, stride)
    row_seq, row_index, num_rows = plan.dx_row_seq, plan.dx_row_index, plan.dx_row_seq.shape[0]
    grid = lambda meta: (cdiv(num_rows, meta["BLOCK_C"]), kv_heads, stride)  # noqa: E731
    _compress_bwd_dx[grid](
        dout, weight, dx, row_seq, row_index, cu_seqlens, cu_cmp, num_rows,
        dout.stride(0), dout.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        dx.stride(0), dx.stride(1), size_bucket(num_blocks),
        BLOCK=block, STRIDE=stride, NUM_SHIFTS=shifts, HEAD_DIM=dim, BLOCK_D=block_d, PRECISION=precision,
    )
    return dx, dweight, dpe
