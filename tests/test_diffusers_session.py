"""The SAG session on the set-ups people really run (issue 8): LoRA before/after enable_sag, fused QKV,
pipelines sharing a denoiser, deepcopy/pickle, torch.compile (no graph break, no recompile after the first
call), fake-CUDA device placement, and the small refusals. Each test failed on the session it replaced."""
from __future__ import annotations

import copy
import functools
import gc
import pickle

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import test_diffusers_families as fam
import tiny_pipelines as tp
from diffusers_checks import hook_state, images
from fake_cuda import fake_cuda, to_fake_cuda
from test_diffusers_contract import t5_text
from sag_fast import SAGConfig
from sag_fast.diffusers import disable_sag, enable_sag, sag_config
from sag_fast.diffusers.tiny import (tiny_dit_pipeline, tiny_flux_pipeline, tiny_qwenimage_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline,
                                     tiny_sdxl_pipeline, tiny_unet2d_pipeline)

import peft  # noqa: E402  (a test dependency: requirements.txt)


def _add_lora(unet, seed: int = 1):
    """A LoRA adapter with non-zero (seeded) weights on the attention projections."""
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------ item 1
def test_lora_added_after_enable_sag_is_seen_by_the_mask():
    """The mask comes from the q/k the layer attends with: LoRA added after enable_sag must give the same image
    as LoRA added before (the old capture hooked the peft base layer and missed the LoRA delta)."""
    before = tiny_sd_pipeline()
    _add_lora(before.unet)
    enable_sag(before, 1.0)
    want = images(before, "a cat")

    after = tiny_sd_pipeline()
    enable_sag(after, 1.0)
    _add_lora(after.unet)
    got = images(after, "a cat")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    no_lora = tiny_sd_pipeline()
    enable_sag(no_lora, 1.0)
    assert np.abs(images(no_lora, "a cat") - want).max() > 1e-3  # the LoRA matters here

    after.unet.fuse_lora()  # LoRA fused into the weights: the same attention, the same image
    np.testing.assert_allclose(images(after, "a cat"), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize("order", ["fuse_then_enable", "enable_then_fuse"])
def test_fused_qkv_projections(order):
    plain = tiny_sd_pipeline()
    enable_sag(plain, 1.0)
    want = images(plain, "a cat")

    pipe = tiny_sd_pipeline()
    if order == "fuse_then_enable":
        pipe.fuse_qkv_projections()
        enable_sag(pipe, 1.0)
    else:
        enable_sag(pipe, 1.0)
        pipe.fuse_qkv_projections()
    got = images(pipe, "a cat")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    pipe.unfuse_qkv_projections()
    np.testing.assert_allclose(images(pipe, "a cat"), want, rtol=0, atol=1e-5)
    disable_sag(pipe)
    assert np.abs(images(pipe, "a cat") - want).max() > 1e-3


# ------------------------------------------------------------------------------------------ item 2
def test_a_pipeline_sharing_the_denoiser_never_gets_sag():
    pipe = tiny_sd_pipeline()
    plain = images(pipe, "a cat")
    plain_i2i = images(StableDiffusionImg2ImgPipeline(**pipe.components), "a cat",
                       image=torch.full((1, 3, 64, 64), 0.5), strength=0.8, num_inference_steps=3)
    enable_sag(pipe, 1.0)
    guided = images(pipe, "a cat")
    assert np.abs(guided - plain).max() > 1e-3

    other = StableDiffusionPipeline(**pipe.components)
    assert np.array_equal(images(other, "a cat"), plain)  # twice: no stale state from the SAG pipeline's calls
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert np.array_equal(images(i2i, "a cat", image=torch.full((1, 3, 64, 64), 0.5), strength=0.8,
                                 num_inference_steps=3), plain_i2i)
    assert disable_sag(other) is other and sag_config(other) is None  # a no-op: it never had SAG
    assert np.array_equal(images(pipe, "a cat"), guided)  # the SAG pipeline is untouched by all this
    with pytest.raises(RuntimeError, match="already has SAG enabled.*disable_sag"):
        enable_sag(other)
    disable_sag(pipe)
    enable_sag(other, 1.0)  # once the first lets go, the second may take it
    assert np.array_equal(images(other, "a cat"), guided)


# ------------------------------------------------------------------------------------------ item 3
def test_deepcopy_carries_sag_and_outlives_the_original():
    pipe = tiny_sd_pipeline()
    enable_sag(pipe, 1.0, blur_sigma=1.5)
    guided = images(pipe, "a cat")
    clone = copy.deepcopy(pipe)
    assert clone.unet is not pipe.unet and sag_config(clone) == sag_config(pipe)
    del pipe
    gc.collect()
    assert np.array_equal(images(clone, "a cat"), guided)
    disable_sag(clone)
    assert np.abs(images(clone, "a cat") - guided).max() > 1e-3


def test_pickle_round_trip_keeps_sag():
    pipe = tiny_unet2d_pipeline(DDIMPipeline)
    enable_sag(pipe, 1.0)
    guided = images(pipe, batch_size=1)
    restored = pickle.loads(pickle.dumps(pipe))
    assert type(restored).__name__ == "DDIMPipeline" and sag_config(restored) == sag_config(pipe)
    assert np.array_equal(images(restored, batch_size=1), guided)
    assert np.array_equal(images(pipe, batch_size=1), guided)  # pickling left the original as it was
    disable_sag(restored)
    assert type(restored) is DDIMPipeline


# ------------------------------------------------------------------------------------------ item 8
def _dynamo_counts():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("order, fullgraph", [("compile_then_enable", True), ("enable_then_compile", False)])
def test_torch_compile_no_graph_break_no_recompile(order, fullgraph):
    torch._dynamo.reset()
    eager = tiny_sd_pipeline()
    enable_sag(eager, 1.0)
    want = images(eager, "a cat")

    pipe = tiny_sd_pipeline()
    if order == "compile_then_enable":
        pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=fullgraph)
        enable_sag(pipe, 1.0)
    else:
        enable_sag(pipe, 1.0)
        pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=fullgraph)
    breaks0, _ = _dynamo_counts()
    first = images(pipe, "a cat")
    breaks1, graphs1 = _dynamo_counts()
    second = images(pipe, "a cat")
    breaks2, graphs2 = _dynamo_counts()
    print(f"\n{order}, fullgraph={fullgraph}: graph breaks {breaks2 - breaks0}, graphs after the first call "
          f"{graphs1}, new graphs in the second call {graphs2 - graphs1}")
    np.testing.assert_allclose(first, want, rtol=0, atol=1e-5)
    assert np.array_equal(second, first)
    assert breaks1 == breaks0 and breaks2 == breaks1, "SAG added a graph break"
    assert graphs2 == graphs1, "a recompilation after the first pipeline call"
    disable_sag(pipe)
    plain = tiny_sd_pipeline()
    np.testing.assert_allclose(images(pipe, "a cat"), images(plain, "a cat"), rtol=0, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_torch_compile_reduce_overhead_cuda_graphs():
    torch._dynamo.reset()
    eager = tiny_sd_pipeline(device="cuda")
    enable_sag(eager, 1.0)
    want = images(eager, "a cat")
    pipe = tiny_sd_pipeline(device="cuda")
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    enable_sag(pipe, 1.0)
    images(pipe, "a cat")
    _, graphs1 = _dynamo_counts()
    got = images(pipe, "a cat")
    _, graphs2 = _dynamo_counts()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    assert graphs2 == graphs1


# ------------------------------------------------------------------------------------------ item 9
# name -> (build, call kwargs, whether the pipeline hands the model its timestep on the CPU when on a GPU: read
# from its source: DDPM/DDIM call set_timesteps() without a device and pass those timesteps as they are; SD
# and SDXL set them on the device; DiT moves its own copy there)
FAKE_CASES = {
    "ddpm": (lambda: tiny_unet2d_pipeline(), dict(batch_size=2), True),
    "ddim_unet2d": (lambda: tiny_unet2d_pipeline(DDIMPipeline), dict(batch_size=1), True),
    "sd1": (lambda: tiny_sd_pipeline(), dict(prompt="a cat"), False),
    "sdxl": (lambda: tiny_sdxl_pipeline(), dict(prompt="a cat"), False),
    "dit": (lambda: tiny_dit_pipeline(), dict(class_labels=[1, 3]), False),
    "sd3": (lambda: tiny_sd3_pipeline(), dict(prompt="a cat", max_sequence_length=4), False),
    "pixart": (lambda: tp.pixart_pipeline(), dict(**t5_text(mask=True), height=64, width=64), False),
    "flux": (lambda: tiny_flux_pipeline(), dict(prompt_embeds=torch.ones(1, 5, 32), pooled_prompt_embeds=torch.ones(1, 32),
                                                height=64, width=64), False),
    # issue 15: packed conditioning channels, context tokens after the latent's, PAG's third way, added-KV attention
    "flux_fill": (lambda: tiny_flux_pipeline(__import__("diffusers").FluxFillPipeline, in_channels=384),
                  dict(prompt_embeds=torch.ones(1, 5, 32), pooled_prompt_embeds=torch.ones(1, 32), height=64, width=64,
                       image=torch.rand(1, 3, 64, 64), mask_image=torch.ones(1, 1, 64, 64)), False),
    "flux_kontext": (lambda: tiny_flux_pipeline(__import__("diffusers").FluxKontextPipeline),
                     dict(prompt_embeds=torch.ones(1, 5, 32), pooled_prompt_embeds=torch.ones(1, 32), height=64,
                          width=64, image=torch.rand(1, 3, 64, 32), max_area=64 * 64, _auto_resize=False), False),
    "pag_sd": (lambda: tp.pag_pipeline(), dict(prompt="a cat", pag_scale=2.0), False),
    "if_added_kv": (lambda: tp.if_pipeline(added_kv=True), dict(**t5_text(), height=8, width=8), False),
    # issue 15's families (tests/test_diffusers_families.py): padded text masks, split CFG, 0-dim timesteps
    **{name: (fam.CASES[name].build, fam.CASES[name].call(1), False) for name in fam.FAKE_CUDA},
    # packed latents, true CFG in two calls, padded text keys masked in the joint attention (the capture's key bias)
    "qwenimage": (lambda: tiny_qwenimage_pipeline(), dict(
        prompt_embeds=torch.ones(1, 5, 32), prompt_embeds_mask=torch.tensor([[1, 1, 1, 1, 0]]),
        negative_prompt_embeds=torch.ones(1, 4, 32), negative_prompt_embeds_mask=torch.tensor([[1, 1, 0, 0]]),
        true_cfg_scale=4.0, height=32, width=32), False),
    # video. (Wan T2V and I2V are not here: their rotary embedding indexes tensors in a way tests/fake_cuda.py's shim does not
    # replay on a CPU-only torch, inside the model's own forward, before anything of SAG's runs.)
    "animatediff": (lambda: tp.animatediff_pipeline(), dict(prompt="a cat", num_frames=3, height=64, width=64), False),
}


def _fake_cuda_like(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    if isinstance(value, dict):
        return {k: _fake_cuda_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fake_cuda_like(v) for v in value)
    return value


@pytest.mark.parametrize("case", list(FAKE_CASES))
def test_guided_model_call_on_fake_cuda_mixes_no_devices(case):
    """The guided denoiser call of each pipeline with the model, latents and conditioning on a fake CUDA device
    (FakeTensorMode raises on any device mix; the ops run their fakes) and the timestep where that pipeline
    puts it on a GPU: DDPM/DDIM call set_timesteps() without a device, so theirs stays on the CPU. The call is
    recorded from a real run; its replay goes through the whole SAG step (capture, degrade, extra forward)."""
    build, kwargs, t_on_cpu = FAKE_CASES[case]
    pipe = build()
    enable_sag(pipe, 1.0)
    model = getattr(pipe, "unet", None) or pipe.transformer
    set_timesteps, placed, calls = pipe.scheduler.set_timesteps, [], []
    pipe.scheduler.set_timesteps = functools.wraps(set_timesteps)(  # wraps: pipelines inspect its parameters
        lambda *a, **k: placed.append(k.get("device")) or set_timesteps(*a, **k))
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)) if len(calls) < 2 else None,
                                             with_kwargs=True)
    pipe(**kwargs, num_inference_steps=2, output_type="latent")
    handle.remove()
    del pipe.scheduler.set_timesteps
    session = vars(pipe)["_sag_fast_state"]
    # the step's calls to replay: one, or with split CFG (Flux true CFG, Wan) the conditional call, then the guided
    # unconditional one
    replay = calls[:2] if session.contract.split_cfg(pipe, dict(kwargs)) else calls[:1]
    args, call_kwargs = calls[0]
    t = args[1] if len(args) > 1 else call_kwargs["timestep"]
    if not args:  # a transformer called by keyword (SD3, Flux, Wan): hidden_states is the first argument
        args = (call_kwargs["hidden_states"],)
    assert isinstance(t, torch.Tensor)
    if t_on_cpu:  # the premise of the case, checked on the real run: no device given, t straight from the schedule
        assert placed[0] is None
        assert t.untyped_storage().data_ptr() == pipe.scheduler.timesteps.untyped_storage().data_ptr()
    on_device = not t_on_cpu
    seen = []
    hook = model.register_forward_hook(lambda m, a, k, out: seen.append((out[0] if isinstance(out, tuple) else
                                                                          out.sample).device), with_kwargs=True)
    with fake_cuda(), torch.no_grad():  # as pipelines run (autograd on fake cuda aborts a CPU-only torch)
        to_fake_cuda(model)
        with session.pipeline_call(type(pipe)._sag_base_class.__call__, pipe, (), dict(kwargs)):
            for call_args, kw in replay:
                fake_args = tuple(_fake_cuda_like(a) for a in call_args)
                fake_kwargs = _fake_cuda_like(kw)
                if len(call_args) > 1:
                    fake_args = (fake_args[0], _fake_cuda_like(t) if on_device else t, *fake_args[2:])
                else:
                    fake_kwargs["timestep"] = _fake_cuda_like(t) if on_device else t
                out = model(*fake_args, **fake_kwargs)
    hook.remove()
    out = out[0] if isinstance(out, tuple) else out.sample
    assert out.device.type == "cuda" and out.shape == args[0].shape[:1] + out.shape[1:]
    assert seen and all(d.type == "cuda" for d in seen)


