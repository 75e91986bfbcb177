"""What the ops share: argument checks, the device a launch runs under, the SM count.

Each op checks its arguments once, in Python, in one function that its fake and its Triton (CUDA)
kernel both call; the C++ kernels (csrc/) check their own arguments. Messages name the argument.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ checks
def check_float(t, name: str, op: str, allow_fp64: bool = True) -> None:
    """t is a tensor of a kernel dtype; float64 only where allow_fp64 (CPU tensors: no fp64 GPU kernel)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    ok = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    if t.dtype not in ok:
        extra = "" if allow_fp64 or t.dtype != torch.float64 else f" (float64 only on CPU tensors; this one is on {t.device})"
        raise ValueError(f"{op}: {name} must be one of {[str(d) for d in ok]}, got {t.dtype}{extra}")


def check_same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raises, naming both arguments, when b is not on a's device (e.g. "c1 is on cpu but x is on cuda:0")."""
    if b.device != a.device:
        raise ValueError(f"{op}: {name_b} is on {b.device} but {name_a} is on {a.device}; "
                         "they must be on the same device")


def real_number(value, name: str, op: str) -> float:
    """A finite Python number (not a tensor: reading a tensor would be a host sync)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number (Python float), got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)


# ------------------------------------------------------------ the setting checks, written once
# `label` names the argument as its caller spells it ("SAGConfig.kernel_size", "degrade: kernel_size",
# "SelfAttentionGuidance: guidance_scale"); the C++ ops raise the same text for direct calls
# (tests/test_checks.py compares them).
def check_finite(value, label: str) -> float:
    """A finite Python number (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def check_kernel_size(value, label: str) -> int:
    """The blur's kernel size: a positive odd int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{label} must be a positive odd int, got {value!r}")
    return value


def check_positive(value, label: str) -> float:
    """A positive finite number (the blur's sigma)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        shown = f"{value:g}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else repr(value)
        raise ValueError(f"{label} must be a positive finite number, got {shown}")
    return float(value)


def check_nonnegative(value, label: str) -> float:
    """The attention-mass threshold: a finite number >= 0 (1.0 is the mean mass)."""
    check_finite(value, label)
    if value < 0:
        raise ValueError(f"{label} must be >= 0 (1.0 is the mean attention mass), got {value!r}")
    return float(value)


def check_blur(kernel_size, sigma, height: int | None = None, width: int | None = None, op: str = "degrade") -> None:
    """The Gaussian blur's settings: an odd kernel size >= 1, a positive finite sigma, and (given the image
    size) a kernel whose half-width is smaller than the image, as reflect padding needs."""
    check_kernel_size(kernel_size, f"{op}: kernel_size")
    check_positive(sigma, f"{op}: sigma")
    pad = kernel_size // 2
    if height is not None and width is not None and (pad >= height or pad >= width):
        raise ValueError(f"{op}: kernel_size={kernel_size} needs height and width > {pad} for reflect padding, "
                         f"got height={height}, width={width}")


def check_threshold(threshold, op: str) -> float:
    """The attention-mass threshold of a mask op (a Python number: reading a tensor would be a host sync)."""
    real_number(threshold, "threshold", op)
    return check_nonnegative(threshold, f"{op}: threshold")


def grid_shape(h, w, frames) -> tuple:
    """The mask's shape after B: (h, w), or (frames, h, w) for a video grid (frames >= 1; 0 = an image grid)."""
    return (h, w) if frames == 0 else (frames, h, w)


def check_grid(h, w, nk, op: str, frames=0, what: str = "the number of keys Nk={}") -> None:
    """The key grid (h, w), or (frames, h, w) where frames >= 1: positive, product == Nk (keys frame-major).
    what: the count the grid must match, formatted with nk."""
    grid = grid_shape(h, w, frames)
    if isinstance(frames, bool) or not isinstance(frames, (int, torch.SymInt)) or frames < 0:  # SymInt: traced
        raise ValueError(f"{op}: frames must be an int >= 0 (0: an (h, w) grid), got {frames!r}")
    if min(grid) <= 0 or math.prod(grid) != nk:
        need = "h*w" if frames == 0 else "f*h*w"
        raise ValueError(f"{op}: grid_hw={grid} does not match {what.format(nk)} (need {need} == {nk})")


# ------------------------------------------------------------------------------------------ launches
def device_guard(t: torch.Tensor, traced: bool = False):
    """The context a Triton launch for t runs in: t's CUDA device made current, so that the launch goes to
    that device and to its current stream (Triton launches on the current device's current stream).
    traced: the launch is being recorded for torch.compile, which places it itself (no guard)."""
    if t.device.type != "cuda" or traced:
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (launch sizing); 1 where no GPU is present (CPU tensors in the
    interpreter, or CUDA fake tensors traced on a machine without a GPU)."""
    if t.device.type != "cuda" or not torch.cuda.is_available():
        return 1
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel was defined under TRITON_INTERPRET=1 (then it runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def cuda_decomposition(arg_names: tuple[str, ...], traced_impl):
    """The FunctionalTensorMode rule of a Triton-backed op (torch.library.register_torch_dispatch): when
    torch.compile functionalises a graph, a call on CUDA tensors becomes `traced_impl(*args, **kwargs)`, its Triton
    launches recorded with wrap_triton (graph nodes Inductor compiles with the rest of the graph); a call on
    any other device stays the op. torch.library.triton_op does the same for every device, which would run
    the Triton body for CPU tensors too (see docs/design.md). The first argument's device decides.
    arg_names: the schema's positional arguments; keyword-only ones are passed on as keywords."""
    def rule(mode, op, types, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        bound = dict(zip(arg_names, args), **kwargs)
        if bound[arg_names[0]].device.type != "cuda" or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(t is not torch.Tensor and not issubclass(t, (FakeTensor, FunctionalTensor)) for t in types):
            return NotImplemented
        positional = [bound.pop(n) for n in arg_names]
        with mode:
            return traced_impl(*positional, **bound)  # what is left: the schema's keyword-only arguments
    return rule
