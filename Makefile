PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test gpu-test gpu-sanitize cuda-compile gpu-compile gpu-check bench gpu-train

# The environment's torch is used as is (never a second copy); on a machine without torch this
# installs the CPU build first. --no-build-isolation builds with this environment's packages, so
# the build requirements (setuptools, wheel, ninja) are installed here.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel ninja numpy tqdm pytest hypothesis expecttest matplotlib triton==3.6.0
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m sparserec.cli demo

test: install cuda-compile gpu-compile
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests

# Compiles every .cu file with nvcc for Hopper (when nvcc exists), so CUDA code is checked on
# CPU-only machines too; nothing built here runs.
cuda-compile:
	$(PYTHON) tools/compile_cuda.py

# Compiles every Triton kernel for Hopper (sm_90a) with every autotune config on a covering set of
# shapes, with a stand-in driver (no GPU needed); fails on a compile error, a register spill or
# shared memory above 227 KiB, and prints registers, spills, shared memory and wgmma per build.
gpu-compile:
	$(PYTHON) tools/compile_triton.py

# The one command to run first on a GPU machine (H100/H200): builds the extension, GPU tests,
# compute-sanitizer on one small run, the SPEC §7 attention grid and the STATIC trie-step shapes;
# one results file under benchmarks/results/ (under 8 minutes).
gpu-check:
	$(PYTHON) tools/gpu_check.py

gpu-test: install
	$(PYTHON) -m pytest -q -m gpu tests

# One GPU run of the Triton and CUDA ops under compute-sanitizer's memcheck.
gpu-sanitize: install
	compute-sanitizer --tool memcheck --error-exitcode 1 $(PYTHON) -m pytest -q -m gpu -x \
		tests/test_triton_backend.py tests/test_jsa_select.py tests/test_trie.py

bench: install
	$(PYTHON) benchmarks/attention_scaling.py
	$(PYTHON) benchmarks/beam_search.py
	$(PYTHON) -m sparserec.cli bench

# One short GPU training: Amazon Beauty, GRACE with the tiger preset (4 + 4 layers, 6 heads x 64,
# inverse-sqrt schedule, 20 interactions of history), the Triton JSA encoder (backend auto) and bf16
# autocast, for GPU_TRAIN_MINUTES of training, then validation and the test metrics on all 22,363
# users (beam 20, no history masking). Prepared on a CPU-only machine: not yet run.
GPU_TRAIN_MINUTES ?= 5
gpu-train: install
	$(PYTHON) -m sparserec.cli train --dataset amazon-beauty --model grace --preset tiger \
		--time-limit $(GPU_TRAIN_MINUTES) --steps 1000000 --eval-every 1000 --valid-users 2000 \
		--checkpoint-every 0 --out runs/gpu-train-beauty-tiger --overwrite
