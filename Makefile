# Two commands do all the set-up on a fresh machine:
#   make demo   virtual environment (Python 3.12), install, fetch the default model, quantize it
#               with QoQ to W4A8KV4 (once, cached), generate text
#   make test   the same environment plus the test oracle, then the whole test suite
SHELL := /bin/bash
VENV ?= .venv
REF_VENV ?= .venv-ref
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv ref-venv assets lint clean

$(VENV)/.installed: pyproject.toml scripts/find_python312.sh
	@py312="$$(scripts/find_python312.sh)" || exit 1; \
	echo "creating $(VENV) with $$py312"; \
	"$$py312" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

venv: $(VENV)/.installed

# The parity oracle: transformers' PyTorch implementation, in an interpreter of its own so that
# torch never shares a process (or a dependency set) with the package. See tests/reference/README.md.
$(REF_VENV)/.installed: tests/reference/requirements.txt scripts/make_ref_venv.sh
	scripts/make_ref_venv.sh $(REF_VENV)
	@touch $@

ref-venv: $(REF_VENV)/.installed

assets: venv
	$(PY) -m qoq_jax.assets fetch

demo: venv
	$(PY) -m qoq_jax.demo --prompt "$(PROMPT)" --max-new-tokens 64

test: venv ref-venv assets
	QOQ_REF_PYTHON=$(REF_VENV)/bin/python PY=$(PY) scripts/run_tests.sh $(PYTEST_ARGS)

# Without the real model and the torch oracle: seconds, for the edit-test loop.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" -k "not parity" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(REF_VENV) build *.egg-info
