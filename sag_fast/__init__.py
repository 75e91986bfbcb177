"""sag_fast: fast Self-Attention Guidance (SAG) for diffusion models.

`import sag_fast` loads the compiled extension and registers every `sag_fast::` custom op with its
kernels and its fake (so `torch.ops.sag_fast.*` works under FakeTensor and torch.compile with no other
import); that imports torch and triton. The diffusers integration and the sampler load on first use.
"""
from __future__ import annotations

import importlib

from ._lib import extension_available, extension_has_cuda
from .ops import degrade as _degrade, guidance as _guidance, mask as _mask  # noqa: F401  (registrations)

__version__ = "0.1.0"

# public name -> module that defines it, imported lazily (diffusers is heavy to import)
_LAZY = {
    "SAGConfig": "sag_fast.guidance",
    "SAGSampler": "sag_fast.sampler",
    "enable_sag": "sag_fast.diffusers",
    "SAGLayout": "sag_fast.diffusers.contract",
    "SelfAttentionGuidance": "sag_fast.diffusers.guider",
    "disable_sag": "sag_fast.diffusers",
    "sag_config": "sag_fast.diffusers",
    "last_mask": "sag_fast.diffusers",
    "StableDiffusionSAGPipeline": "sag_fast.diffusers",
    "StableDiffusionXLSAGPipeline": "sag_fast.diffusers",
}

__all__ = ["extension_available", "extension_has_cuda", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sag_fast' has no attribute {name!r}")
