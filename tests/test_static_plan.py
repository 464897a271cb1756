"""Issue 14, item 2: the module's path reads no device data on the host.

Compressed tensors are sized by a static bound (`compressed_rows_bound` = T_total // stride rows,
zero-padded past cu_cmp[-1]); every backend must write those zeros, never read the padding in
attention, and ignore its gradients. Then a JourneySparseAttention forward and backward makes no
host read (a sync on a GPU) and traces whole under torch.compile(fullgraph=True). One batch plan
(`jsa_plan`: tile maps, packed anchors) serves every layer, forward and backward.
"""
import pytest
import torch
import triton
import triton.runtime.interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from sparserec import JSAConfig
from sparserec.nn import JourneySparseAttention
from sparserec.ops import backends, jsa_attention, jsa_compress, validate
from sparserec.reference import compressed_rows_bound

from jsa_inputs import make_inputs
from tolerance import assert_close_to_reference

CONFIG = JSAConfig(block=4, stride=2, select_block=4, top_n=2, select_q_block=4, window=3)
LENGTHS = [1, 7, 29, 3]  # sequences with no block, awkward sizes (small: the Triton interpreter is slow)
AVAILABLE = [name for name, reason in backends().items() if reason is None and name != "cuda"]


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("backend", AVAILABLE)
def test_compress_to_a_static_bound_pads_with_zeros_and_ignores_their_gradients(backend, poison_outputs):
    dtype = _dtype(backend)
    inputs = make_inputs(LENGTHS, CONFIG, dtype=torch.float64, seed=11)
    leaves = [t.to(dtype).requires_grad_() for t in (inputs.k, inputs.weight_k, inputs.pe_k)]
    rows = compressed_rows_bound(sum(LENGTHS), CONFIG.stride)
    real = int(inputs.cu_cmp[-1])
    assert real < rows
    padded, cu_cmp = jsa_compress(*leaves, inputs.cu_seqlens, CONFIG.block, CONFIG.stride, backend=backend,
                                  num_blocks=rows)
    assert padded.shape == (rows, *inputs.k_cmp.shape[1:]) and torch.equal(cu_cmp, inputs.cu_cmp)
    assert torch.equal(padded[real:], torch.zeros_like(padded[real:]))
    exact, _ = jsa_compress(*leaves, inputs.cu_seqlens, CONFIG.block, CONFIG.stride, backend=backend)
    torch.testing.assert_close(padded[:real], exact)

    # Gradients reaching the padding rows are ignored: they are constants.
    weights = torch.randn(rows, *padded.shape[1:], dtype=dtype)
    grads_padded = torch.autograd.grad((padded * weights).sum(), leaves)
    grads_exact = torch.autograd.grad((exact * weights[:real]).sum(), leaves)
    for got, want in zip(grads_padded, grads_exact):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_never_reads_compressed_padding(backend, causal, poison_outputs):
    """k_cmp / v_cmp end in NaN rows: the output and every gradient stay those of the exact tensors."""
    config = JSAConfig(**{**vars(CONFIG), "causal": causal})
    dtype = _dtype(backend)
    inputs = make_inputs(LENGTHS, config, dtype=torch.float64, seed=12).to(dtype)
    extra = compressed_rows_bound(sum(LENGTHS), config.stride) - inputs.k_cmp.shape[0]
    nan_rows = inputs.k_cmp.new_full((extra, *inputs.k_cmp.shape[1:]), float("nan"))
    args = list(inputs.attention_args())
    leaves = [t.clone().requires_grad_() for t in args[:6]]
    padded_cmp = [torch.cat([leaves[i], nan_rows]) for i in (3, 4)]
    out_padded = jsa_attention(*leaves[:3], *padded_cmp, leaves[5], *args[6:], config=config, backend=backend)
    out_exact = jsa_attention(*leaves, *args[6:], config=config, backend=backend)
    assert torch.isfinite(out_padded).all()
    torch.testing.assert_close(out_padded, out_exact, rtol=0, atol=0)
    grad_out = torch.randn_like(out_exact)
    grads_padded = torch.autograd.grad(out_padded, leaves + padded_cmp, grad_out)
    grads_exact = torch.autograd.grad(out_exact, leaves, grad_out)
    for got, want in zip(grads_padded, grads_exact):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for grad_cmp in grads_padded[6:]:  # the padding rows get zero gradients
        assert torch.equal(grad_cmp[-extra:], torch.zeros_like(grad_cmp[-extra:]))


