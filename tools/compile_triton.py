"""Compile every Triton kernel of triton_kernels/ for Hopper (sm_90a) on a machine without a GPU.
`make gpu-compile`; `make test` runs it, so CI catches a kernel that would not build on an H100.

How: a stand-in driver tells Triton the current target is GPUTarget("cuda", 90, 32); the kernel
modules' own host functions then run on small CPU tensors (compression forward and backward, cmp
attention, selection, the fused sparse forward and backward: every launch a module's forward and
backward makes), with every launch turned into a compile-only warm-up of every autotune config
the autotuner would try (after its own pruning). Each PTX then goes through the ptxas Triton uses
for sm_90 (`ptxas -arch=sm_90a -v`) for registers and spills. A build fails on a compile error, a
register spill, or shared memory above a Hopper block's 227 KiB.

Cases (the default, run by CI; COVERING_CASES): every pair of head dim (32/64/128), 16-bit dtype
(fp16/bf16), heads (MHA 4:4, GQA 8:2) and mode (causal, bidirectional) occurs, with the GRACE-like
JSA config (block 32, stride 16, select_block 32, top_n 3, select_q_block 64, window 64), plus four
cases with larger tiles (select_block 64, select_q_block 128, window 128), plus the compression
kernels in fp32 at each head dim, plus two cases with values wider than the keys (D 64 / Dv 96,
D 32 / Dv 48). `--full` runs the whole product (72 cases). Builds that are the
same binary (same kernel, specialisation and config) are compiled and counted once; `-j` compiles
cases in that many processes.

    python tools/compile_triton.py            # covering set; exit 1 if any build fails
    python tools/compile_triton.py --quick    # one case, the first autotune config per kernel
"""
import argparse
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # compile, never interpret (before triton is imported; workers inherit it)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from sparserec import JSAConfig  # noqa: E402
from sparserec.triton_kernels import jsa_cmp, jsa_compress, jsa_sparse  # noqa: E402
from sparserec.triton_kernels.common import HOPPER_SHARED_MEMORY  # noqa: E402

ARCH = 90
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONFIGS = {
    "grace": JSAConfig(block=32, stride=16, select_block=32, top_n=3, select_q_block=64, window=64),
    "large": JSAConfig(block=32, stride=16, select_block=64, top_n=3, select_q_block=128, window=128),
}
HEADS = {"mha": (4, 4), "gqa": (8, 2)}
# (config, heads, head dim, dtype, causal, kernels): every pair of head dim, 16-bit dtype, heads and
# mode occurs; the larger-tile config at each head dim; fp32 for the compression kernels only
# (kernels: a name prefix, "" for all). The attention kernels' fp32 builds spill (their tl.dot
# runs as FMA loops at "ieee" precision): `--fp32-attention` compiles and reports them.
COVERING_CASES = [
    ("grace", "mha", 32, "fp16", True, ""), ("grace", "gqa", 32, "bf16", False, ""),
    ("grace", "gqa", 64, "fp16", True, ""), ("grace", "mha", 64, "bf16", False, ""),
    ("grace", "mha", 128, "fp16", False, ""), ("grace", "gqa", 128, "bf16", True, ""),
    ("large", "mha", 32, "bf16", False, ""), ("large", "gqa", 64, "fp16", True, ""),
    ("large", "gqa", 128, "bf16", False, ""), ("large", "mha", 128, "fp16", True, ""),
    ("grace", "gqa", 32, "fp32", True, "_compress"), ("grace", "gqa", 64, "fp32", True, "_compress"),
    ("grace", "gqa", 128, "fp32", True, "_compress"),
    # Values wider than the keys (head dim (D, Dv)): a second value stream through the same softmax.
    ("grace", "gqa", (64, 96), "bf16", True, ""), ("grace", "mha", (32, 48), "fp16", False, ""),
]
# Ragged: one token, a sequence shorter than a compressed block, and longer ones.
LENGTHS = [1, 7, 97, 300]


class HopperStandIn:
    """The parts of Triton's CUDA driver that compiling needs, for an sm_90 device that is not here."""

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("compile_triton: nothing runs here, so nothing is benchmarked")

    def map_python_to_cpp_type(self, ty):
        raise RuntimeError("compile_triton: no launcher is built here")


@dataclasses.dataclass
class Build:
    kernel: str
    case: str
    config: str
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    wgmma: int = 0

    @property
    def problems(self) -> list:
        if self.error:
            return ["compile error"]
        return ["spills"] * bool(self.spill_bytes) + ["shared memory"] * (self.shared > HOPPER_SHARED_MEMORY)


def parse_ptxas_log(log: str):
    """(registers, spill bytes stored + loaded, static shared bytes) from a `ptxas -v` log."""
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    static_shared = sum(int(n) for n in re.findall(r"(\d+) bytes smem", log))
    return registers, spills, static_shared


