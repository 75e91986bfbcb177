"""The fused ops, one module each: Triton kernels (mask, degrade) and the C++/CUDA guidance combination."""
from .degrade import degrade
from .guidance import guidance_combine, guidance_shift_
from .mask import mask_from_probs, mask_from_qk

__all__ = ["degrade", "guidance_combine", "guidance_shift_", "mask_from_probs", "mask_from_qk"]