class HostReads(TorchDispatchMode):
    """Counts reads of tensor data on the host: item()/int()/bool() (aten._local_scalar_dense) and tolist()."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_policy(monkeypatch):
    """Value checks as for CUDA tensors (they read data, so they run only with SPARSEREC_CHECK_VALUES=1);
    the kernels still run on CPU tensors."""
    monkeypatch.setattr(validate, "_reads_values_allowed", lambda *tensors: False)


def _module_step(module, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, module.embed_dim, generator=gen, requires_grad=True)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    anchors = torch.rand(total, generator=gen) < 0.2
    return x, cu_seqlens, anchors


@pytest.mark.parametrize("backend, compress", [(b, c) for b, c in (("cpp", "mlp"), ("cpp", "linear"), ("triton", "mlp"))
                                               if b in AVAILABLE])
def test_module_forward_and_backward_make_no_host_read(backend, compress, device_policy, monkeypatch):
    torch.manual_seed(0)
    module = JourneySparseAttention(32, 4, 2, config=CONFIG, backend=backend, compress=compress)
    x, cu_seqlens, anchors = _module_step(module, LENGTHS)
    tolist_calls = []
    original_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist_calls.append(1) or original_tolist(self))
    launches = {"forward": [], "backward": []}
    phase = ["forward"]
    run = triton.runtime.interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launches[phase[0]].append(self.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "run", counted_run)
    with HostReads() as forward_reads:
        out = module(x, cu_seqlens, anchors)
    phase[0] = "backward"
    with HostReads() as backward_reads:
        out.square().sum().backward()
    assert forward_reads.reads == [] and backward_reads.reads == [] and tolist_calls == []
    assert torch.isfinite(x.grad).all()
    if backend == "triton":
        # Forward: one compression of K and V together, cmp with its selection, sparse. Backward:
        # compression dW and dx; the query-major dq walk of all four branches with the compact keys
        # (anchors' jrn part, compressed blocks' dk/dv) in one launch; selection blocks (slc, win).
        # Issue 14's target: 3 forward and 4 backward.
        assert (len(launches["forward"]), len(launches["backward"])) == (3, 4), launches


@pytest.mark.gpu
@pytest.mark.parametrize("compress", ["mlp", "linear"])
def test_module_never_synchronises_on_cuda(compress):
    """The real check on a GPU: torch's sync debug mode raises on any synchronising call."""
    torch.manual_seed(0)
    module = JourneySparseAttention(256, 8, 2, config=JSAConfig(), backend="triton", compress=compress).cuda()
    lengths = [1, 700, 33, 2048, 97]
    x, cu_seqlens, anchors = (t.detach().cuda() for t in _module_step(module, lengths))
    x.requires_grad_()
    module(x, cu_seqlens, anchors).sum().backward()  # autotuning benchmarks (and syncs) on first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x, cu_seqlens, anchors).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend, compress", [(b, c) for b, c in (("cpp", "mlp"), ("cpp", "linear"), ("triton", "mlp"))
                                               if b in AVAILABLE])
def test_module_traces_whole_under_torch_compile(backend, compress):
    """fullgraph=True fails on any graph break; dynamic shapes: batches of other lengths reuse the graph."""
    torch.manual_seed(0)
    module = JourneySparseAttention(32, 4, 2, config=CONFIG, backend=backend, compress=compress)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager", dynamic=True)
    for seed, lengths in enumerate(([5, 12, 2], [9, 1, 4, 6])):
        x, cu_seqlens, anchors = _module_step(module, lengths, seed=seed)
        out = compiled(x, cu_seqlens, anchors)
        (grad_compiled,) = torch.autograd.grad(out.sum(), x)
        expected = module(x, cu_seqlens, anchors)
        (grad_eager,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad_compiled, grad_eager)


def test_num_blocks_below_the_block_count_is_refused():
    inputs = make_inputs([9, 5], CONFIG)
    with pytest.raises(ValueError, match="num_blocks .* below"):
        jsa_compress(inputs.k, inputs.weight_k, inputs.pe_k, inputs.cu_seqlens, CONFIG.block, CONFIG.stride,
                     num_blocks=int(inputs.cu_cmp[-1]) - 1)
    with pytest.raises(ValueError, match="num_blocks must be"):
        jsa_compress(inputs.k, inputs.weight_k, inputs.pe_k, inputs.cu_seqlens, CONFIG.block, CONFIG.stride,
                     num_blocks=-1)


