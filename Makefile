# Two commands on a fresh machine (each sets everything up on first use):
#   make count   # the main job: count Llama-2-7B, four counters, exact agreement
#   make test    # the whole test suite (what CI runs; about 3 minutes on 2 cores, one worker per core)
#   make check   # the fast lane for everyday work (about 35 s): the model, the counters, parity with
#                # transformers, the model's bad-input battery, the layout rules
#
# The virtualenv (.venv) gets a CPU build of torch from PyTorch's CPU index, so a machine without a GPU
# never downloads the multi-GB CUDA build; the package itself asks only for torch>=2.4. When that index
# cannot be reached (an offline mirror, a sandbox), torch comes from the index pip is configured with.
# To use your own torch (e.g. CUDA), install it into .venv first, or run `make TORCH_INDEX= count`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
COUNT_ARGS ?= llama-2-7b --tokens 2048

BIN := $(VENV)/bin
STAMP := $(VENV)/.llama-ref-installed
export MPLBACKEND := Agg

# The fast lane: the model and its guards, compiling, the counters and their op registry, parity with
# transformers, the model's bad-input battery and the layout rules (slow-marked tests left out).
CHECK_TESTS ?= tests/test_model.py tests/test_generate.py tests/test_compile.py tests/test_analytic.py \
	tests/test_crosscheck.py tests/test_hooks.py tests/test_ops.py tests/test_torch_counter.py \
	tests/test_fvcore_counter.py tests/test_sabotage.py tests/test_hf_parity.py tests/test_bad_inputs_model.py \
	tests/test_config.py tests/test_structure.py tests/test_tree.py

.PHONY: count test check setup clean

count: $(STAMP)
	@$(BIN)/llama-ref count $(COUNT_ARGS)

test: $(STAMP)
	@$(BIN)/python -m pytest -q -n auto

check: $(STAMP)
	@$(BIN)/python -m pytest -q -n auto -m "not slow" $(CHECK_TESTS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (first run only): torch (CPU build), then llama-ref with its test extras ..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
		if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX)/', timeout=10)" 2>/dev/null; then \
			$(BIN)/python -m pip install -qq --extra-index-url "$(TORCH_INDEX)" "$(TORCH)"; \
		else \
			echo "$(TORCH_INDEX) cannot be reached: $(TORCH) from the package index pip is configured with"; \
			$(BIN)/python -m pip install -qq "$(TORCH)"; \
		fi; }
	@$(BIN)/python -m pip install -qq -e ".[test]"
	@touch $@
	@echo "$(VENV) ready"

clean:
	rm -rf $(VENV) out .pytest_cache
