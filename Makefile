# The README's commands: `make demo` (SAG sampling with the built-in tiny model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Triton kernels run in the interpreter on CPU tensors when there is no GPU.
INTERP = $$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

setup:
	@bash scripts/bootstrap.sh

test: setup
	TRITON_INTERPRET=$(INTERP) $(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m sag_fast sample

bench: setup
	TRITON_INTERPRET=$(INTERP) $(PY) -m sag_fast bench

clean:
	rm -rf build *.egg-info sag_fast/_C*.so
