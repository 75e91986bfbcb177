"""Running the Triton kernels of the ops on CPU tensors, through the ops themselves (tests without a GPU)."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import degrade, mask
from ._dispatch import interpreted


@contextlib.contextmanager
def triton_on_cpu():
    """Within this context the CPU kernels of sag_fast::degrade, mask_from_probs and mask_from_qk are their
    Triton (CUDA) kernels, interpreted: how the Triton path is tested end to end without a GPU.

    Needs TRITON_INTERPRET=1 set before sag_fast was imported (Triton reads it when the kernels are
    defined). Outside the context the CPU kernels are the C++ (degrade) and torch (masks) ones again."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not interpreted(degrade._degrade_kernel):
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 in the environment before sag_fast is imported")
    lib = torch.library.Library("sag_fast", "IMPL")  # noqa: TOR901
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
            lib.impl("degrade", degrade.degrade_triton, "CPU")
            lib.impl("mask_from_probs", mask.mask_from_probs_triton, "CPU")
            lib.impl("mask_from_qk", mask.mask_from_qk_triton, "CPU")
        yield
    finally:
        lib._destroy()
