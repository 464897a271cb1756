"""Random JSA inputs for tests: packed jagged batches with compressed K/V, gates and anchors."""
from dataclasses import dataclass

import torch

from sparserec import JSAConfig
from sparserec.reference import jsa_compress


@dataclass
class JSAInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    gates: torch.Tensor
    anchor_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_cmp: torch.Tensor
    weight_k: torch.Tensor
    weight_v: torch.Tensor
    pe_k: torch.Tensor
    pe_v: torch.Tensor

    def attention_args(self):
        return (self.q, self.k, self.v, self.k_cmp, self.v_cmp, self.gates, self.anchor_mask,
                self.cu_seqlens, self.cu_cmp)

    def to(self, dtype):
        """Same values in another dtype (anchor mask and offsets unchanged)."""
        fields = {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in vars(self).items()}
        return JSAInputs(**fields)


def cu_from_lengths(lengths, device="cpu"):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=device)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu


def make_inputs(lengths, config: JSAConfig, heads=4, kv_heads=2, dim=16, anchor_rate=0.2,
                dtype=torch.float64, seed=0, device="cpu", value_dim=None) -> JSAInputs:
    """value_dim: the width Dv of v and v_cmp (default: dim)."""
    value_dim = value_dim or dim
    gen = torch.Generator().manual_seed(seed)
    cu = cu_from_lengths(lengths, device)
    total = sum(lengths)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    q, k, v = randn(total, heads, dim), randn(total, kv_heads, dim), randn(total, kv_heads, value_dim)
    block = config.block
    weight_k, weight_v = (randn(kv_heads, block, width, width, scale=(block * width) ** -0.5)
                          for width in (dim, value_dim))
    pe_k, pe_v = randn(kv_heads, block, dim, scale=0.1), randn(kv_heads, block, value_dim, scale=0.1)
    k_cmp, cu_cmp = jsa_compress(k, weight_k, pe_k, cu, block, config.stride)
    v_cmp, _ = jsa_compress(v, weight_v, pe_v, cu, block, config.stride)
    gates = torch.rand(total, heads, 4, generator=gen, dtype=torch.float64).to(dtype).to(device)
    anchor_mask = (torch.rand(total, generator=gen) < anchor_rate).to(device)
    return JSAInputs(q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu, cu_cmp, weight_k, weight_v, pe_k, pe_v)
