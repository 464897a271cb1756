"""The built-in JSA backends, registered with the dispatcher."""
import importlib.util
import os

import torch

from .. import reference
from .._ext import EXTENSION_ERROR, has_cuda_kernels, has_extension
from .dispatch import Backend, register_backend


def _always():
    return None


def _any_device(device, dtype):
    return None


def _device_only(kind):
    def unsupported(device, dtype):
        return None if device.type == kind else f"needs {kind} tensors"
    return unsupported


def _ignoring_plan(function):
    """For backends that keep no per-batch maps: ops.jsa_compress has already sized num_blocks
    from the plan, and the attention takes cu_cmp as an argument."""
    def call(*args, plan=None, **kwargs):
        return function(*args, **kwargs)
    return call


def _compiled_select_attention(*args, config, **kwargs):
    from .select import jsa_select

    return reference.jsa_attention(*args, config=config, select_fn=jsa_select, **kwargs)


def _fused_cpu_unsupported(device, dtype):
    if device.type != "cpu":
        return f"needs CPU tensors, got {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return f"the fused C++ kernels support float32 and float64, got {dtype}"
    return None


def _fused_cpu(entry):
    def call(*args, **kwargs):
        from . import fused_cpu

        return getattr(fused_cpu, entry)(*args, **kwargs)
    return call


register_backend(Backend("reference", _always, _any_device, _ignoring_plan(reference.jsa_attention),
                         _ignoring_plan(reference.jsa_compress)))
register_backend(Backend(
    "cpp", lambda: None if has_extension() else EXTENSION_ERROR, _fused_cpu_unsupported,
    _ignoring_plan(_fused_cpu("attention")), _fused_cpu("compress")))
register_backend(Backend(
    "cuda",
    lambda: None if has_cuda_kernels() else (EXTENSION_ERROR or "sparserec._C was built without CUDA"),
    _device_only("cuda"), _ignoring_plan(_compiled_select_attention), _ignoring_plan(reference.jsa_compress)))


def _triton_unavailable():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, slowly)"
    return None


def _triton_unsupported(device, dtype):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (device.type == "cpu" and interpreting):
        return f"needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"supports float16, bfloat16 and float32, got {dtype}"
    if interpreting and dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16"
    return None


def _triton(entry):
    """Imports the Triton backend on first use: `import sparserec` stays free of triton."""
    def call(*args, **kwargs):
        from . import triton_backend

        return getattr(triton_backend, entry)(*args, **kwargs)
    return call


register_backend(Backend("triton", _triton_unavailable, _triton_unsupported, _triton("attention"), _triton("compress"),
                         _triton("plan")))
