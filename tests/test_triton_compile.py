"""Every Triton kernel builds for Hopper (sm_90a) on this machine, GPU or not: tools/compile_triton.py
--quick (one case, the first autotune config of each kernel) in a fresh process, since this one
may run the kernels in Triton's interpreter. `make gpu-compile` runs every config on more shapes."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

KERNELS = ("_compress_fwd", "_compress_bwd_dw", "_compress_bwd_dx", "_cmp_fwd_select",
           "_sparse_kernel", "_local_dkdv_kernel")


def test_every_kernel_builds_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile and ptxas run, not a cache hit
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_triton.py"), "--quick"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    built = {line.split()[0] for line in lines if line.endswith("  ok")}
    assert built == set(KERNELS), result.stdout
    # Separate builds: the sparse kernel's forward and backward, the cmp forward with and
    # without its attention phase.
    assert "8 distinct sm_90a builds, 8 ok" in lines[-1], lines[-1]


def test_autotune_keys_hold_a_size_class_and_never_a_tile_of_the_plan():
    """Issue 14: every autotuned kernel retunes per power-of-two size class (not per batch length:
    autotuning benchmarks every config); the attention kernels' candidates change only warps and
    stages, since the batch plan's tile maps and the FLOP count follow their tile sizes."""
    from sparserec.triton_kernels import common, jsa_cmp, jsa_compress, jsa_sparse

    sizes = {jsa_compress._compress_fwd: "rows_bucket", jsa_compress._compress_bwd_dw: "rows_bucket",
             jsa_compress._compress_bwd_dx: "rows_bucket", jsa_cmp._cmp_fwd_select: "tokens_bucket",
             jsa_sparse._sparse_kernel: "tokens_bucket", jsa_sparse._local_dkdv_kernel: "tokens_bucket"}
    for kernel, size in sizes.items():
        assert size in kernel.keys, (kernel.fn.__name__, kernel.keys)
    for kernel in (jsa_cmp._cmp_fwd_select, jsa_sparse._sparse_kernel, jsa_sparse._local_dkdv_kernel):
        assert all(config.kwargs == {} for config in kernel.configs), kernel.fn.__name__
    assert common.size_bucket(513) == common.size_bucket(1024) == 1024 != common.size_bucket(1025)


def test_ptxas_log_parsing():
    from compile_triton import parse_ptxas_log

    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_local_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _local_dkdv_kernel
    32 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 32 bytes cumulative stack size, 16 bytes smem"""
    assert parse_ptxas_log(log) == (255, 64, 16)


def test_gpu_check_plan_covers_the_issue_sections():
    """`make gpu-check` runs on GPU machines only; here its plan is checked: every section, SPEC §7's
    attention shapes, and a total budget under 8 minutes."""
    import gpu_check

    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    names = [name for name, _, _ in gpu_check.sections("out")]
    assert {"build", "tests", "sanitize", "trie"} <= set(names) and sum(n.startswith("attention") for n in names) == 3
    for name in names:
        assert result.stdout.count(f"{name} (cap") == 1
    assert "--dtype bf16 --tokens 65536 --shapes 8x64" in result.stdout
    assert gpu_check.BUDGET_S < 8 * 60
