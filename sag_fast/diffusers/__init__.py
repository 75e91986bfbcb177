"""diffusers integration: `enable_sag(pipe)` / `disable_sag(pipe)` on any supported pipeline, and the
drop-in `StableDiffusionSAGPipeline` / `StableDiffusionXLSAGPipeline`. Tiny random pipelines for tests
and demos are in `sag_fast.diffusers.tiny`."""
from __future__ import annotations

from .hooks import disable_sag, enable_sag, last_mask, sag_config
from .pipelines import StableDiffusionSAGPipeline, StableDiffusionXLSAGPipeline

__all__ = ["enable_sag", "disable_sag", "sag_config", "last_mask", "StableDiffusionSAGPipeline", "StableDiffusionXLSAGPipeline"]