def run_ptxas(ptx: str) -> str:
    """`ptxas -arch=sm_90a -v` on a PTX, with the ptxas Triton uses for sm_90: its log."""
    with tempfile.TemporaryDirectory(prefix="sparserec_ptxas_") as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run([get_ptxas(ARCH).path, "-arch=sm_90a", "-v", source, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ptxas failed:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


class Recorder:
    """Turns launches into compile-only warm-ups of every candidate config and records each build."""

    def __init__(self, first_config_only: bool, only=()):
        self.first_config_only = first_config_only
        self.only = only
        self.case = ""
        self.case_kernels = ""  # compile only kernels whose name starts with this
        self.builds = {}  # binary hash (or a failure's label) -> Build
        self.ptxas_logs = {}  # PTX -> the log of Triton's own `ptxas -v` run on it

    @staticmethod
    def _describe(kwargs) -> str:
        meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") and k != "BLOCK_D"}
        meta["warps"] = kwargs.get("num_warps", 4)
        meta["stages"] = kwargs.get("num_stages", 3)
        if "BACKWARD" in kwargs:
            meta["bwd"] = int(bool(kwargs["BACKWARD"]))
        return " ".join(f"{k}={v}" for k, v in meta.items())

    def compile(self, fn, original_run, args, kwargs):
        kwargs.pop("warmup", None)
        grid = kwargs.pop("grid", (1,))
        name, config = fn.fn.__name__, self._describe(kwargs)
        if self.only and not any(part in name for part in self.only):
            return None
        if not name.startswith(self.case_kernels):
            return None
        try:
            kernel = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # a compile error is this tool's finding, not its crash
            message = (str(error).strip().splitlines() or [repr(error)])[-1]
            self.builds[(name, self.case, config)] = Build(name, self.case, config, error=message[:120])
            return None
        if kernel.hash not in self.builds:
            ptx = kernel.asm["ptx"]
            # Triton ran ptxas -v on this PTX unless the kernel came from its cache.
            log = self.ptxas_logs.pop(ptx, None) or run_ptxas(ptx)
            registers, spills, static_shared = parse_ptxas_log(log)
            self.builds[kernel.hash] = Build(name, self.case, config, registers=registers, spill_bytes=spills,
                                             shared=kernel.metadata.shared + static_shared,
                                             wgmma=ptx.count("wgmma.mma_async"))
        return kernel

    @contextlib.contextmanager
    def installed(self):
        recorder = self
        jit_run, autotune_run, make_cubin = JITFunction.run, Autotuner.run, CUDABackend.make_cubin

        def run(fn, *args, **kwargs):
            return recorder.compile(fn, jit_run, args, kwargs)

        def autotuned(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            for config in configs[:1] if recorder.first_config_only else configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        def logged_make_cubin(backend, src, metadata, options, capability):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # dump_ptxas_log prints the log
                cubin = make_cubin(backend, src, metadata, options, capability)
            recorder.ptxas_logs[src] = log.getvalue()
            return cubin

        previous_driver = driver._active  # reset_active() would look for a real GPU
        driver.set_active(HopperStandIn())
        knobs.nvidia.dump_ptxas_log = True
        JITFunction.run, Autotuner.run, CUDABackend.make_cubin = run, autotuned, logged_make_cubin
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run, CUDABackend.make_cubin = jit_run, autotune_run, make_cubin
            driver._active = previous_driver


def cu_seqlens(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


def launch_module(config: JSAConfig, heads: int, kv_heads: int, dim, dtype: torch.dtype):
    """Every Triton launch of one JSA layer's forward and backward, on small CPU tensors; dim is the
    head dim, or (D, Dv) for values of another width than the queries and keys."""
    dim, value_dim = dim if isinstance(dim, tuple) else (dim, dim)
    gen = torch.Generator().manual_seed(0)
    cu = cu_seqlens(LENGTHS)
    total = sum(LENGTHS)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = randn(total, heads, dim), randn(total, kv_heads, dim), randn(total, kv_heads, value_dim)
    weight, pe = randn(kv_heads, config.block, dim, dim), randn(kv_heads, config.block, dim)
    gates = torch.rand(total, heads, 4, generator=gen).to(dtype)
    anchor_mask = torch.rand(total, generator=gen) < 1 / 16
    cu_cmp = jsa_compress.compressed_cu_seqlens(cu, config.block, config.stride)
    num_blocks = int(cu_cmp[-1])
    k_cmp = jsa_compress.compress_fwd(k, weight, pe, cu, cu_cmp, num_blocks, config.block, config.stride)
    jsa_compress.compress_bwd(k_cmp, k, weight, pe, cu, cu_cmp, config.block, config.stride)
    # Nothing runs: the outputs that later host code reads get defined values.
    k_cmp, v_cmp = randn(num_blocks, kv_heads, dim), randn(num_blocks, kv_heads, value_dim)
    o_cmp, lse_cmp, _ = jsa_cmp.cmp_attention_select(q, k_cmp, v_cmp, cu, cu_cmp, config)
    jsa_cmp.cmp_select(q, k_cmp, lse_cmp.zero_(), cu, cu_cmp, config)
    selection = torch.zeros(total, kv_heads, config.top_n, dtype=torch.int32)
    _, lse, branches = jsa_sparse.sparse_attention_fwd(q, k, v, gates, selection, anchor_mask, cu, config,
                                                       store_branches=True, o_cmp=o_cmp)
    dout = randn(total, heads, value_dim)
    jsa_sparse.sparse_attention_bwd(dout, q, k, v, gates, selection, anchor_mask, cu, config, branches.zero_(),
                                    lse.zero_(), cmp=(k_cmp, v_cmp, cu_cmp, o_cmp.zero_(), lse_cmp))


def case_label(case) -> str:
    config_name, heads_name, dim, dtype_name, causal, _ = case
    dims = f"d{dim[0]}v{dim[1]}" if isinstance(dim, tuple) else f"d{dim}"
    return f"{config_name} {heads_name} {dims} {dtype_name} {'causal' if causal else 'bidir'}"


_RECORDER = None
_INSTALLED = None


def _start_worker(first_config_only: bool, only=()):
    global _RECORDER, _INSTALLED
    _RECORDER = Recorder(first_config_only, only)
    _INSTALLED = _RECORDER.installed()  # kept referenced: collecting it would undo the patches
    _INSTALLED.__enter__()  # for the process's lifetime


def compile_case(case):
    """Builds made by one case's launches (those this process had not built before)."""
    config_name, heads_name, dim, dtype_name, causal, kernels = case
    known = set(_RECORDER.builds)
    _RECORDER.case, _RECORDER.case_kernels = case_label(case), kernels
    config = dataclasses.replace(CONFIGS[config_name], causal=causal)
    started = time.time()
    launch_module(config, *HEADS[heads_name], dim, DTYPES[dtype_name])
    new = {key: build for key, build in _RECORDER.builds.items() if key not in known}
    print(f"  {_RECORDER.case}: {len(new)} new builds, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return new


def cases(quick: bool, full: bool, fp32_attention: bool):
    if quick:
        return [("grace", "gqa", 64, "bf16", True, "")]
    if full:
        return [(config, heads, dim, dtype, causal, "" if dtype != "fp32" or fp32_attention else "_compress")
                for config in CONFIGS for heads in HEADS for dim in (32, 64, 128) for dtype in DTYPES
                for causal in (True, False)]
    extra = [(config, heads, dim, "fp32", causal, "") for config, heads, dim, dtype, causal, _ in COVERING_CASES
             if dtype == "fp16"] if fp32_attention else []
    return COVERING_CASES + extra


def _dims(text: str):
    """'64' -> 64; '32v48' -> (32, 48): key width, value width."""
    key, _, value = text.partition("v")
    return (int(key), int(value)) if value else int(key)


def print_table(builds):
    header = (f"{'kernel':<20} {'first case':<26} {'config':<46} {'regs':>4} {'spill':>5} {'smem':>7} "
              f"{'wgmma':>5}  status")
    print(header)
    print("-" * len(header))
    for b in sorted(builds, key=lambda b: (b.kernel, b.case, b.config)):
        status = ", ".join(b.problems).upper() or "ok"
        if b.error:
            print(f"{b.kernel:<20} {b.case:<26} {b.config:<46} {'-':>4} {'-':>5} {'-':>7} {'-':>5}  {status}: {b.error}")
        else:
            print(f"{b.kernel:<20} {b.case:<26} {b.config:<46} {b.registers:>4} {b.spill_bytes:>5} "
                  f"{b.shared:>7} {b.wgmma:>5}  {status}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one case, first autotune config of each kernel")
    parser.add_argument("--full", action="store_true", help="every combination (72 cases) instead of the covering set")
    parser.add_argument("--fp32-attention", action="store_true",
                        help="also build the attention kernels in fp32 (known to spill; see COVERING_CASES)")
    parser.add_argument("--case", action="append", default=[],
                        help="only this case, as 'config heads dim dtype mode' (e.g. 'grace gqa 128 fp32 causal'; "
                             "a value width after a v: 'grace mha 32v48 fp16 bidir')")
    parser.add_argument("--only", action="append", default=[], help="only kernels whose name contains this")
    parser.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile cases in this many processes (default: 2 or fewer)")
    args = parser.parse_args(argv)
    started = time.time()
    todo = cases(args.quick, args.full, args.fp32_attention)
    if args.case:
        todo = [(c, h, _dims(d), t, m == "causal", "") for c, h, d, t, m in (case.split() for case in args.case)]
    builds = {}
    if args.jobs > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.jobs, initializer=_start_worker, initargs=(args.quick, args.only)) as pool:
            for result in pool.imap(compile_case, todo):
                for key, build in result.items():
                    builds.setdefault(key, build)
    else:
        _start_worker(args.quick, args.only)
        for case in todo:
            builds.update(compile_case(case))
    builds = list(builds.values())
    print_table(builds)
    bad = [b for b in builds if b.problems]
    counts = {p: sum(p in b.problems for b in builds) for p in ("compile error", "spills", "shared memory")}
    print(f"gpu-compile: {len(todo)} cases, {len(builds)} distinct sm_90a builds, {len(builds) - len(bad)} ok; "
          + ", ".join(f"{n} {p}" for p, n in counts.items())
          + f"; {time.time() - started:.0f} s (Triton {triton.__version__}, ptxas {get_ptxas(ARCH).version})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
