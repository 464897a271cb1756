"""Loads the compiled extension `sparserec._C` if it was built; importing sparserec never fails."""
import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.sparserec.*)

    EXTENSION_ERROR = None
except ImportError as error:  # pure-Python install, or a build for another torch
    EXTENSION_ERROR = f"compiled extension sparserec._C not importable: {error}"


def has_extension() -> bool:
    return EXTENSION_ERROR is None


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources (SPARSEREC_WITH_CUDA)."""
    if not has_extension():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("sparserec::jsa_select", "CUDA")
