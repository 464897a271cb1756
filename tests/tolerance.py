"""The one tolerance rule for fast kernels against the reference (FlashAttention's test rule).

A kernel's result is compared with the reference run in float64, and its error must not exceed
`factor` times the error of the reference run in the kernel's own dtype, plus `atol` (which only
matters where the same-dtype reference is nearly exact, e.g. float32 against float64).
"""
import torch


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(out, ref_same_dtype, ref_fp64, factor=2.0, atol=0.0, name="output"):
    """max|out - ref_fp64| <= factor * max|ref_same_dtype - ref_fp64| + atol, and out finite."""
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    error = max_error(out, ref_fp64)
    baseline = max_error(ref_same_dtype, ref_fp64)
    bound = factor * baseline + atol
    assert error <= bound, (f"{name}: max error {error:.3g} > {factor} x reference error "
                            f"{baseline:.3g} + atol {atol:.3g} = {bound:.3g}")
