"""Input checks of the public ops: a clear ValueError/TypeError instead of a crash or a wrong answer.

Shape, dtype and device checks are free. Value checks (cu_seqlens monotone, compressed block
counts, gates in [0, 1]) read the data on the host: free for CPU tensors, a device synchronisation
for CUDA tensors. So they run for CPU tensors, and for CUDA tensors only when the environment sets
SPARSEREC_CHECK_VALUES=1 (debugging; never while a CUDA graph is being captured); never while
torch.compile traces.
"""
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHECK_VALUES_ENV = "SPARSEREC_CHECK_VALUES"


def _reads_values_allowed(*tensors) -> bool:
    if torch.compiler.is_compiling() or any(t.device.type == "meta" for t in tensors):
        return False
    if any(t.device.type != "cpu" for t in tensors):
        return os.environ.get(CHECK_VALUES_ENV) == "1" and not (
            any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing())
    return True


def check_tensor(name, x, ndim=None, dtypes=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_cu_seqlens(cu_seqlens, total: int, name: str = "cu_seqlens", items: str = "packed tokens",
                     padded: bool = False):
    """padded: `total` rows may hold padding after the last sequence (cu_seqlens[-1] <= total)."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets (one sequence), got {cu_seqlens.numel()}")
    if not _reads_values_allowed(cu_seqlens):
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}]={values[i]} < "
                             f"{name}[{i - 1}]={values[i - 1]}")
    if values[-1] > total if padded else values[-1] != total:
        raise ValueError(f"{name}[-1] ({values[-1]}) must {'not exceed' if padded else 'equal'} the number of "
                         f"{items} ({total})")


def check_jsa_compress(x, weight, pe, cu_seqlens, block, stride, num_blocks=None, name="k"):
    check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("pe", pe, ndim=3, dtypes=FLOAT_DTYPES)
    for arg, value in (("block", block), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if stride > block:
        raise ValueError(f"stride ({stride}) must not exceed block ({block})")
    _, kv_heads, dim = x.shape
    if tuple(weight.shape) != (kv_heads, block, dim, dim):
        raise ValueError(f"weight must have shape (Hkv, block, D, D) = {(kv_heads, block, dim, dim)}, "
                         f"got {tuple(weight.shape)}")
    if tuple(pe.shape) != (kv_heads, block, dim):
        raise ValueError(f"pe must have shape (Hkv, block, D) = {(kv_heads, block, dim)}, got {tuple(pe.shape)}")
    if weight.dtype != x.dtype or pe.dtype != x.dtype:
        raise TypeError(f"{name}, weight and pe must share a dtype, got {x.dtype}, {weight.dtype}, {pe.dtype}")
    check_same_device(**{name: x}, weight=weight, pe=pe, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, x.shape[0])
    if num_blocks is None:
        return
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, torch.SymInt)) or num_blocks < 0:
        raise ValueError(f"num_blocks must be None or a non-negative int, got {num_blocks!r}")
    if _reads_values_allowed(cu_seqlens):
        from ..reference.jsa import compressed_cu_seqlens

        needed = int(compressed_cu_seqlens(cu_seqlens, block, stride)[-1])
        if num_blocks < needed:
            raise ValueError(f"num_blocks ({num_blocks}) is below the {needed} compressed blocks of these "
                             f"sequences (block={block}, stride={stride}); T_total // stride always suffices")


def check_jsa_attention(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, config):
    from ..config import JSAConfig
    from ..reference.jsa import num_compressed_blocks

    if not isinstance(config, JSAConfig):
        raise TypeError(f"config must be a sparserec.JSAConfig, got {type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)
    total, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape[0] != total or k.shape[2] != dim or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k must have shape (T_total={total}, Hkv, D={dim}) and v (T_total={total}, Hkv, Dv), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    value_dim = v.shape[2]
    if (tuple(k_cmp.shape[1:]) != (kv_heads, dim) or tuple(v_cmp.shape[1:]) != (kv_heads, value_dim)
            or k_cmp.shape[0] != v_cmp.shape[0]):
        raise ValueError(f"k_cmp must have shape (Tc_total, Hkv={kv_heads}, D={dim}) and v_cmp (Tc_total, "
                         f"Hkv={kv_heads}, Dv={value_dim}), got k_cmp {tuple(k_cmp.shape)}, v_cmp {tuple(v_cmp.shape)}")
    dtypes = {x.dtype for x in (q, k, v, k_cmp, v_cmp, gates)}
    check_tensor("gates", gates, ndim=3, dtypes=FLOAT_DTYPES)
    if tuple(gates.shape) != (total, heads, 4):
        raise ValueError(f"gates must have shape (T_total, H, 4) = {(total, heads, 4)}, got {tuple(gates.shape)}")
    if len(dtypes) > 1:
        raise TypeError(f"q, k, v, k_cmp, v_cmp and gates must share a dtype, got {sorted(map(str, dtypes))}")
    check_tensor("anchor_mask", anchor_mask, ndim=1, dtypes=(torch.bool,))
    if anchor_mask.shape[0] != total:
        raise ValueError(f"anchor_mask must have one entry per token ({total}), got {anchor_mask.shape[0]}")
    check_same_device(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gates=gates, anchor_mask=anchor_mask,
                      cu_seqlens=cu_seqlens, cu_cmp=cu_cmp)
    check_cu_seqlens(cu_seqlens, total)
    check_cu_seqlens(cu_cmp, k_cmp.shape[0], name="cu_cmp", items="rows of k_cmp", padded=True)
    if cu_cmp.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_cmp must describe the same {cu_seqlens.numel() - 1} sequences as cu_seqlens, "
                         f"got {cu_cmp.numel() - 1}")
    if not _reads_values_allowed(q, gates, cu_seqlens):
        return
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = (cu_cmp[1:] - cu_cmp[:-1]).tolist()
    for i, (n, c) in enumerate(zip(lengths, counts)):
        expected = num_compressed_blocks(n, config.block, config.stride)
        if c != expected:
            raise ValueError(f"sequence {i} has {n} tokens, hence {expected} compressed blocks for "
                             f"block={config.block}, stride={config.stride}, but cu_cmp gives it {c}")
    if gates.numel():
        low, high = torch.aminmax(gates.detach())
        if torch.isnan(low) or torch.isnan(high):
            raise ValueError("gates hold NaN (a module computes them from its input: is the input finite?)")
        if not (low >= 0 and high <= 1):
            raise ValueError(f"gates must lie in [0, 1] (got min {low.item():.4g}, max {high.item():.4g}); "
                             "apply a sigmoid first")


def check_jsa_plan(cu_seqlens, anchor_mask, config, head_dim, value_dim, group):
    from ..config import JSAConfig

    if not isinstance(config, JSAConfig):
        raise TypeError(f"config must be a sparserec.JSAConfig, got {type(config).__name__}")
    for name, value in (("head_dim", head_dim), ("value_dim", value_dim), ("group", group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_tensor("anchor_mask", anchor_mask, ndim=1, dtypes=(torch.bool,))
    check_same_device(cu_seqlens=cu_seqlens, anchor_mask=anchor_mask)
    check_cu_seqlens(cu_seqlens, anchor_mask.shape[0], items="entries of anchor_mask")


def check_plan_fits(plan, cu_seqlens, anchor_mask=None, **call):
    """A plan serves only the batch it was built for (cu_seqlens and, given, anchor_mask: compared
    by value where values may be read) and the call's `backend`, `tokens` and whichever of `config`,
    `block`, `stride`, `head_dim`, `value_dim`, `group`, `compressed_rows` the caller passes."""
    from .jsa import JSAPlan

    if not isinstance(plan, JSAPlan):
        raise TypeError(f"plan must be a sparserec.ops.JSAPlan from jsa_plan(), got {type(plan).__name__}")
    built = dict(backend=plan.backend, config=plan.config, block=plan.config.block, stride=plan.config.stride,
                 tokens=plan.num_tokens, sequences=plan.cu_cmp.numel() - 1, head_dim=plan.head_dim,
                 value_dim=plan.value_dim, group=plan.group, compressed_rows=plan.num_cmp_rows)
    call["sequences"] = cu_seqlens.numel() - 1
    wrong = [f"{key} {built[key]!r} (this call: {value!r})" for key, value in call.items()
             if value is not None and built[key] != value]
    if wrong:
        raise ValueError("the plan was built for another call: " + ", ".join(wrong))
    if not _reads_values_allowed(cu_seqlens, plan.cu_seqlens):
        return
    if not torch.equal(cu_seqlens.long(), plan.cu_seqlens.long()):
        raise ValueError("cu_seqlens differs from the plan's: the plan was built for another batch")
    if anchor_mask is not None and not torch.equal(anchor_mask, plan.anchor_mask):
        raise ValueError("anchor_mask differs from the plan's: the plan was built for other anchors")
