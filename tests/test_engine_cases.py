"""The five set-ups of issue 14, each of which was wrong on the old integration: another thread's call of a shared
denoiser, SD3's skip-layer guidance, a modular guider whose scheduler was replaced, attention slicing, and the
dynamic-CFG callback of the diffusers docs. Each test fails on the old code (see the comment in each)."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusers_checks import gen, images, plain_forward
from sag_fast.diffusers import enable_sag
from sag_fast.diffusers.tiny import tiny_sd3_pipeline, tiny_sd_pipeline

MID_ATTN = "mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------------------------------- case 1: threads
def test_shared_unet_called_from_another_thread_mid_forward_is_never_captured():
    """The plain pipeline's UNet call runs in another thread while the SAG forward is inside the SAG layer (a
    pre-hook on that layer starts it and waits for it). Old code: the layer's capture was armed for everyone, so
    the other call's attention became SAG's mask."""
    pipe = tiny_sd_pipeline()
    enable_sag(pipe, 1.0)
    alone = images(pipe, "a red cat", num_inference_steps=3)
    # the UNet shared, the scheduler not (a scheduler holds the state of one run: sharing it is wrong with or
    # without SAG)
    plain = StableDiffusionPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    layer = dict(pipe.unet.named_modules())[MID_ATTN]
    fired, errors = [], []

    def other_call():
        try:
            plain("a blue house in the rain", num_inference_steps=1, output_type="latent", generator=gen(7),
                  guidance_scale=1.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def pre_hook(module, args):
        if threading.current_thread() is threading.main_thread() and len(fired) < 3:
            fired.append(1)
            worker = threading.Thread(target=other_call)
            worker.start()
            worker.join(timeout=120)

    handle = layer.register_forward_pre_hook(pre_hook)
    try:
        interleaved = images(pipe, "a red cat", num_inference_steps=3)
    finally:
        handle.remove()
    assert len(fired) == 3 and not errors, errors
    np.testing.assert_array_equal(interleaved, alone)


# ------------------------------------------------------------------------------------- case 2: SD3 SLG
def test_sd3_skip_layer_prediction_gets_the_same_shift():
    """pred = u' + w(c' - u') + slg (c' - skip'): SAG's shift reaches the skip-layer prediction too, so it cancels
    there. Old code left the skip prediction unshifted, scaling SAG's term by (1 + slg) on SLG steps."""
    pipe = tiny_sd3_pipeline()
    enable_sag(pipe, 1.0)
    calls = []

    def pre(module, args, kwargs):
        calls.append({"kwargs": {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}})

    def post(module, args, kwargs, output):
        calls[-1]["out"] = output[0].clone()

    h1 = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(post, with_kwargs=True)
    try:
        pipe("a cat", generator=gen(0), num_inference_steps=3, max_sequence_length=4, output_type="latent",
             skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
             skip_layer_guidance_scale=2.8)
    finally:
        h1.remove()
        h2.remove()
    # the pipeline's outer calls only (the hooks also see SAG's degraded forward, which has B rows and no
    # skip_layers: it follows its main call)
    skips = [i for i, c in enumerate(calls) if c["kwargs"].get("skip_layers") is not None]
    assert skips, "no skip-layer call was made"
    checked = 0
    for i in skips:
        main = next(j for j in range(i - 1, -1, -1) if calls[j]["kwargs"]["hidden_states"].shape[0] == 2)
        raw_main = plain_forward(pipe.transformer, **calls[main]["kwargs"])
        shift = calls[main]["out"] - raw_main  # what SAG added to each way of the main call
        torch.testing.assert_close(shift[0], shift[1], rtol=0, atol=1e-6)
        assert shift.abs().max() > 1e-3, "SAG did not act on this step"
        raw_skip = plain_forward(pipe.transformer, **calls[i]["kwargs"])
        torch.testing.assert_close(calls[i]["out"], raw_skip + shift[1:], rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == len(skips)


# ------------------------------------------------------------------------------ case 3: stale scheduler
def test_guider_with_a_replaced_scheduler_is_refused_not_silently_stale():
    """The modular pipeline's scheduler is replaced after the guider was built: the guider's old scheduler has the
    same timesteps and a leftover step index (sigma 0). Old code used it and blurred the noisy input itself."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from sag_fast.diffusers.guider import SelfAttentionGuidance
    from sag_fast.diffusers.tiny import tiny_scheduler, tiny_sdxl_components

    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    parts = tiny_sdxl_components(scheduler="euler")
    pipe.update_components(**{k: v for k, v in parts.items() if k in pipe._component_specs and v is not None})
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red cat", height=64, width=64, num_inference_steps=3, output="latents")
    guider = SelfAttentionGuidance(guidance_scale=5.0, sag_scale=1.0, scheduler=pipe.scheduler)
    pipe.update_components(guider=guider)
    pipe(**call, generator=gen(0))  # the guider's scheduler is now at the end of its schedule
    pipe.update_components(scheduler=tiny_scheduler("euler"))
    with pytest.raises(ValueError, match=r"guider\.scheduler = pipe\.scheduler"):
        pipe(**call, generator=gen(0))
    guider.scheduler = pipe.scheduler  # the fix the message names
    fresh = SelfAttentionGuidance(guidance_scale=5.0, sag_scale=1.0, scheduler=pipe.scheduler)
    a = pipe(**call, generator=gen(0))
    pipe.update_components(guider=fresh)
    b = pipe(**call, generator=gen(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------- case 4: attention slicing
@pytest.mark.parametrize("when", ["before", "after"])
def test_attention_slicing_refused_before_sampling(when):
    """Sliced attention computes the softmax in pieces: SAG's capture would see one slice. Old code accepted it and
    failed at the first guided step ("does not split into heads") or with a mask-shape error."""
    pipe = tiny_sd_pipeline()
    if when == "before":
        pipe.enable_attention_slicing(1)
        with pytest.raises(ValueError, match="attention slicing"):
            enable_sag(pipe, 0.75)
        return
    enable_sag(pipe, 0.75)
    pipe.enable_attention_slicing("max")
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="attention slicing"):
            images(pipe, "a cat")
    finally:
        handle.remove()
    assert calls == [], "the refusal must come before any denoiser call"
    pipe.disable_attention_slicing()
    assert np.isfinite(images(pipe, "a cat")).all()


def test_xformers_processor_refused_before_sampling():
    """xFormers' processors run the attention in xFormers' kernel, where the capture sees nothing: refused at
    enable_sag and, set since, at the call (the old message, mid-run, was "no attention was captured")."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    pipe = tiny_sd_pipeline()
    layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    layer.set_processor(XFormersAttnProcessor())
    with pytest.raises(ValueError, match=r"uses xFormers \(XFormersAttnProcessor\).*disable_xformers_memory"):
        enable_sag(pipe, 0.75)
    layer.set_processor(AttnProcessor2_0())
    enable_sag(pipe, 0.75)
    layer.set_processor(XFormersAttnProcessor())
    with pytest.raises(ValueError, match="uses xFormers"):
        images(pipe, "a cat")
    layer.set_processor(AttnProcessor2_0())
    assert np.isfinite(images(pipe, "a cat")).all()


# --------------------------------------------------------------------------------- case 5: dynamic CFG
def _dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    # the recipe of diffusers' docs (callback_on_step_end): CFG off after 40% of the steps
    if step_index == int(pipe.num_timesteps * 0.4):
        callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return callback_kwargs


def test_dynamic_cfg_callback_sag_guides_the_remaining_way():
    """Old code: the batch contract read CFG from the call's arguments and stopped mid-run once the callback
    switched CFG off."""
    pipe = tiny_sd_pipeline()
    enable_sag(pipe, 1.0)
    batches = []
    # conv_in sees every UNet forward, the degraded one (called inside the hook) included
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    call = dict(num_inference_steps=5, callback_on_step_end=_dynamic_cfg,
                callback_on_step_end_tensor_inputs=["prompt_embeds"])
    try:
        guided = images(pipe, "a cat", **call)
    finally:
        handle.remove()
    # steps 0-2 with CFG: [2 rows, then the degraded uncond row]; steps 3-4 without: [1 row, its degraded row]
    assert batches == [2, 1, 2, 1, 2, 1, 1, 1, 1, 1], batches
    # SAG acts after the switch: stopping it there changes the image
    enable_sag(pipe, 1.0, stop=0.6)
    stopped = images(pipe, "a cat", **call)
    assert np.abs(guided - stopped).max() > 1e-4
