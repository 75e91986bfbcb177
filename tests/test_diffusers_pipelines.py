"""The drop-in StableDiffusionSAGPipeline / StableDiffusionXLSAGPipeline: same call as the deprecated pipeline,
SAG for the call only, exactly the base pipeline at sag_scale=0 and after a call (also one that raised)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline as DeprecatedSAGPipeline,
)

import sag_fast
from diffusers_checks import gen, hook_state, images
from sag_fast import SAGConfig
from sag_fast.diffusers import StableDiffusionSAGPipeline, StableDiffusionXLSAGPipeline, disable_sag, enable_sag
from sag_fast.diffusers.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


def test_lazy_exports():
    assert sag_fast.StableDiffusionSAGPipeline is StableDiffusionSAGPipeline
    assert sag_fast.StableDiffusionXLSAGPipeline is StableDiffusionXLSAGPipeline
    assert sag_fast.enable_sag is enable_sag and sag_fast.disable_sag is disable_sag


def test_signature_is_the_deprecated_one():
    """Same positional order and defaults as diffusers' deprecated pipeline, and the same constructor."""
    ours = inspect.signature(StableDiffusionSAGPipeline.__call__).parameters
    theirs = inspect.signature(DeprecatedSAGPipeline.__call__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    init_ours = inspect.signature(StableDiffusionSAGPipeline.__init__).parameters
    assert list(init_ours) == list(inspect.signature(DeprecatedSAGPipeline.__init__).parameters)


@pytest.mark.parametrize("build,sag_cls", [(tiny_sd_pipeline, StableDiffusionSAGPipeline),
                                           (tiny_sdxl_pipeline, StableDiffusionXLSAGPipeline)], ids=["sd", "sdxl"])
def test_dropin_equals_enable_sag_and_leaves_no_hook(build, sag_cls):
    base = build()
    unguided = images(base, "a cat", guidance_scale=6.0)
    enable_sag(base, 0.7)
    hooked = images(base, "a cat", guidance_scale=6.0)
    disable_sag(base)

    pipe = build(sag_cls)
    state = hook_state(pipe.unet)
    out = images(pipe, "a cat", guidance_scale=6.0, sag_scale=0.7)
    assert np.array_equal(out, hooked) and np.abs(out - unguided).max() > 1e-3
    assert hook_state(pipe.unet) == state  # nothing stays installed between calls
    assert np.array_equal(images(pipe, "a cat", guidance_scale=6.0, sag_scale=0.0), unguided)
    # the base class's own __call__ on the same object is the unguided pipeline
    base_call = StableDiffusionPipeline.__call__ if sag_cls is StableDiffusionSAGPipeline \
        else StableDiffusionXLPipeline.__call__
    plain = np.asarray(base_call(pipe, "a cat", guidance_scale=6.0, num_inference_steps=2, output_type="np",
                                 generator=gen()).images)
    assert np.array_equal(plain, unguided)


def test_positional_call_and_sag_config():
    pipe = tiny_sd_pipeline(StableDiffusionSAGPipeline)
    positional = pipe("a cat", 64, 64, 2, 7.5, 0.75, None, 1, 0.0, gen(), output_type="np").images
    keywords = images(pipe, "a cat", height=64, width=64, guidance_scale=7.5, sag_scale=0.75)
    assert np.array_equal(np.asarray(positional), keywords)
    blur = images(pipe, "a cat", sag_scale=0.75, sag_config=SAGConfig(mask="global"))
    assert np.abs(blur - keywords).max() > 1e-4
    with pytest.raises(TypeError, match="enable_sag"):
        enable_sag(pipe)


def test_old_callback_and_new_keywords_pass_through():
    pipe = tiny_sd_pipeline(StableDiffusionSAGPipeline, scheduler="euler")
    steps = []
    out = images(pipe, "a cat", sag_scale=0.5, guidance_rescale=0.5, callback=lambda i, t, x: steps.append(i),
                 callback_steps=1, num_inference_steps=3)
    assert steps == [0, 1, 2] and np.isfinite(out).all()


def test_exception_in_a_call_removes_sag():
    pipe = tiny_sd_pipeline(StableDiffusionSAGPipeline)
    state = hook_state(pipe.unet)
    unguided = images(pipe, "a cat", sag_scale=0.0)

    def boom(*args):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        images(pipe, "a cat", sag_scale=0.75, callback=boom, callback_steps=1)
    assert hook_state(pipe.unet) == state
    assert np.array_equal(np.asarray(StableDiffusionPipeline.__call__(
        pipe, "a cat", num_inference_steps=2, output_type="np", generator=gen()).images), unguided)
    with pytest.raises(ValueError, match="scale"):
        images(pipe, "a cat", sag_scale=float("inf"))
    assert hook_state(pipe.unet) == state