# ----------------------------------------------------------------------------------------- item 15
def test_small_refusals_at_enable_time():
    pipe = tiny_sd_pipeline()
    state = hook_state(pipe.unet)
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline.*NoneType"):
        enable_sag(None)
    with pytest.raises(ValueError, match="'conv_in' is a Conv2d, not an attention layer"):
        enable_sag(pipe, layer="conv_in")
    assert type(pipe) is StableDiffusionPipeline and hook_state(pipe.unet) == state


def test_negative_scale_is_allowed_and_guides_the_other_way():
    """One rule for the API and the CLI: any finite scale (a negative one guides away from the blur)."""
    pipe = tiny_sd_pipeline()
    plain = images(pipe, "a cat")
    enable_sag(pipe, -1.0)
    neg = images(pipe, "a cat")
    enable_sag(pipe, 1.0)
    pos = images(pipe, "a cat")
    assert sag_config(pipe).scale == 1.0
    assert np.abs(neg - plain).max() > 1e-3 and np.abs(neg - pos).max() > 1e-3


def test_processor_that_hides_its_attention_is_refused_at_enable_time():
    class OpaqueProcessor:  # computes attention with its own matmul-free shortcut: nothing SAG can read
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            return attn.to_out[0](attn.to_v(hidden_states))

    pipe = tiny_sd_pipeline()
    pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(OpaqueProcessor())
    with pytest.raises(ValueError, match="OpaqueProcessor.*without torch's scaled_dot_product_attention"):
        enable_sag(pipe)
    assert sag_config(pipe) is None


def test_last_mask_is_the_mask_of_the_last_guided_call():
    from sag_fast.diffusers import last_mask

    pipe = tiny_sd_pipeline()
    assert last_mask(pipe) is None
    enable_sag(pipe, 1.0)
    assert last_mask(pipe) is None  # nothing guided yet
    images(pipe, ["a cat", "a dog"], guidance_scale=7.5)
    mask = last_mask(pipe)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (2, 4, 4)  # the 2 unconditional rows, 8x8 latents / 2
    assert mask.any() and not mask.all()
    enable_sag(pipe, 1.0, mask="global")
    images(pipe, "a cat")
    assert last_mask(pipe) is None
    disable_sag(pipe)
    assert last_mask(pipe) is None
