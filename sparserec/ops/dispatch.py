"""The one backend dispatcher: which implementation serves a JSA call, and why the others cannot.

Backends (fastest first per device):
  triton     fused Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cuda       PyTorch math with the compiled CUDA top-N selection (sparserec._C built with CUDA)
  cpp        fused C++ kernels: compression, and cmp + top-N + slc/jrn/win + gates in one pass, fwd and bwd
             (sparserec._C, CPU float32/float64 tensors)
  reference  the pure-PyTorch executable spec (any device)
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Each function returns None when it can serve, else the reason it cannot.
Check = Callable[..., Optional[str]]


def _no_maps(*batch):
    return (), ()


@dataclass(frozen=True)
class Backend:
    name: str
    unavailable: Callable[[], Optional[str]]
    unsupported: Check  # (device, dtype) -> reason or None
    attention: Callable  # (q, ..., cu_cmp, config=, plan=) -> out
    compress: Callable   # (x, weight, pe, cu_seqlens, block, stride, num_blocks, plan=) -> (x_cmp, cu_cmp)
    # (cu_seqlens, cu_cmp, anchor_mask, config, head_dim, value_dim, group, num_cmp_rows) -> the backend's
    # own per-batch index maps (compress, attention) for a JSAPlan; none by default
    plan: Callable = _no_maps


_REGISTRY: dict = {}
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}


def register_backend(backend: Backend):
    _REGISTRY[backend.name] = backend


def _registry():
    return _REGISTRY  # filled by sparserec.ops.backends, which sparserec.ops imports


def backends() -> dict:
    """{name: None if usable here, else why not}."""
    return {name: backend.unavailable() for name, backend in _registry().items()}


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    registry = _registry()
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            backend = registry.get(candidate)
            if backend and backend.unavailable() is None and backend.unsupported(device, dtype) is None:
                return backend
        raise ValueError(f"no JSA backend serves {dtype} tensors on {device}")
    if name not in registry:
        raise ValueError(f"unknown backend {name!r}; choose from {['auto', *registry]}")
    backend = registry[name]
    reason = backend.unavailable() or backend.unsupported(device, dtype)
    if reason:
        raise ValueError(f"backend {name!r} cannot serve {dtype} tensors on {device}: {reason}")
    return backend
