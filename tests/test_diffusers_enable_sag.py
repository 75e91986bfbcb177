"""enable_sag / disable_sag on every supported diffusers pipeline (tiny random models, 2 steps): SAG runs
and changes the output, scale=0 and disable_sag give the unguided output bit for bit, the model is left
exactly as it was (also after a call that raised), settings and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDPMPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

from diffusers_checks import expected_guided_step, hook_state, images, record_call
from sag_fast import SAGConfig
from sag_fast.diffusers import disable_sag, enable_sag, sag_config
from sag_fast.diffusers.tiny import (tiny_dit_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline,
                                     tiny_unet2d_pipeline)

INIT_IMAGE = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


# name -> (build, call args, call kwargs)
CASES = {
    "sd1_ddim": (lambda: tiny_sd_pipeline(), ("a cat",), dict(guidance_scale=7.5)),
    "sd2_vpred_dpm": (lambda: tiny_sd_pipeline(prediction_type="v_prediction", scheduler="dpm"), (["a cat", "a dog"],),
                      dict(guidance_scale=5.0, guidance_rescale=0.7)),
    "sd1_no_cfg_euler": (lambda: tiny_sd_pipeline(scheduler="euler"), ("a cat",), dict(guidance_scale=1.0)),
    "img2img": (lambda: tiny_sd_pipeline(StableDiffusionImg2ImgPipeline), ("a cat",),
                dict(image=INIT_IMAGE, strength=0.75, num_inference_steps=3)),
    "sdxl": (lambda: tiny_sdxl_pipeline(), ("a cat",), dict(guidance_scale=5.0)),
    "dit": (lambda: tiny_dit_pipeline(), ([1, 3],), dict(guidance_scale=4.0)),
    "dit_no_cfg": (lambda: tiny_dit_pipeline(learned_sigma=False), ([2],), dict(guidance_scale=1.0)),
    "ddpm_learned_variance": (lambda: tiny_unet2d_pipeline(learned_variance=True), (), dict(batch_size=2)),
    "ddim_unet2d": (lambda: tiny_unet2d_pipeline(DDIMPipeline), (), dict(batch_size=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_enable_runs_changes_output_and_disable_restores_exactly(case):
    build, args, kwargs = CASES[case]
    pipe = build()
    model = _denoiser(pipe)
    cls, state = type(pipe), hook_state(model)
    unguided = images(pipe, *args, **kwargs)

    assert enable_sag(pipe, 0.8) is pipe
    assert isinstance(pipe, cls) and sag_config(pipe).scale == 0.8
    guided = images(pipe, *args, **kwargs)
    assert guided.shape == unguided.shape and np.isfinite(guided).all()
    assert np.abs(guided - unguided).max() > 1e-3, "SAG did not change the output"
    assert np.array_equal(images(pipe, *args, **kwargs), guided), "SAG is not deterministic"

    enable_sag(pipe, 0.0)  # enabling again replaces the settings: scale 0 is the unguided pipeline
    assert sag_config(pipe).scale == 0.0
    assert np.array_equal(images(pipe, *args, **kwargs), unguided)

    disable_sag(pipe)
    assert type(pipe) is cls and sag_config(pipe) is None
    assert hook_state(model) == state
    assert np.array_equal(images(pipe, *args, **kwargs), unguided)


def test_exception_inside_a_call_leaves_nothing_behind():
    pipe = tiny_sd_pipeline()
    state = hook_state(pipe.unet)
    unguided = images(pipe, "a cat")
    enable_sag(pipe)
    guided = images(pipe, "a cat")

    def boom(module, args):  # raises inside the degraded forward of the second step, mid-capture machinery
        boom.calls += 1
        if boom.calls == 4:
            raise RuntimeError("boom")
    boom.calls = 0
    handle = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        images(pipe, "a cat")
    handle.remove()
    # SAG stays enabled and the next call starts afresh
    assert np.array_equal(images(pipe, "a cat"), guided)
    assert torch.nn.functional.scaled_dot_product_attention.__module__ != "sag_fast.capture"
    disable_sag(pipe)
    assert hook_state(pipe.unet) == state
    assert np.array_equal(images(pipe, "a cat"), unguided)


def _count_attention_calls(pipe, **enable):
    """Forwards through the SAG layer per pipeline call: 1 per unguided step, 2 per guided step."""
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    calls = []
    handle = attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        enable_sag(pipe, **enable)
        counts = []
        for _ in range(2):  # twice: the step counter restarts with every pipeline call
            calls.clear()
            images(pipe, "a cat", guidance_scale=1.0, num_inference_steps=4)
            counts.append(len(calls))
        return counts
    finally:
        handle.remove()
        disable_sag(pipe)


@pytest.mark.parametrize("start,stop,guided_steps", [(0.0, 1.0, 4), (0.5, 1.0, 2), (0.0, 0.5, 2), (0.25, 0.5, 1),
                                                     (0.5, 0.5, 0)])
def test_start_stop_select_steps(start, stop, guided_steps):
    """DDIM, 4 steps at progress 0, 0.25, 0.5, 0.75: a guided step runs the SAG layer twice."""
    counts = _count_attention_calls(tiny_sd_pipeline(), start=start, stop=stop)
    assert counts == [4 + guided_steps] * 2


def test_progress_counts_model_calls_for_two_call_schedulers():
    """Heun lists every model call in its timesteps (2n-1 for n steps): progress is calls / len(timesteps)."""
    pipe = tiny_sd_pipeline(scheduler="heun")
    pipe.scheduler.set_timesteps(4)
    n = len(pipe.scheduler.timesteps)
    assert n == 7
    counts = _count_attention_calls(pipe, start=0.3, stop=0.8)
    assert counts == [n + sum(1 for i in range(n) if 0.3 <= i / n < 0.8)] * 2


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])  # DDIM has no begin_index, Euler has
def test_img2img_progress_counts_from_the_start_of_the_schedule(scheduler):
    """strength=0.5 runs the second half of the schedule: progress starts at 0.5, so stop=0.5 guides nothing
    (bit-identical to the unguided output) and start=0.5 guides every step."""
    pipe = tiny_sd_pipeline(StableDiffusionImg2ImgPipeline, scheduler=scheduler)
    call = dict(image=INIT_IMAGE, strength=0.5, num_inference_steps=4)
    unguided = images(pipe, "a cat", **call)
    enable_sag(pipe, stop=0.5)
    assert np.array_equal(images(pipe, "a cat", **call), unguided)
    enable_sag(pipe, start=0.5)
    from_half = images(pipe, "a cat", **call)
    enable_sag(pipe)
    assert np.array_equal(from_half, images(pipe, "a cat", **call))
    assert np.abs(from_half - unguided).max() > 1e-3
    disable_sag(pipe)


def test_dit_guided_step_matches_reference():
    """DiT: the unconditional (null class) half is second, learned sigma channels are left alone."""
    pipe = tiny_dit_pipeline()
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    with record_call(model, 1) as rec:
        images(pipe, [1, 3], guidance_scale=4.0, num_inference_steps=3)
    x = rec["args"][0]
    kwargs = {k: v for k, v in rec["kwargs"].items() if k != "return_dict"}
    t = kwargs.pop("timestep")
    acp = pipe.scheduler.alphas_cumprod[int(t[0])].double()
    disable_sag(pipe)
    with torch.no_grad():
        expected, plain, mask = expected_guided_step(
            model, x, t, kwargs, attn_path="transformer_blocks.1.attn1", grid_path=(x.shape[-2] // 2, x.shape[-1] // 2),
            alpha=acp.sqrt(), sigma=(1 - acp).sqrt(), prediction_type="epsilon", scale=0.9, ways=2, uncond_index=1,
            guided=4)
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(rec["output"][:, 4:], plain[:, 4:])
    torch.testing.assert_close(rec["output"], expected, rtol=0, atol=1e-4)


def test_disable_without_enable_is_a_no_op():
    pipe = tiny_unet2d_pipeline()
    state = hook_state(pipe.unet)
    assert disable_sag(pipe) is pipe
    assert type(pipe) is DDPMPipeline and hook_state(pipe.unet) == state


def test_enable_twice_keeps_one_hook_and_the_newest_settings():
    pipe = tiny_sd_pipeline()
    enable_sag(pipe, 0.3, blur_sigma=2.0)
    enable_sag(pipe, config=SAGConfig(scale=0.5, kernel_size=5))
    assert sag_config(pipe) == SAGConfig(scale=0.5, kernel_size=5)
    assert list(pipe.unet._diffusers_hook.hooks) == ["sag_fast"]
    assert type(pipe)._sag_base_class is StableDiffusionPipeline and isinstance(pipe, StableDiffusionPipeline)
    enable_sag(pipe, 0.2, config=SAGConfig(scale=0.5, kernel_size=5))
    assert sag_config(pipe).scale == 0.2
    disable_sag(pipe)
    assert type(pipe) is StableDiffusionPipeline and not getattr(vars(pipe.unet).get("_diffusers_hook"), "hooks", {})


def test_global_mask_and_layer_choice_change_the_result():
    pipe = tiny_sd_pipeline()
    enable_sag(pipe)
    default = images(pipe, "a cat")
    enable_sag(pipe, mask="global")
    blur = images(pipe, "a cat")
    enable_sag(pipe, layer=r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1")
    other = images(pipe, "a cat")
    disable_sag(pipe)
    assert np.abs(default - blur).max() > 1e-4 and np.abs(default - other).max() > 1e-4


class _NoDenoiser:
    scheduler = None


def test_errors_at_enable_time():
    pipe = tiny_sd_pipeline()
    state = hook_state(pipe.unet)
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline.*_NoDenoiser"):
        enable_sag(_NoDenoiser())
    from diffusers import DiffusionPipeline

    class SchedulerOnly(DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    with pytest.raises(ValueError, match="pipe: SchedulerOnly has no `unet` or `transformer`"):
        enable_sag(SchedulerOnly(pipe.scheduler))
    with pytest.raises(ValueError, match="layer="):
        enable_sag(pipe, layer="mid_block.not_there")
    with pytest.raises(ValueError, match="not self-attention"):
        enable_sag(pipe, layer="mid_block.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(TypeError, match="unknown setting.*bogus"):
        enable_sag(pipe, bogus=1)
    with pytest.raises(ValueError, match="kernel_size"):
        enable_sag(pipe, kernel_size=4)
    with pytest.raises(ValueError, match="scale"):
        enable_sag(pipe, float("nan"))
    from diffusers import KDPM2AncestralDiscreteScheduler
    original = pipe.scheduler
    pipe.scheduler = KDPM2AncestralDiscreteScheduler.from_config(original.config)
    with pytest.raises(ValueError, match="KDPM2AncestralDiscreteScheduler"):
        enable_sag(pipe)
    pipe.scheduler = original
    # nothing was left behind by the failed attempts
    assert type(pipe) is StableDiffusionPipeline and hook_state(pipe.unet) == state and sag_config(pipe) is None
