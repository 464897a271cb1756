"""Public JSA functionals (SPEC §2): validate, pick a backend, run it."""
from typing import NamedTuple

import torch

from ..config import JSAConfig
from ..reference.jsa import compressed_cu_seqlens, compressed_rows_bound
from . import validate
from .dispatch import resolve


class JSAPlan(NamedTuple):
    """What a batch's JSA calls derive from its lengths and anchors, built once by `jsa_plan` on the
    device (no host read) and passed to every layer's `jsa_compress` and `jsa_attention`, forward
    and backward. cu_seqlens, anchor_mask: the batch it was built for; group: query heads per kv
    head (the Triton walk packs a group into its tiles' rows); cu_cmp: compressed-block
    offsets (B+1,); num_cmp_rows: the static bound T_total // stride that sizes compressed tensors;
    compress, attention: the backend's own index maps (the Triton backend's tile maps and packed
    anchor index; () for backends that keep none)."""
    cu_seqlens: torch.Tensor
    anchor_mask: torch.Tensor
    backend: str
    config: JSAConfig
    num_tokens: int
    head_dim: int
    value_dim: int
    group: int
    num_cmp_rows: int
    cu_cmp: torch.Tensor
    compress: tuple
    attention: tuple


def jsa_plan(cu_seqlens, anchor_mask, config: JSAConfig, head_dim: int, value_dim=None,
             dtype: torch.dtype = torch.float32, backend: str = "auto", group: int = 1) -> JSAPlan:
    """The plan of a batch (cu_seqlens (B+1,), anchor_mask (T_total,) bool) for JSA layers of
    `config` with key width head_dim, value width value_dim (default head_dim) and `group` query
    heads per kv head (1: multi-head attention) on `backend` (resolved for dtype and the batch's
    device)."""
    value_dim = head_dim if value_dim is None else value_dim
    validate.check_jsa_plan(cu_seqlens, anchor_mask, config, head_dim, value_dim, group)
    chosen = resolve(backend, cu_seqlens.device, dtype)
    total = anchor_mask.shape[0]
    rows = compressed_rows_bound(total, config.stride)
    cu_cmp = compressed_cu_seqlens(cu_seqlens, config.block, config.stride)
    compress, attention = chosen.plan(cu_seqlens, cu_cmp, anchor_mask, config, head_dim, value_dim, group, rows)
    return JSAPlan(cu_seqlens, anchor_mask, chosen.name, config, total, head_dim, value_dim, group, rows, cu_cmp,
                   tuple(compress), tuple(attention))


def jsa_compress(x, weight, pe, cu_seqlens, block: int, stride: int, backend: str = "auto", num_blocks=None,
                 plan=None):
    """Compress keys (or values) into one vector per block: (Tc_total, Hkv, D), cu_cmp.

    x (T_total, Hkv, D); weight (Hkv, block, D, D); pe (Hkv, block, D); cu_seqlens (B+1,).
    Block i of a sequence covers its tokens [i*stride, i*stride + block); only full blocks exist.
    Tc_total = cu_cmp[-1] depends on the lengths, so finding it reads the device (a sync on a GPU);
    num_blocks, a bound such as `reference.compressed_rows_bound(T_total, stride)`, sizes the output
    instead: (num_blocks, Hkv, D) with zero rows past Tc_total, which `jsa_attention` never reads.
    plan: the batch's `jsa_plan`; the output then has plan.num_cmp_rows rows and cu_cmp is plan.cu_cmp.
    """
    validate.check_jsa_compress(x, weight, pe, cu_seqlens, block, stride, num_blocks)
    chosen = resolve(backend, x.device, x.dtype)
    if plan is not None:
        validate.check_plan_fits(plan, cu_seqlens, backend=chosen.name, tokens=x.shape[0], block=block, stride=stride,
                                 compressed_rows=num_blocks)
        num_blocks = plan.num_cmp_rows
    return chosen.compress(x, weight, pe, cu_seqlens, block, stride, num_blocks, plan=plan)


def jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp,
                  config: JSAConfig = JSAConfig(), backend: str = "auto", plan=None):
    """Journey-aware sparse attention (SPEC §1) over a packed jagged batch -> (T_total, H, Dv).

    q (T_total, H, D); k (T_total, Hkv, D); v (T_total, Hkv, Dv); k_cmp, v_cmp, cu_cmp from
    `jsa_compress`; gates (T_total, H, 4) in [0, 1] ordered (cmp, slc, jrn, win); anchor_mask
    (T_total,) bool. Dv may differ from D (every backend): extra value columns, e.g. action
    embeddings, ride the same softmax. plan: the batch's `jsa_plan` for this config and widths.
    """
    validate.check_jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config)
    chosen = resolve(backend, q.device, q.dtype)
    if plan is not None:
        validate.check_plan_fits(plan, cu_seqlens, anchor_mask, backend=chosen.name, config=config,
                                 tokens=q.shape[0], head_dim=q.shape[-1], value_dim=v.shape[-1],
                                 group=q.shape[1] // max(k.shape[1], 1), compressed_rows=k_cmp.shape[0])
    return chosen.attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config=config, plan=plan)
