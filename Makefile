# Two entry points (see README): `make report` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REPORT_DIR ?= perf_reports
OUT ?= perf_reports
# The GPU machine's Triton: every kernel specialisation must compile under it too. Its venv
# holds only that Triton and reads torch and dynconv from $(VENV) (a .pth added after its own
# site-packages, so its Triton comes first).
GPU_TRITON ?= 3.6.0
VENV_GPU_TRITON := .venv-triton$(GPU_TRITON)

.PHONY: test report lint compile-check codegen-report gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

# -n auto: pytest-xdist, one worker per core (the suite takes 7 minutes on 2 cores, 11 in one)
test: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -q -n auto

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

$(VENV_GPU_TRITON)/.installed: $(VENV)/.installed-dev
	$(PYTHON) -m venv $(VENV_GPU_TRITON)
	$(VENV_GPU_TRITON)/bin/python -m pip install -q --no-deps "triton==$(GPU_TRITON)"
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(VENV_GPU_TRITON)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_dynconv_venv.pth"
	$(VENV_GPU_TRITON)/bin/python -c "import triton, torch, dynconv.kernels; assert triton.__version__ == '$(GPU_TRITON)', triton.__version__"
	touch $@

# Every launched kernel specialisation, sm_80 and sm_90, under CI's Triton and the GPU machine's
# (registers, spills and shared memory; --no-sass: the disassembly, a third of each compile's
# time on 2 cores, is codegen-report's); then gpu-check's plan under the GPU machine's Triton:
# its pinning pass (every launch of every case driven on meta tensors, nothing launched) and its
# time estimate within the deadline.
compile-check: $(VENV)/.installed-dev $(VENV_GPU_TRITON)/.installed
	$(PY) -m dynconv.autotune compile-check --no-sass
	$(VENV_GPU_TRITON)/bin/python -m dynconv.autotune compile-check --no-sass
	$(VENV_GPU_TRITON)/bin/python -m dynconv.autotune gpu-check --dry-run

# The same, writing the codegen report (CSV + summary per Triton version) to perf_reports/codegen
# (both versions report even when one fails).
codegen-report: $(VENV)/.installed-dev $(VENV_GPU_TRITON)/.installed
	-$(PY) -m dynconv.autotune compile-check --report perf_reports/codegen
	$(VENV_GPU_TRITON)/bin/python -m dynconv.autotune compile-check --report perf_reports/codegen

# The CPU perf report (the CPU goals open its summary.md): the quick preset as the machine
# comes (no allocator variable set; with peak memory), then again with the documented
# allocator setting, glibc's heap kept (bench --allocator steady-heap: REPORT_DIR/steady/cpu/,
# the speed rule is read on both), then its layers with THP_MEM_ALLOC_ENABLE=1
# (REPORT_DIR/thp/cpu/, a third geometric mean), then ODConv on the same layers (the library's
# scales against the published formulation, forward and forward+backward, with peak memory:
# its own CSV, REPORT_DIR/cpu/odconv.csv, and the last section of summary.md, also in
# odconv.md). Samples of at least 100 ms of back-to-back calls (bench --sample-ms). About
# 10 minutes on a 2-core machine.
report: $(VENV)/.installed-bench
	$(PY) -m dynconv.autotune bench --preset quick --device cpu --allocator default \
		--rounds 5 --sample-ms 100 --out $(REPORT_DIR)
	$(PY) -m dynconv.autotune bench --preset quick --device cpu --allocator steady-heap \
		--rounds 5 --sample-ms 100 --no-memory --out $(REPORT_DIR)/steady
	$(PY) -m dynconv.autotune bench --preset quick --device cpu --allocator thp \
		--rounds 5 --sample-ms 100 --groups layers --no-memory --out $(REPORT_DIR)/thp
	$(PY) -m dynconv.autotune bench --preset odconv --device cpu --allocator default \
		--rounds 5 --sample-ms 100 --modes fwd,fwd+bwd --out $(REPORT_DIR)
	$(PY) -m dynconv.autotune report $(REPORT_DIR)/cpu

# On a GPU machine with torch + Triton and no network: the first GPU run, within 7 minutes in
# all, this install included (its deadline counts from here: --started-at), and every process
# it starts ended 25 s past it at the latest (autotune/gpu_check.py says what it runs;
# OUT/<gpu>/ gets its CSVs, log and summary.md). dynconv is installed editable if pip and
# setuptools can do it offline (at most 60 s); otherwise it runs from the tree through a path
# shim (python autotune/gpu_check.py). GPU_CHECK_ARGS: more options (--deadline-s S).
gpu-check:
	@started=$$(date +%s); \
	if timeout 60 $(PYTHON) -m pip install -q --no-index --no-deps --no-build-isolation \
			--disable-pip-version-check -e . \
		&& $(PYTHON) -c "import os, dynconv.kernels.conv_fwd as m, dynconv.autotune.gpu_check; \
			assert m.__file__.startswith(os.getcwd()), m.__file__"; then \
		$(PYTHON) -m dynconv.autotune gpu-check --started-at $$started --out $(OUT) \
			$(GPU_CHECK_ARGS); \
	else \
		echo "gpu-check: no usable editable install; running from the tree through a path shim"; \
		$(PYTHON) autotune/gpu_check.py --started-at $$started --out $(OUT) $(GPU_CHECK_ARGS); \
	fi

# Every committed training figure from the current code (CPU; over an hour on 2 cores): the
# routing ablation that the README's training section quotes (every run again, 2 at a time;
# then --check), and the demo's own outputs (digits, digits-affine, 2 processes; their
# checkpoints are git-ignored).
.PHONY: training-figures
training-figures: $(VENV)/.installed-dev
	$(PY) -m dynconv.train.ablation --out perf_reports/training/ablation --jobs 2 --rerun
	$(PY) -m dynconv.train.ablation --check perf_reports/training/ablation
	$(PY) -m dynconv.train --out perf_reports/training --threads 1 --no-progress
	$(PY) -m dynconv.train --out perf_reports/training/affine --task digits-affine --threads 1 \
		--no-progress
	$(VENV)/bin/torchrun --nproc_per_node=2 -m dynconv.train --out perf_reports/training/ddp_2proc \
		--backend native --threads 1 --seeds 1 --no-progress

clean:
	rm -rf $(VENV) $(VENV_GPU_TRITON) build *.egg-info
