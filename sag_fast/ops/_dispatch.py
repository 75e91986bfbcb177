"""Where an op runs: the Triton kernels on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import os

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def check_float(t: torch.Tensor, name: str, allow_fp64: bool = True) -> None:
    ok = _DTYPES + ((torch.float64,) if allow_fp64 else ())
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ok:
        raise ValueError(f"{name} must be one of {[str(d) for d in ok]}, got {t.dtype}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}: they must be on the same device")
