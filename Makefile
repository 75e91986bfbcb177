# The README's commands: `make demo` (the built-in model with and without SAG, and SAG's mask) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Triton kernels run in the interpreter on CPU tensors when there is no GPU.
INTERP = $$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")
PYTEST_ARGS ?=

.PHONY: setup test demo quality bench clean

setup:
	@bash scripts/bootstrap.sh

test: setup
	TRITON_INTERPRET=$(INTERP) $(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m sag_fast sample

# FID/KID of the built-in models with and without SAG (2000 samples per main setting, 1000 the rest; hours on a CPU)
quality: setup
	TRITON_INTERPRET=$(INTERP) $(PY) -m sag_fast quality --n 2000 --n-rest 1000

bench: setup
	TRITON_INTERPRET=$(INTERP) $(PY) -m sag_fast bench

clean:
	rm -rf build *.egg-info sag_fast/_C*.so
