# The two set-up commands: `make demo` and `make test`. Both create .venv if needed and install the
# package there; the install is redone only when pyproject.toml changes (stamp file).
#
# CI pins torch to the CPU build this machine carries (fast, no CUDA download); the package itself
# only asks for a range. Override on the command line, e.g. `make test TORCH=torch==2.11.0`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
STAMP := $(VENV)/.s2attn-installed

.PHONY: install demo test clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet $(TORCH) $(TRITON)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/s2attn demo

# No GPU in CI: the Triton kernels run on the CPU under the interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) s2attn-demo
