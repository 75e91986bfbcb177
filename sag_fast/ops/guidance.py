"""Python face of the C++/CUDA guidance combination (csrc/guidance*.{h,cpp,cu,cuh}).

    guidance_combine(pred, degraded, w, s)  ->  u + w*(c - u) + s*(u - d)   (pred = [u; c], 2B samples)
                                            ->  p + s*(p - d)               (pred = p, B samples)
    guidance_shift_(pred, degraded, s)      ->  every way of pred += s*(u - d), in place

One pass over memory: the two halves of pred are read in place, the result is written once.
Channels past `guided_channels` (a learned variance, 2C outputs of DiT/ADM) are the conditional way's.

Strided inputs: the kernels read every (sample, channel) plane as one contiguous span and take the
sample and channel strides as they are, so contiguous tensors, batch or channel slices (`t[:, :4]`)
and offset views run without a copy. A tensor whose dims past the channels are not one span per plane
(channels_last, a transposed or expanded view) is copied to contiguous first; for guidance_shift_ the
shifted copy is written back, so the result always lands in `pred` itself. The output of
guidance_combine is always contiguous.

The schemas and kernels are C++ (TORCH_LIBRARY in csrc/module.cpp, checks in csrc/guidance.cpp). The fakes
below are registered when this module is imported, which `import sag_fast` does. They check the arguments
themselves because the C++ checks cannot run there: a fake sees symbolic sizes under torch.compile's
dynamic shapes, and the devices of the real inputs (a mix of devices is refused naming both arguments).
"""
from __future__ import annotations

import torch

from .._lib import extension_available, require_extension
from ._dispatch import check_same_device

__all__ = ["guidance_combine", "guidance_shift_"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def guidance_combine(pred: torch.Tensor, degraded: torch.Tensor, cfg_scale: float, sag_scale: float,
                     guided_channels: int = -1) -> torch.Tensor:
    """The guided prediction (B, C, ...) from pred (B or 2B, C, ...) and degraded (B, C', ...).

    Same semantics as sag_fast.reference.guidance_combine; computed in fp32 (fp64 for fp64 inputs).
    """
    require_extension()
    return torch.ops.sag_fast.guidance_combine(pred, degraded, cfg_scale, sag_scale, guided_channels)


def guidance_shift_(pred: torch.Tensor, degraded: torch.Tensor, sag_scale: float, guided_channels: int = -1,
                    uncond_index: int = 0) -> torch.Tensor:
    """Adds sag_scale*(u - degraded) to the first guided channels of every way of pred (k*B, C, ...),
    in place, u being way `uncond_index` (0: uncond first as in diffusers SD/SDXL; 1: DiT). Returns pred.

    Same semantics as sag_fast.reference.guidance_shift.
    """
    require_extension()
    torch.ops.sag_fast.guidance_shift_(pred, degraded, sag_scale, guided_channels, uncond_index)
    return pred


# ------------------------------------------------------------------ checks of the fakes (the kernels': guidance.cpp)
def _check_pair(op: str, pred: torch.Tensor, degraded: torch.Tensor) -> None:
    allow_fp64 = pred.device.type != "cuda"  # no fp64 CUDA kernel
    ok = _DTYPES + ((torch.float64,) if allow_fp64 else ())
    if pred.dtype not in ok:
        raise ValueError(f"{op}: pred must be float32, float16 or bfloat16{' (or float64)' if allow_fp64 else ''} "
                         f"on {pred.device.type}, got {pred.dtype}")
    if degraded.dtype != pred.dtype:
        raise ValueError(f"{op}: degraded has dtype {degraded.dtype} but pred has {pred.dtype}; "
                         "they must have the same dtype")
    check_same_device(op, "pred", pred, "degraded", degraded)
    if pred.dim() < 2:
        raise ValueError(f"{op}: pred must have at least 2 dims (batch, channels, ...), got shape {list(pred.shape)}")
    if degraded.dim() != pred.dim() or degraded.shape[2:] != pred.shape[2:]:
        raise ValueError(f"{op}: degraded must match pred past the channels (B, C', ...) vs (k*B, C, ...), "
                         f"got degraded {list(degraded.shape)} and pred {list(pred.shape)}")


def _check_guided(op: str, pred: torch.Tensor, degraded: torch.Tensor, guided_channels: int) -> int:
    c = pred.shape[1]
    if not (guided_channels == -1 or 1 <= guided_channels <= c):
        raise ValueError(f"{op}: guided_channels={guided_channels} must be -1 (all) or in 1..{c} (the channels of pred)")
    g = c if guided_channels == -1 else guided_channels
    if g < 1:
        raise ValueError(f"{op}: pred has no channels to guide, got shape {list(pred.shape)}")
    if g > degraded.shape[1]:
        raise ValueError(f"{op}: guided_channels={g} exceeds the channels of degraded ({degraded.shape[1]})")
    return g


def check_combine(pred: torch.Tensor, degraded: torch.Tensor, guided_channels: int = -1) -> int:
    """Raises what sag_fast::guidance_combine raises; returns B, the batch of the output."""
    op = "guidance_combine"
    _check_pair(op, pred, degraded)
    b = degraded.shape[0]
    if pred.shape[0] != b and pred.shape[0] != 2 * b:
        raise ValueError(f"{op}: pred batch {pred.shape[0]} must be B (one way) or 2B (two ways, unconditional "
                         f"first) for degraded batch B={b}")
    _check_guided(op, pred, degraded, guided_channels)
    return b


def check_shift(pred: torch.Tensor, degraded: torch.Tensor, guided_channels: int = -1, uncond_index: int = 0) -> None:
    """Raises what sag_fast::guidance_shift_ raises (memory overlap is checked by the kernels only)."""
    op = "guidance_shift_"
    _check_pair(op, pred, degraded)
    b = degraded.shape[0]
    if not (b > 0 and pred.shape[0] > 0 and pred.shape[0] % b == 0):
        raise ValueError(f"{op}: pred batch {pred.shape[0]} must be a positive multiple k*B of degraded batch B={b}")
    ways = pred.shape[0] // b
    if not 0 <= uncond_index < ways:
        raise ValueError(f"{op}: uncond_index={uncond_index} must be in 0..{ways - 1} (pred holds {ways} ways)")
    _check_guided(op, pred, degraded, guided_channels)


if extension_available():
    @torch.library.register_fake("sag_fast::guidance_combine")
    def _guidance_combine_fake(pred, degraded, cfg_scale, sag_scale, guided_channels=-1):
        b = check_combine(pred, degraded, guided_channels)
        return pred.new_empty((b, *pred.shape[1:]))  # contiguous, like the kernels' output

    @torch.library.register_fake("sag_fast::guidance_shift_")
    def _guidance_shift_fake(pred, degraded, sag_scale, guided_channels=-1, uncond_index=0):
        check_shift(pred, degraded, guided_channels, uncond_index)
        return None
