"""Shared test set-up. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before any test module imports triton, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
