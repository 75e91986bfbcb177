"""Loads the compiled extension sag_fast._C once; ops that need it call `require_extension()`."""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10/libtorch first: _C links against them)

_error: Exception | None = None
try:
    _C = importlib.import_module("sag_fast._C")
except ImportError as exc:  # the package stays importable; the ops say what is missing when called
    _C = None
    _error = exc


def extension_available() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(_C.has_cuda())


def require_extension():
    if _C is None:
        raise RuntimeError(
            "sag_fast._C, the compiled extension, is not available "
            f"({_error}). Build it with `pip install --no-build-isolation -e .` (or `make setup`)."
        )
    return _C