def _stacked(backend, layers=3):
    torch.manual_seed(0)
    return [JourneySparseAttention(32, 4, 2, config=CONFIG, backend=backend, compress="mlp") for _ in range(layers)]


def _run_stacked(modules, x, cu_seqlens, anchors, plan=None):
    for module in modules:
        x = module(x, cu_seqlens, anchors, plan=plan)
    return x


@pytest.mark.skipif("triton" not in AVAILABLE, reason="needs the Triton backend")
def test_one_plan_serves_every_layer_forward_and_backward(device_policy, monkeypatch):
    """Issue 14, item 2: a batch's plan (tile maps, packed anchors) is built once; no layer, forward
    or backward, rebuilds any map; results are those of per-call maps, and nothing reads the host."""
    from sparserec.triton_kernels import jsa_cmp, plan as plan_module

    modules = _stacked("triton")
    x, cu_seqlens, anchors = _module_step(modules[0], LENGTHS)
    expected = _run_stacked(modules, x, cu_seqlens, anchors)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)

    maps_built = []
    for module in (plan_module, jsa_cmp):
        original = module.jagged_tiles
        monkeypatch.setattr(module, "jagged_tiles", lambda *a, _f=original: maps_built.append(a[1]) or _f(*a))
    with HostReads() as reads:
        plan = modules[0].plan(cu_seqlens, anchors)
        built_by_plan = len(maps_built)
        out = _run_stacked(modules, x, cu_seqlens, anchors, plan)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert built_by_plan == 5 and len(maps_built) == built_by_plan, maps_built  # 3 layers, fwd + bwd: none rebuilt
    assert reads.reads == []
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_a_plan_serves_only_its_own_call(backend):
    modules = _stacked(backend, layers=1)
    x, cu_seqlens, anchors = _module_step(modules[0], LENGTHS)
    plan = modules[0].plan(cu_seqlens, anchors, dtype=x.dtype)
    other_batch = torch.tensor([0, 7, sum(LENGTHS)])
    with pytest.raises(ValueError, match="another call: sequences 4 .*this call: 2"):
        modules[0](x, other_batch, anchors, plan=plan)
    wider = JourneySparseAttention(64, 4, 2, config=CONFIG, backend=backend)
    with pytest.raises(ValueError, match="head_dim 8 .*this call: 16"):
        wider(torch.randn(sum(LENGTHS), 64), cu_seqlens, anchors, plan=plan)
    multi_head = JourneySparseAttention(32, 4, 4, config=CONFIG, backend=backend)
    with pytest.raises(ValueError, match="group 2 .*this call: 1"):
        multi_head(x, cu_seqlens, anchors, plan=plan)
    other = "reference" if backend != "reference" else AVAILABLE[0]
    if other != backend:
        with pytest.raises(ValueError, match=f"backend '{backend}' .*this call: '{other}'"):
            JourneySparseAttention(32, 4, 2, config=CONFIG, backend=other)(x, cu_seqlens, anchors, plan=plan)
    with pytest.raises(ValueError, match="packed .* only"):
        modules[0](x[None], anchor_mask=anchors[None], plan=plan)
    # Same counts, other values: compared where values may be read (CPU tensors).
    shifted = cu_seqlens.clone()
    shifted[1] += 1
    with pytest.raises(ValueError, match="cu_seqlens differs from the plan's"):
        modules[0](x, shifted, anchors, plan=plan)
    with pytest.raises(ValueError, match="anchor_mask differs from the plan's"):
        modules[0](x, cu_seqlens, ~anchors, plan=plan)


@pytest.mark.skipif("triton" not in AVAILABLE, reason="needs the Triton backend")
def test_plan_and_layers_trace_whole_under_torch_compile():
    modules = _stacked("triton", layers=2)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def encoder(x, cu_seqlens, anchors):
        return _run_stacked(modules, x, cu_seqlens, anchors, modules[0].plan(cu_seqlens, anchors, dtype=x.dtype))

    x, cu_seqlens, anchors = _module_step(modules[0], LENGTHS)
    out = encoder(x, cu_seqlens, anchors)
    (grad,) = torch.autograd.grad(out.sum(), x)
    expected = _run_stacked(modules, x, cu_seqlens, anchors)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
