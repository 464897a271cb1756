"""Public JSA functionals (SPEC §2): validate, pick a backend, run it."""
from ..config import JSAConfig
from . import validate
from .dispatch import resolve


def jsa_compress(x, weight, pe, cu_seqlens, block: int, stride: int, backend: str = "auto", num_blocks=None):
    """Compress keys (or values) into one vector per block: (Tc_total, Hkv, D), cu_cmp.

    x (T_total, Hkv, D); weight (Hkv, block, D, D); pe (Hkv, block, D); cu_seqlens (B+1,).
    Block i of a sequence covers its tokens [i*stride, i*stride + block); only full blocks exist.
    Tc_total = cu_cmp[-1] depends on the lengths, so finding it reads the device (a sync on a GPU);
    num_blocks, a bound such as `reference.compressed_rows_bound(T_total, stride)`, sizes the output
    instead: (num_blocks, Hkv, D) with zero rows past Tc_total, which `jsa_attention` never reads.
    """
    validate.check_jsa_compress(x, weight, pe, cu_seqlens, block, stride, num_blocks)
    return resolve(backend, x.device, x.dtype).compress(x, weight, pe, cu_seqlens, block, stride, num_blocks)


def jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp,
                  config: JSAConfig = JSAConfig(), backend: str = "auto"):
    """Journey-aware sparse attention (SPEC §1) over a packed jagged batch -> (T_total, H, Dv).

    q (T_total, H, D); k (T_total, Hkv, D); v (T_total, Hkv, Dv); k_cmp, v_cmp, cu_cmp from
    `jsa_compress`; gates (T_total, H, 4) in [0, 1] ordered (cmp, slc, jrn, win); anchor_mask
    (T_total,) bool. Dv may differ from D (every backend): extra value columns, e.g. action
    embeddings, ride the same softmax.
    """
    validate.check_jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config)
    return resolve(backend, q.device, q.dtype).attention(
        q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config=config)
