"""Compile every csrc/**/*.cu for Hopper (sm_90) with nvcc, object files only, to check CUDA code on
machines that cannot build or run the CUDA extension (CPU-only torch, no GPU). `make cuda-compile`.

Flags follow the real build (setup.py with CUDA): torch's common nvcc flags, C++17, the csrc/ and
torch include paths, SPARSEREC_WITH_CUDA. Exits non-zero when any file fails; exits 0 with a note
when nvcc is absent.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cuda-compile: nvcc not found, skipping the CUDA compile check")
        return 0
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    includes = [os.path.join(ROOT, "csrc"), *include_paths(), sysconfig.get_paths()["include"]]
    flags = [*COMMON_NVCC_FLAGS, "-arch=sm_90", "-std=c++17", "-O3", "-DSPARSEREC_WITH_CUDA",
             *(f"-I{path}" for path in includes)]
    if not any(os.path.exists(os.path.join(path, "c10/cuda/impl/cuda_cmake_macros.h")) for path in include_paths()):
        # CPU torch wheels ship c10/cuda without this generated header (it only sets Windows
        # export macros); c10 has a switch for building without it.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sparserec_nvcc_") as out_dir:
        for index, source in enumerate(sources):
            name = os.path.relpath(source, ROOT)
            target = os.path.join(out_dir, f"{index}.o")
            result = subprocess.run([nvcc, *flags, "-c", source, "-o", target], capture_output=True, text=True)
            if result.returncode == 0:
                print(f"ok      {name}")
            else:
                failures += 1
                print(f"FAILED  {name}\n{result.stdout}{result.stderr}")
    print(f"cuda-compile: {len(sources) - failures}/{len(sources)} CUDA sources compile for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
