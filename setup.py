"""Builds `sparserec._C`: C++ CPU ops always, CUDA ops when torch has CUDA and nvcc is found.

Environment flags (also listed in the README):
  SPARSEREC_NO_EXT=1      install pure Python (no compiled extension)
  SPARSEREC_FORCE_CUDA=1  build the CUDA sources even when no GPU/CUDA torch is visible
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

packages = find_packages(include=["sparserec", "sparserec.*"]) + ["sparserec.triton_kernels"]
package_dir = {"sparserec.triton_kernels": "triton_kernels"}


def _extensions():
    if os.environ.get("SPARSEREC_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = os.environ.get("SPARSEREC_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    # -Wno-psabi: the CPU kernels' 8-lane vector helpers are inlined, so their ABI note does not apply.
    cxx_flags = ["-O3", "-std=c++17", "-Wno-psabi"]
    # at::parallel_for is inline: without -fopenmp it compiles to a serial loop in this extension.
    # Linked with -fopenmp, the extension shares torch's libgomp (same soname, already loaded), so
    # torch.set_num_threads governs the kernels' threads.
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    extension = CppExtension
    extra = {"cxx": cxx_flags}
    macros = []
    if use_cuda:
        extension = CUDAExtension
        sources += cuda_sources
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        macros.append(("SPARSEREC_WITH_CUDA", None))
    ext = extension(
        "sparserec._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=link_flags,
        define_macros=macros,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"sparserec": ["data/embedded/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
