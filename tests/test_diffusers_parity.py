"""Parity with diffusers' deprecated StableDiffusionSAGPipeline, and the guided step against the reference
for the schedulers that pipeline rejects. Tiny random fp32 models (sag_fast.diffusers.tiny), 2 steps."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline as DeprecatedSAGPipeline,
)

from diffusers_checks import expected_guided_step, images, record_call, vp_input_alpha_sigma_from_sigma
from sag_fast.diffusers import StableDiffusionSAGPipeline, disable_sag, enable_sag
from sag_fast.ops.testing import triton_on_cpu
from sag_fast.diffusers.tiny import tiny_sd_components, tiny_sd_pipeline

PROMPTS = ["a red cat", "a dog on the moon"]
MID_ATTN = "mid_block.attentions.0.transformer_blocks.0.attn1"
MID_GRID = "mid_block.attentions.0"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read before the fixture routes the ops to the CPU path


def _pipe(cls, scheduler, prediction_type="epsilon"):
    # components are rebuilt from the same seed for each pipeline: identical weights, no shared modules
    return tiny_sd_pipeline(cls, prediction_type=prediction_type, scheduler=scheduler)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("scheduler,prediction_type", [("ddim", "epsilon"), ("pndm", "epsilon"), ("dpm", "epsilon"),
                                                       ("ddim", "v_prediction")])
def test_matches_deprecated_pipeline(scheduler, prediction_type, guidance_scale):
    """2 prompts x 2 images per prompt, a 64x96 image (8x12 latents, a 4x6 attention grid)."""
    call = dict(guidance_scale=guidance_scale, num_images_per_prompt=2, height=64, width=96)
    expected = images(_pipe(DeprecatedSAGPipeline, scheduler, prediction_type), PROMPTS, sag_scale=0.75, **call)
    assert expected.shape == (4, 64, 96, 3)

    plain = _pipe(StableDiffusionPipeline, scheduler, prediction_type)
    unguided = images(plain, PROMPTS, **call)
    enable_sag(plain, 0.75)
    hooked = images(plain, PROMPTS, **call)
    dropin = images(_pipe(StableDiffusionSAGPipeline, scheduler, prediction_type), PROMPTS, sag_scale=0.75, **call)

    # SAG must have changed something, else the parity below would be vacuous
    assert np.abs(expected - unguided).max() > 1e-2
    np.testing.assert_allclose(hooked, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(dropin, expected, rtol=0, atol=1e-4)


def test_deprecated_pipeline_components_and_sag_scale_zero():
    """tiny_sd_components feeds both pipelines; at sag_scale=0 all three agree with plain SD."""
    call = dict(guidance_scale=7.5, height=64, width=64)
    old = DeprecatedSAGPipeline(**tiny_sd_components())
    old.set_progress_bar_config(disable=True)
    base = images(_pipe(StableDiffusionPipeline, "ddim"), PROMPTS[0], **call)
    np.testing.assert_allclose(images(old, PROMPTS[0], sag_scale=0.0, **call), base, rtol=0, atol=1e-5)
    assert np.array_equal(images(_pipe(StableDiffusionSAGPipeline, "ddim"), PROMPTS[0], sag_scale=0.0, **call), base)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("scheduler", ["euler", "heun", "lms", "dpm_karras"])
def test_guided_step_matches_reference_for_other_schedulers(scheduler, guidance_scale):
    """Schedulers the deprecated pipeline rejects: record the second denoiser call of a SAG run (64x80 image,
    8x10 latents) and recompute it from the reference: materialised attention probabilities -> mask,
    (c1, c2) from the scheduler's own sigma, reference.degrade, reference.guidance_shift."""
    pipe = _pipe(StableDiffusionPipeline, scheduler)
    call = dict(guidance_scale=guidance_scale, height=64, width=80, num_inference_steps=3)
    unguided = images(pipe, PROMPTS[0], **call)
    enable_sag(pipe, 0.6)
    with record_call(pipe.unet, 1, pipe.scheduler) as rec:
        guided = images(pipe, PROMPTS[0], **call)
    assert rec, "the denoiser was not called twice"
    assert np.abs(guided - unguided).max() > 1e-3
    assert np.isfinite(guided).all()

    x, t = rec["args"][:2] if len(rec["args"]) >= 2 else (rec["args"][0], rec["kwargs"].pop("timestep"))
    kwargs = {k: v for k, v in rec["kwargs"].items() if k != "return_dict"}
    sigma_k = pipe.scheduler.sigmas[rec["step_index"]]
    alpha, sigma = vp_input_alpha_sigma_from_sigma(sigma_k)
    ways = 2 if guidance_scale > 1 else 1
    disable_sag(pipe)  # the recomputation runs on the plain model
    with torch.no_grad():
        expected, plain, mask = expected_guided_step(pipe.unet, x, t, kwargs, attn_path=MID_ATTN, grid_path=MID_GRID,
                                                     alpha=alpha, sigma=sigma, prediction_type="epsilon",
                                                     scale=0.6, ways=ways)
    assert 0 < int(mask.sum()) < mask.numel(), "degenerate attention mask: the test would not see the mask"
    assert (expected - plain).abs().max() > 1e-4
    torch.testing.assert_close(rec["output"], expected, rtol=0, atol=1e-4)


@pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter is what runs Triton on a CPU "
                    "(make test sets TRITON_INTERPRET=1 without a GPU)")
def test_interpreted_kernels_end_to_end():
    """The fused ops' Triton kernels (interpreted, as the CPU kernels of the ops) inside a pipeline, against the
    deprecated pipeline. Small: one image. The other integration tests run the C++/torch CPU kernels."""
    call = dict(guidance_scale=7.5, height=64, width=64)
    expected = images(_pipe(DeprecatedSAGPipeline, "ddim"), PROMPTS[0], sag_scale=0.75, **call)
    with triton_on_cpu():
        got = images(_pipe(StableDiffusionSAGPipeline, "ddim"), PROMPTS[0], sag_scale=0.75, **call)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_cuda_matches_deprecated_pipeline(scheduler):
    """The CUDA kernels inside a pipeline (fp32, TF32 off so both pipelines compute alike)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # restored: global state
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    try:
        call = dict(guidance_scale=7.5, num_images_per_prompt=2, height=64, width=96)
        old = _pipe(DeprecatedSAGPipeline, scheduler).to("cuda")
        new = _pipe(StableDiffusionSAGPipeline, scheduler).to("cuda")
        expected = images(old, PROMPTS, sag_scale=0.75, **call)
        np.testing.assert_allclose(images(new, PROMPTS, sag_scale=0.75, **call), expected, rtol=0, atol=1e-4)
        half = tiny_sd_pipeline(StableDiffusionSAGPipeline, scheduler=scheduler, device="cuda", dtype=torch.float16)
        out16 = images(half, PROMPTS, sag_scale=0.75, **call)
        assert np.isfinite(out16).all() and np.abs(out16 - expected).max() < 0.1
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
