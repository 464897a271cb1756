"""JourneySparseAttention: packed and padded input agree, every parameter learns, bad input is named."""
import pytest
import torch

import sparserec
from jsa_inputs import cu_from_lengths
from sparserec import JSAConfig
from sparserec.nn import JourneySparseAttention

CONFIG = JSAConfig(block=8, stride=4, select_block=8, top_n=2, select_q_block=8, window=4)


def make_module(compress, causal=False, heads=4, kv_heads=2):
    torch.manual_seed(0)
    config = JSAConfig(**{**CONFIG.__dict__, "causal": causal})
    return JourneySparseAttention(32, heads, kv_heads, config=config, compress=compress).double()


@pytest.mark.parametrize("compress", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_equals_packed(compress, causal):
    module = make_module(compress, causal)
    lengths = [20, 15, 1]
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    padding = torch.arange(20)[None, :] >= torch.tensor(lengths)[:, None]
    anchors = torch.rand(3, 20) < 0.2
    padded = module(x, key_padding_mask=padding, anchor_mask=anchors)
    packed = module(x[~padding], cu_seqlens=cu_from_lengths(lengths), anchor_mask=anchors[~padding])
    torch.testing.assert_close(padded[~padding], packed)
    assert torch.equal(padded[padding], torch.zeros_like(padded[padding]))


@pytest.mark.parametrize("compress", ["mlp", "linear"])
def test_every_parameter_gets_gradient(compress):
    module = make_module(compress, causal=True)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    module(x, anchor_mask=torch.rand(2, 40) < 0.3).square().sum().backward()
    for name, param in module.named_parameters():
        if compress == "linear" and name == "k_compress.pe":
            # SPEC §1: a linear map makes pe_k a per-sequence shift of every compressed key.
            assert param.grad.abs().max() < 1e-10, name
        else:
            assert param.grad is not None and param.grad.abs().max() > 0, name


def test_flops_method_uses_module_shape():
    module = make_module("linear")
    flops = module.flops([64, 100])
    assert flops.dense == 4 * module.head_dim * 4 * (64**2 + 100**2)
    assert 0 < flops.useful


def test_bad_module_input():
    module = make_module("mlp")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        module(torch.randn(10, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="packed or .* padded"):
        module(torch.randn(10, 31, dtype=torch.float64), cu_seqlens=cu_from_lengths([10]))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        module(torch.randn(2, 5, 32, dtype=torch.float64), key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module([1.0, 2.0])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        JourneySparseAttention(32, 4, 3)
    with pytest.raises(ValueError, match="compress must be one of"):
        JourneySparseAttention(32, 4, compress="conv")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_mlp_compressor_is_the_flattened_block_mlp(backend):
    """The mlp compressor runs on jsa_compress; it must equal NSA's φ written out: gather each block,
    flatten it with pe, apply the head's Linear-GELU-Linear. Forward and gradients, fp64."""
    if sparserec.backends()[backend] is not None:
        pytest.skip(sparserec.backends()[backend])
    from sparserec.nn.jsa import MLPCompressor
    from sparserec.reference.jsa import compress_block_index

    torch.manual_seed(1)
    compressor = MLPCompressor(kv_heads=2, block=8, head_dim=4).double()
    with torch.no_grad():
        compressor.pe.normal_()
    cu_seqlens = cu_from_lengths([20, 5, 33])
    x = torch.randn(58, 2, 4, dtype=torch.float64, requires_grad=True)
    out, cu_cmp = compressor(x, cu_seqlens, 8, 4, backend=backend)
    index, expected_cu = compress_block_index(cu_seqlens, 8, 4)
    blocks = (x[index] + compressor.pe.transpose(0, 1)).permute(2, 0, 1, 3)  # (Hkv, Tc, block, D)
    expected = torch.stack([mlp(b.flatten(1)) for mlp, b in zip(compressor.heads, blocks)], dim=1)
    assert torch.equal(cu_cmp, expected_cu)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    params = [x, compressor.pe, *compressor.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, grad, allow_unused=True),
                    torch.autograd.grad(expected, params, grad, allow_unused=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_bad_packed_input_is_named():
    module = make_module("mlp")
    x = torch.randn(12, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        module(x, cu_seqlens=[0, 5, 12])
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        module(x, cu_seqlens=torch.tensor([0, 9, 5, 12]))
    with pytest.raises(ValueError, match="gates hold NaN"):
        module(x * float("nan"), cu_seqlens=torch.tensor([0, 5, 12]))
