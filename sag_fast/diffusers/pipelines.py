"""Drop-in SAG pipelines: change one import.

    from diffusers import StableDiffusionSAGPipeline      # deprecated since diffusers 0.33.1
    from sag_fast import StableDiffusionSAGPipeline       # same constructor, same call, sag_scale=0.75

They are the standard diffusers pipelines (every scheduler, guidance_rescale, callbacks, a `torch.compile`d
unet, ...) with the SAG session of `enable_sag` built in their constructor (so everything unsupported is refused
there) and live only during each call with sag_scale != 0. sag_scale=0 is exactly the base pipeline.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..guidance import SAGConfig, make_config
from .session import STATE_ATTR, SAGCopyMixin, SAGSession, attach_session


def _with_session(init):
    """The base pipeline's __init__ (same signature: diffusers' from_pretrained reads it), then the SAG session:
    everything SAG cannot support is refused by the constructor."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        attach_session(self, SAGSession(self, SAGConfig()))

    return __init__


class _SAGPipelineMixin(SAGCopyMixin):
    """SAG for each call of the base pipeline's __call__, from a session built with the pipeline."""

    def _sag_call(self, base_call: Callable, sag_scale: float, sag_config: SAGConfig | None, args, kwargs):
        config = make_config(sag_scale, sag_config, where=f"{type(self).__name__}.__call__")
        if config.scale == 0.0:
            return base_call(self, *args, **kwargs)
        session: SAGSession = vars(self)[STATE_ATTR]
        if (config.layer, config.mask) != (session.config.layer, session.config.mask):
            session.remove()  # another layer or mask mode: a new capture (checked here, before sampling)
            session = SAGSession(self, config)
            attach_session(self, session)
        with session.pipeline_call(base_call, self, args, kwargs, config=config):
            return base_call(self, *args, **kwargs)


class StableDiffusionSAGPipeline(_SAGPipelineMixin, StableDiffusionPipeline):
    """Stable Diffusion (1.x, 2.x) with Self-Attention Guidance; a drop-in for diffusers' deprecated
    `StableDiffusionSAGPipeline`: same components, same positional call order, plus every keyword of
    `StableDiffusionPipeline.__call__` (timesteps, sigmas, guidance_rescale, callback_on_step_end, ...) and
    `sag_config=SAGConfig(...)` for the other SAG settings (layer, blur, threshold, start/stop)."""

    __init__ = _with_session(StableDiffusionPipeline.__init__)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sag_scale: float = 0.75,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int | None = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        *,
        sag_config: SAGConfig | None = None,
        **kwargs,
    ):
        call_kwargs = dict(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip, **kwargs,
        )
        if callback is not None:  # the old per-step callback, still accepted (deprecated) by the base pipeline
            call_kwargs.update(callback=callback, callback_steps=callback_steps)
        return self._sag_call(StableDiffusionPipeline.__call__, sag_scale, sag_config, (), call_kwargs)


class StableDiffusionXLSAGPipeline(_SAGPipelineMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL with Self-Attention Guidance: `StableDiffusionXLPipeline`'s constructor and call,
    plus the keywords `sag_scale=0.75` and `sag_config=SAGConfig(...)`."""

    __init__ = _with_session(StableDiffusionXLPipeline.__init__)

    @torch.no_grad()
    def __call__(self, *args, sag_scale: float = 0.75, sag_config: SAGConfig | None = None, **kwargs):
        return self._sag_call(StableDiffusionXLPipeline.__call__, sag_scale, sag_config, args, kwargs)
