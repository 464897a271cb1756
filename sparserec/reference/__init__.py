"""Pure-PyTorch executable specifications: the oracle every fast path is tested against."""
from .jsa import (
    BRANCHES,
    compress_block_index,
    compressed_cu_seqlens,
    compressed_rows_bound,
    jsa_attention,
    jsa_compress,
    num_compressed_blocks,
    select_blocks,
)

__all__ = [
    "BRANCHES",
    "compress_block_index",
    "compressed_cu_seqlens",
    "compressed_rows_bound",
    "jsa_attention",
    "jsa_compress",
    "num_compressed_blocks",
    "select_blocks",
]
