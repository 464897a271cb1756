"""JSAConfig: the hyper-parameters of Journey-aware Sparse Attention (SPEC §1), self-validating."""
from dataclasses import dataclass


@dataclass(frozen=True)
class JSAConfig:
    """Block sizes and budgets of the four JSA branches.

    block (l) and stride (d): compressed block i covers tokens [i*d, i*d + l).
    select_block (l'): selection block j covers [j*l', (j+1)*l'); a multiple of stride.
    top_n (N): selection blocks attended per query tile and kv head.
    select_q_block (Bq): queries share a selection within aligned tiles of Bq tokens.
    window (w): sliding-window width (causal: t-w < s <= t; bidirectional: |t-s| < w).
    causal: decoder (True) or encoder (False) attention.
    """

    block: int = 32
    stride: int = 16
    select_block: int = 32
    top_n: int = 3
    select_q_block: int = 64
    window: int = 64
    causal: bool = False

    def __post_init__(self):
        for name in ("block", "stride", "select_block", "top_n", "select_q_block", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"JSAConfig.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"JSAConfig.{name} must be >= 1, got {value}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"JSAConfig.causal must be a bool, got {type(self.causal).__name__}")
        if self.stride > self.block:
            raise ValueError(
                f"JSAConfig.stride ({self.stride}) must not exceed block ({self.block}): "
                "tokens between blocks would never be compressed"
            )
        if self.select_block % self.stride:
            raise ValueError(
                f"JSAConfig.select_block ({self.select_block}) must be a multiple of "
                f"stride ({self.stride})"
            )
