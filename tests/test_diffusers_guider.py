"""sag_fast.SelfAttentionGuidance, the guider for diffusers' modular pipelines, on the modular SDXL and SD3 pipelines
built offline from tiny random models (sag_fast.diffusers.tiny): parity with enable_sag on the classic
StableDiffusionXLPipeline (txt2img, img2img), StableDiffusion3Pipeline and WanPipeline (5-D video latents, Wan
2.2's two experts), sag_scale=0 against diffusers'
ClassifierFreeGuidance, windows, the config round trip, the denoiser left exactly as it was, what each denoiser
call receives (against the float64 reference degrade), the refusals, a torch.compile'd denoiser."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
from diffusers.modular_pipelines.modular_pipeline import BlockState

import sag_fast
from diffusers_checks import hook_state, materialised_mask
from diffusers_checks import vp_input_alpha_sigma_from_sigma
from sag_fast import reference
from sag_fast.diffusers import disable_sag, enable_sag
from sag_fast.diffusers.guider import SelfAttentionGuidance
from sag_fast.diffusers.tiny import tiny_scheduler, tiny_sdxl_components

CALL = dict(prompt="a red cat", negative_prompt="a dog on the moon", height=64, width=64, num_inference_steps=3)
MID_ATTN = "mid_block.attentions.0.transformer_blocks.0.attn1"


def _modular(scheduler="euler", dtype=torch.float32):
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    parts = tiny_sdxl_components(scheduler=scheduler)
    pipe.update_components(**{k: v for k, v in parts.items() if k in pipe._component_specs and v is not None})
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _classic(scheduler="euler", dtype=torch.float32, img2img=False):
    # its own components, rebuilt from the same seeds: identical weights, no module shared with the modular one
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    pipe = cls(**tiny_sdxl_components(scheduler=scheduler))
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: one thread each is several times faster than two fighting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def modular(_one_thread):
    return _modular()


def latents(pipe, guider, seed=0, **call):
    pipe.update_components(guider=guider)
    return pipe(**{**CALL, **call}, generator=torch.Generator().manual_seed(seed), output="latents")


def classic_latents(pipe, seed=0, **call):
    return pipe(**{**CALL, **call}, generator=torch.Generator().manual_seed(seed), output_type="latent").images


class Spy:
    """Every UNet call: the kwargs it got (embeddings, micro-conditioning), the sample that really entered the
    UNet (conv_in's input: after the guider's hook) and the output."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self.handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.conv_in.register_forward_pre_hook(self._sample),
            unet.register_forward_hook(self._out, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        self.calls.append(dict(x=args[0], t=args[1], kwargs=dict(kwargs)))

    def _sample(self, module, args):
        self.calls[-1]["sample"] = args[0].clone()

    def _out(self, module, args, kwargs, output):
        self.calls[-1]["out"] = (output if isinstance(output, torch.Tensor) else output[0]).clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ parity
INIT_IMAGE = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
# case -> (guider settings, enable_sag settings, call arguments)
PARITY = {
    "defaults": (dict(), dict(), dict()),
    "settings": (dict(blur_sigma=2.0, kernel_size=5, threshold=0.8,
                      layer="down_blocks.1.attentions.0.transformer_blocks.0.attn1", sag_start=0.34,
                      guidance_rescale=0.7),
                 dict(blur_sigma=2.0, kernel_size=5, threshold=0.8,
                      layer="down_blocks.1.attentions.0.transformer_blocks.0.attn1", start=0.34), dict()),
    "global_mask_no_cfg": (dict(mask="global", guidance_scale=1.0), dict(mask="global"), dict()),
    "dpm": (dict(), dict(), dict()),
    # 3 of 4 steps run: the SAG window counts the skipped one, as enable_sag does (steps 1 and 2 of the 3 here)
    "img2img_window": (dict(sag_start=0.4), dict(start=0.4),
                       dict(image=INIT_IMAGE, strength=0.75, num_inference_steps=4)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(PARITY))
def test_latents_match_enable_sag_on_classic_sdxl(case, dtype):
    """Same seeds and settings: the guider in the modular pipeline vs enable_sag on StableDiffusionXLPipeline
    (Img2Img for the image case). The modular loop runs one UNet call per batch where the classic one batches
    [uncond, cond]; in fp64 that leaves ~1e-15, in fp32 ~1e-4 (the same as plain CFG between the two)."""
    guider_kw, sag_kw, call = PARITY[case]
    guider_kw = dict(guider_kw)
    scheduler = "dpm" if case == "dpm" else "euler"
    guidance_scale = guider_kw.pop("guidance_scale", 5.0)
    rescale = guider_kw.get("guidance_rescale", 0.0)
    pipe, classic = _modular(scheduler, dtype), _classic(scheduler, dtype, img2img="image" in call)
    if "image" in call:
        call = dict(call, image=call["image"].to(dtype))

    plain = classic_latents(classic, guidance_scale=guidance_scale, guidance_rescale=rescale, **call)
    enable_sag(classic, 0.75, **sag_kw)
    expected = classic_latents(classic, guidance_scale=guidance_scale, guidance_rescale=rescale, **call)
    disable_sag(classic)
    guider = SelfAttentionGuidance(guidance_scale=guidance_scale, sag_scale=0.75, scheduler=pipe.scheduler,
                                   **guider_kw)
    got = latents(pipe, guider, **call)
    cfg = latents(pipe, ClassifierFreeGuidance(guidance_scale=guidance_scale, guidance_rescale=rescale), **call)

    assert got.dtype == dtype and got.shape == expected.shape == (1, 4, 8, 8)
    effect = (expected - plain).abs().max().item()
    diff = (got - expected).abs().max().item()
    baseline = (cfg - plain).abs().max().item()  # the same two pipelines without SAG
    print(f"\n{case} {dtype}: |guider - enable_sag| = {diff:.3g}, plain CFG modular vs classic {baseline:.3g}, "
          f"SAG effect {effect:.3g}")
    assert effect > 1e-2, "SAG did not change the latents: the parity would be vacuous"
    tol = 1e-12 if dtype == torch.float64 else 1e-3
    assert diff <= tol


# ------------------------------------------------------------------------------------- sag_scale = 0: CFG
@pytest.mark.parametrize("settings", [dict(guidance_scale=5.0), dict(guidance_scale=5.0, guidance_rescale=0.7),
                                      dict(guidance_scale=4.0, use_original_formulation=True),
                                      dict(guidance_scale=5.0, start=0.34, stop=0.67), dict(guidance_scale=1.0)],
                         ids=["cfg", "rescale", "original_formulation", "window", "no_cfg"])
def test_sag_scale_zero_is_classifier_free_guidance_exactly(modular, settings):
    unet = modular.unet
    before = hook_state(unet)
    expected = latents(modular, ClassifierFreeGuidance(**settings))
    with Spy(unet) as spy:
        got = latents(modular, SelfAttentionGuidance(sag_scale=0.0, scheduler=modular.scheduler, **settings))
    assert torch.equal(got, expected)
    cfg_calls = 1 if settings["guidance_scale"] == 1.0 else 2
    assert len(spy.calls) == (4 if "start" in settings else 3 * cfg_calls)
    assert hook_state(unet) == before


# ------------------------------------------------------------------------------------------------ spy
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_degraded_pass_gets_the_guide_rows_and_the_reference_degrade(modular, guidance_scale):
    """Per step: cond, uncond, degraded (CFG) or cond, degraded (no CFG). The degraded call gets exactly the
    guiding batch's embeddings and micro-conditioning, and as sample the reference degrade (float64, mask from
    materialised softmax probabilities, (c1, c2) from the scheduler's sigma) of the guiding call's sample and
    output."""
    cfg = guidance_scale > 1
    guider = SelfAttentionGuidance(guidance_scale=guidance_scale, sag_scale=0.75, scheduler=modular.scheduler)
    sigmas = []
    original_cleanup = guider.cleanup_models

    def cleanup(denoiser):  # the scheduler's sigma of each step, read while the step runs
        sigmas.append(modular.scheduler.sigmas[modular.scheduler.step_index or 0].item())
        original_cleanup(denoiser)

    guider.cleanup_models = cleanup
    with Spy(modular.unet) as spy:
        latents(modular, guider)
    per_step = 3 if cfg else 2
    assert len(spy.calls) == per_step * CALL["num_inference_steps"]
    for step in range(CALL["num_inference_steps"]):
        calls = spy.calls[per_step * step:per_step * (step + 1)]
        cond, guide, degraded = calls[0], calls[-2], calls[-1]
        hidden = lambda c: c["kwargs"]["encoder_hidden_states"]  # noqa: E731
        added = lambda c: c["kwargs"]["added_cond_kwargs"]  # noqa: E731
        assert hidden(degraded) is hidden(guide)
        for key in ("text_embeds", "time_ids"):
            assert added(degraded)[key] is added(guide)[key]
        if cfg:
            assert not torch.equal(hidden(guide), hidden(cond)), "the guide batch must be the unconditional one"
        assert degraded["x"] is guide["x"] and degraded["t"] is guide["t"]
        assert torch.equal(guide["sample"], guide["x"])
        assert not torch.equal(degraded["sample"], degraded["x"])

        if step == 1:  # the degraded sample from the reference, for one step
            x, t = guide["x"], guide["t"]
            kwargs = {k: v for k, v in guide["kwargs"].items() if k != "return_dict"}

            def plain():
                return type(modular.unet).forward(modular.unet, x, t, **kwargs, return_dict=False)[0]

            with torch.no_grad():
                _, mask = materialised_mask(modular.unet, MID_ATTN, "mid_block.attentions.0", plain, slice(None))
            assert 0 < int(mask.sum()) < mask.numel(), "degenerate attention mask: the test would not see it"
            alpha, sigma = vp_input_alpha_sigma_from_sigma(sigmas[per_step * step])
            c1, c2 = reference.signal_coefficients(alpha, sigma, "epsilon")
            expected = reference.degrade(x.double(), guide["out"].double(), mask, c1, c2, 9, 1.0)
            torch.testing.assert_close(degraded["sample"].double(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- windows
def test_windows(modular):
    """sag_start/sag_stop: SAG's steps (progress step/n in [sag_start, sag_stop), enable_sag's rule); start/stop:
    the whole guider's steps (diffusers' guiders' rule; outside, the conditional prediction alone)."""
    def calls_per_step(**kw):
        guider = SelfAttentionGuidance(guidance_scale=5.0, scheduler=modular.scheduler, **kw)
        steps = []
        hook = modular.unet.register_forward_pre_hook(lambda *a: steps.append(guider._step))
        try:
            latents(modular, guider, num_inference_steps=4)
        finally:
            hook.remove()
        return [steps.count(i) for i in range(4)]

    # 4 steps: progress 0, .25, .5, .75
    assert calls_per_step() == [3, 3, 3, 3]
    assert calls_per_step(sag_start=0.3, sag_stop=0.6) == [2, 2, 3, 2]
    assert calls_per_step(sag_start=0.25) == [2, 3, 3, 3]
    assert calls_per_step(sag_stop=0.25) == [3, 2, 2, 2]
    assert calls_per_step(start=0.25, stop=0.75) == [1, 3, 3, 1]  # int(1.0) <= i < int(3.0)
    assert calls_per_step(sag_scale=0.0, sag_start=0.5) == [2, 2, 2, 2]


def test_disabled_guider_runs_the_conditional_batch_alone():
    # (the modular SDXL loop switches `enabled` itself: on, except for LCM UNets, so this is checked here)
    guider = SelfAttentionGuidance(guidance_scale=5.0, enabled=False)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert guider.num_conditions == 1
    batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
    assert [b.prompt_embeds.item() for b in batches] == [1.0]
    pred = torch.randn(1, 4, 8, 8)
    assert guider.forward(pred).pred is pred
    guider.enable()
    assert guider.num_conditions == 3
    batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
    assert [b.prompt_embeds.item() for b in batches] == [1.0, 0.0, 0.0]
    assert [getattr(b, "__guidance_identifier__") for b in batches] == ["pred_cond", "pred_uncond", "pred_degraded"]
    state = BlockState(prompt_embeds=torch.ones(1), negative_prompt_embeds=torch.zeros(1))
    fields = {"prompt_embeds": ("prompt_embeds", "negative_prompt_embeds")}
    batches = guider.prepare_inputs_from_block_state(state, fields)
    assert [b.prompt_embeds.item() for b in batches] == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------- the denoiser
def test_hooks_are_gone_after_each_cleanup_and_model_is_bit_exact(modular):
    unet = modular.unet
    before = hook_state(unet)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = dict(encoder_hidden_states=torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(2)),
                added_cond_kwargs=dict(text_embeds=torch.randn(2, 32), time_ids=torch.randn(2, 6)))
    with torch.no_grad():
        out_before = unet(x, 500, **cond).sample

    guider = SelfAttentionGuidance(guidance_scale=5.0, scheduler=modular.scheduler)
    original = guider.cleanup_models
    seen = []

    def cleanup(denoiser):
        original(denoiser)
        seen.append(hook_state(denoiser) == before)

    guider.cleanup_models = cleanup
    latents(modular, guider)
    assert seen and all(seen) and len(seen) == 3 * CALL["num_inference_steps"]
    assert hook_state(unet) == before
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(unet(x, 500, **cond).sample, out_before)


def test_refusals_happen_before_the_step_runs(modular):
    with Spy(modular.unet) as spy:
        with pytest.raises(ValueError, match="needs the pipeline's scheduler"):
            latents(modular, SelfAttentionGuidance(guidance_scale=5.0))
        with pytest.raises(ValueError, match="has no timesteps|not in the scheduler's timesteps|set_timesteps"):
            latents(modular, SelfAttentionGuidance(guidance_scale=5.0, scheduler=tiny_scheduler("ddim")))
        with pytest.raises(ValueError, match="cannot read the self-attention of UNet2DConditionModel.*cross-attention"):
            latents(modular, SelfAttentionGuidance(guidance_scale=5.0, scheduler=modular.scheduler,
                                                   layer=MID_ATTN.replace("attn1", "attn2")))
    assert spy.calls == []
    # without SAG no scheduler is needed
    assert latents(modular, SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.0)).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=4), "kernel_size must be a positive odd int"),
    (dict(blur_sigma=0.0), "blur_sigma must be a positive finite number"),
    (dict(mask="box"), "mask must be one of"),
    (dict(sag_start=0.6, sag_stop=0.5), "sag_start=0.6 must be <= sag_stop=0.5"),
    (dict(sag_scale=float("nan")), "scale must be a finite number"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be in"),
    (dict(guidance_scale="7"), "guidance_scale must be a finite number"),
    (dict(start=0.5, stop=0.2), "stop"),
])
def test_argument_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfAttentionGuidance(**kwargs)


def test_scheduler_argument_is_checked():
    with pytest.raises(TypeError, match="scheduler must be the pipeline's diffusers scheduler"):
        SelfAttentionGuidance(scheduler=object())


# ------------------------------------------------------------------------------------------------ config
def test_save_and_load_config(modular, tmp_path):
    settings = dict(guidance_scale=4.0, sag_scale=0.6, blur_sigma=1.5, kernel_size=7, threshold=0.9,
                    layer=MID_ATTN, mask="attention", sag_start=0.1, sag_stop=0.9,
                    guidance_rescale=0.3, start=0.0, stop=1.0)
    guider = SelfAttentionGuidance(**settings, scheduler=modular.scheduler)
    guider.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "guider_config.json").read_text())
    assert saved["_class_name"] == "SelfAttentionGuidance" and "scheduler" not in saved
    assert {k: saved[k] for k in settings} == settings

    loaded = SelfAttentionGuidance.from_pretrained(tmp_path)
    public = lambda g: {k: v for k, v in g.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded) == public(guider) and loaded.scheduler is None
    assert loaded.sag_config == guider.sag_config and loaded.guidance_rescale == 0.3
    again = SelfAttentionGuidance.from_pretrained(tmp_path, scheduler=modular.scheduler)
    assert again.scheduler is modular.scheduler
    copy = guider.new(sag_scale=0.2)
    assert copy.scheduler is modular.scheduler and copy.sag_scale == 0.2 and copy.config.kernel_size == 7
    assert torch.equal(latents(modular, again), latents(modular, guider))


def test_exported_from_the_package():
    assert sag_fast.SelfAttentionGuidance is SelfAttentionGuidance


# ---------------------------------------------------------------------------------------------------- SD3
def _sd3_modular(dual_attention: bool):
    """The modular SD3 text-to-image core (latents, timesteps, denoise loop) with a tiny SD3Transformer2DModel
    (patch 2: a 4x4 token grid for 8x8 latents, 16 channels; with dual_attention, block 0 also has SD3.5's
    image-only self-attention `attn2`), flow matching with shift 3. The prompt embeddings are given."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,) if dual_attention else ()).eval()
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe


def _sd3_latents(pipe, guider):
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g),
                  negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    pipe.update_components(guider=guider)
    return pipe(**embeds, height=64, width=64, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output="latents")


def test_sd3_modular_pipeline_with_an_image_self_attention_layer(_one_thread):
    """SD3.5's image-only self-attention (attn2 of a dual-attention block) in the modular SD3 pipeline, flow
    matching: sag_scale=0 is ClassifierFreeGuidance bit for bit; with SAG the degraded call gets the unconditional
    embeddings and, as latents, the reference degrade ((c1, c2) of flow matching at the scheduler's sigma, mask
    from materialised softmax probabilities); the transformer is left exactly as it was."""
    pipe = _sd3_modular(dual_attention=True)
    transformer, layer = pipe.transformer, "transformer_blocks.0.attn2"
    before = hook_state(transformer)
    cfg = _sd3_latents(pipe, ClassifierFreeGuidance(guidance_scale=5.0))
    zero = _sd3_latents(pipe, SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.0, layer=layer))
    assert torch.equal(zero, cfg)

    guider = SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75, layer=layer, scheduler=pipe.scheduler)
    calls, sigmas = [], []
    original_cleanup = guider.cleanup_models

    def cleanup(denoiser):
        sigmas.append(pipe.scheduler.sigmas[pipe.scheduler.step_index or 0].item())
        original_cleanup(denoiser)

    guider.cleanup_models = cleanup

    def record(module, args, kwargs):
        calls.append(dict(kwargs))
    handles = [transformer.register_forward_pre_hook(record, with_kwargs=True),
               transformer.pos_embed.register_forward_pre_hook(lambda m, a: calls[-1].update(sample=a[0].clone()))]
    try:
        guided = _sd3_latents(pipe, guider)
    finally:
        for h in handles:
            h.remove()
    assert (guided - cfg).abs().max() > 1e-3, "SAG did not change the SD3 latents"
    assert len(calls) == 9
    cond, uncond, degraded = calls[3:6]  # step 1
    assert degraded["encoder_hidden_states"] is uncond["encoder_hidden_states"]
    assert degraded["pooled_projections"] is uncond["pooled_projections"]
    assert not torch.equal(uncond["encoder_hidden_states"], cond["encoder_hidden_states"])
    x = uncond["hidden_states"]
    assert degraded["hidden_states"] is x and torch.equal(uncond["sample"], x)

    kwargs = {k: v for k, v in uncond.items() if k not in ("hidden_states", "sample", "return_dict")}

    def plain():
        return type(transformer).forward(transformer, x, **kwargs, return_dict=False)[0]

    with torch.no_grad():
        out, mask = materialised_mask(transformer, layer, (4, 4), plain, slice(None))
    assert 0 < int(mask.sum()) < mask.numel(), "degenerate attention mask: the test would not see it"
    s = torch.tensor(sigmas[3], dtype=torch.float64)  # step 1's sigma
    c1, c2 = reference.signal_coefficients(1 - s, s, "flow")
    expected = reference.degrade(x.double(), out.double(), mask, c1, c2, 9, 1.0)
    torch.testing.assert_close(degraded["sample"].double(), expected, rtol=0, atol=1e-5)
    assert hook_state(transformer) == before


def test_sd3_joint_attention_refused_before_the_step_runs_without_joint_support(_one_thread, monkeypatch):
    """Without joint-attention support (no image-token layout for the denoiser), SD3's joint layers are refused at
    the first prepare_models, before any transformer call, naming the layer and the reason."""
    import sag_fast.diffusers.guider as guider_module

    monkeypatch.setattr(guider_module, "joint_layout", lambda model: None)  # a joint model sag_fast does not know
    pipe = _sd3_modular(dual_attention=False)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: seen.append(1))
    try:
        for layer in (None, "transformer_blocks.1.attn"):
            with pytest.raises(ValueError, match=r"cannot read the self-attention of SD3Transformer2DModel: "
                                                 r"layer='transformer_blocks.1.attn' is joint attention"):
                _sd3_latents(pipe, SelfAttentionGuidance(guidance_scale=5.0, layer=layer, scheduler=pipe.scheduler))
    finally:
        handle.remove()
    assert seen == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sd3_joint_attention_matches_enable_sag_on_classic_sd3(_one_thread, dtype):
    """SD3's default layer (the middle block's joint attention, image tokens first): the guider in the modular SD3
    pipeline gives the latents of enable_sag on StableDiffusion3Pipeline (tiny_sd3_pipeline's transformer, rebuilt
    from its seed for each pipeline; prompt embeddings given), and leaves the transformer as it was."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep)
    from sag_fast.diffusers.tiny import tiny_sd3_pipeline

    classic = tiny_sd3_pipeline(dtype=dtype)
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=tiny_sd3_pipeline(dtype=dtype).transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(1)
    embeds = {k: torch.randn(*shape, generator=g).to(dtype) for k, shape in (
        ("prompt_embeds", (1, 7, 64)), ("negative_prompt_embeds", (1, 7, 64)),
        ("pooled_prompt_embeds", (1, 64)), ("negative_pooled_prompt_embeds", (1, 64)))}
    call = dict(**embeds, height=64, width=64, num_inference_steps=3)

    def classic_run():
        return classic(**call, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                       output_type="latent").images

    plain = classic_run()
    enable_sag(classic, 0.75)
    expected = classic_run()
    disable_sag(classic)
    before = hook_state(pipe.transformer)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, scheduler=pipe.scheduler))
    got = pipe(**call, generator=torch.Generator().manual_seed(0), output="latents")

    effect, diff = (expected - plain).abs().max().item(), (got - expected).abs().max().item()
    print(f"\nSD3 {dtype}: |guider - enable_sag| = {diff:.3g}, SAG effect {effect:.3g}")
    assert got.shape == expected.shape == (1, 16, 8, 8) and effect > 1e-2
    assert diff <= (1e-12 if dtype == torch.float64 else 1e-4)
    assert hook_state(pipe.transformer) == before


# -------------------------------------------------------------------------------- the loop's contract
def _loop_step(guider, unet, scheduler, x, step=0, latents_for=None, **extra):
    """One step of a modular denoise loop (as diffusers' SDXL LoopDenoiser does it), on the bare UNet."""
    t = scheduler.timesteps[step]
    g = torch.Generator().manual_seed(3)
    fields = {"prompt_embeds": (torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)),
              "text_embeds": (torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)),
              "time_ids": (torch.tensor([[64.0, 64, 0, 0, 64, 64]]),) * 2}
    guider.set_state(step=step, num_inference_steps=len(scheduler.timesteps), timestep=t)
    batches = guider.prepare_inputs(fields)
    for i, batch in enumerate(batches):
        guider.prepare_models(unet)
        sample = x if latents_for is None else latents_for(i, x)
        batch.noise_pred = unet(sample, t, encoder_hidden_states=batch.prompt_embeds, return_dict=False,
                                added_cond_kwargs=dict(text_embeds=batch.text_embeds, time_ids=batch.time_ids),
                                **extra)[0]
        guider.cleanup_models(unet)
    return guider(batches).pred


@pytest.fixture
def bare(modular):
    scheduler = tiny_scheduler("euler")
    scheduler.set_timesteps(3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return modular.unet, scheduler, x


def test_controlnet_residuals_refused_and_hooks_removed(bare):
    unet, scheduler, x = bare
    before = hook_state(unet)
    residuals = [torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 4, 4), torch.zeros(1, 32, 4, 4)]
    guider = SelfAttentionGuidance(guidance_scale=5.0, scheduler=scheduler)
    with pytest.raises(ValueError, match=r"\['down_block_additional_residuals', 'mid_block_additional_residual'\] "
                                         r"\(ControlNet\)"):
        _loop_step(guider, unet, scheduler, x, down_block_additional_residuals=residuals,
                   mid_block_additional_residual=torch.zeros(1, 32, 4, 4))
    assert hook_state(unet) == before  # the guider took its hooks off on the way out


def test_batches_with_other_latents_refused(bare):
    """The degraded batch is built from the guide batch's latents: a loop feeding it other latents is refused."""
    unet, scheduler, x = bare
    guider = SelfAttentionGuidance(guidance_scale=5.0, scheduler=scheduler)
    with pytest.raises(RuntimeError, match="the degraded batch got other latents"):
        _loop_step(guider, unet, scheduler, x, latents_for=lambda i, x: x.clone())
    assert _loop_step(guider, unet, scheduler, x).shape == x.shape  # the next step starts clean


@pytest.mark.slow
def test_compiled_denoiser(bare):
    """torch.compile'd UNet (eager backend: Dynamo's tracing without code generation): the guided step runs
    around the compiled forward and gives the plain module's result; the wrapper is left as it was."""
    unet, scheduler, x = bare
    guider = SelfAttentionGuidance(guidance_scale=5.0, scheduler=scheduler)
    expected = _loop_step(guider, unet, scheduler, x, step=1)
    compiled = torch.compile(unet, backend="eager")
    before, forward = hook_state(compiled), vars(compiled)["forward"]  # OptimizedModule keeps its own forward
    got = _loop_step(guider, compiled, scheduler, x, step=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (expected - _loop_step(guider.new(sag_scale=0.0), unet, scheduler, x, step=1)).abs().max() > 1e-3
    assert hook_state(compiled) == before and vars(compiled)["forward"] is forward


class _TokenDenoiser(torch.nn.Module):
    """A denoiser on (B, N, C) tokens (packed or video-like latents) with an SDPA self-attention."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        return (self.attn(hidden_states, hidden_states, hidden_states, need_weights=False)[0],)


def test_token_latents_refused_with_the_hooks_removed(bare):
    _, scheduler, _ = bare
    model = _TokenDenoiser()
    before = hook_state(model)
    guider = SelfAttentionGuidance(guidance_scale=5.0, layer="attn", scheduler=scheduler)
    guider.set_state(step=0, num_inference_steps=3, timestep=scheduler.timesteps[0])
    batches = guider.prepare_inputs({"encoder_hidden_states": (torch.ones(1), torch.zeros(1))})
    guider.prepare_models(model)
    model(torch.randn(1, 16, 8), scheduler.timesteps[0])  # the conditional batch: no hook
    guider.cleanup_models(model)
    guider.prepare_models(model)
    with pytest.raises(ValueError, match=r"got a \(1, 16, 8\) hidden_states; SAG guides \(B, C, H, W\) image or "
                                         r"\(B, C, F, H, W\) video latents"):
        model(torch.randn(1, 16, 8), scheduler.timesteps[0])
    assert len(batches) == 3 and hook_state(model) == before


# ----------------------------------------------------------------------------------------------- Wan video
@pytest.mark.parametrize("two_experts", [False, True], ids=["wan2.1", "wan2.2"])
def test_wan_modular_video_matches_enable_sag_on_classic_wan(_one_thread, two_experts):
    """5-D video latents: the modular Wan core denoise loop (Wan 2.2's: two experts, each with its guider, switched
    at boundary_ratio) with SelfAttentionGuidance gives the latents of enable_sag on WanPipeline (same tiny
    transformers rebuilt from their seeds, same noise and embeddings): the mask over the (f, h, w) = (2, 4, 4)
    token grid of the model's (1, 2, 2) patches, each frame blurred. sag_scale=0 is ClassifierFreeGuidance bit for
    bit; both experts run SAG's three calls per step; the transformers are left exactly as they were."""
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep
    from diffusers.modular_pipelines.wan.modular_blocks_wan22 import Wan22CoreDenoiseStep
    from sag_fast.diffusers.tiny import tiny_wan_pipeline

    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 32, generator=g), negative_prompt_embeds=torch.randn(1, 6, 32,
                                                                                                       generator=g))
    noise = torch.randn(1, 4, 2, 8, 8, generator=g)
    call = dict(**embeds, height=64, width=64, num_frames=5, num_inference_steps=3)
    classic = tiny_wan_pipeline(two_experts=two_experts)

    def classic_run():
        return classic(**call, guidance_scale=5.0, latents=noise.clone(), output_type="latent").frames

    plain = classic_run()
    enable_sag(classic, 1.0)
    expected = classic_run()
    disable_sag(classic)

    parts = tiny_wan_pipeline(two_experts=two_experts)  # its own modules, the same weights
    pipe = (Wan22CoreDenoiseStep if two_experts else WanCoreDenoiseStep)().init_pipeline()
    pipe.update_components(transformer=parts.transformer, scheduler=parts.scheduler,
                           **dict(transformer_2=parts.transformer_2, boundary_ratio=0.7) if two_experts else {})
    pipe.set_progress_bar_config(disable=True)
    experts = [pipe.transformer] + ([pipe.transformer_2] if two_experts else [])
    before = [hook_state(m) for m in experts]

    def modular_run(guider):
        guiders = dict(guider=guider, guider_2=guider.new()) if two_experts else dict(guider=guider)
        pipe.update_components(**guiders)
        return pipe(**call, latents=noise.clone(), output="latents")

    cfg = modular_run(ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(modular_run(SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.0)), cfg)
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a, i=i: calls.append(i)) for i, m in enumerate(experts)]
    try:
        got = modular_run(SelfAttentionGuidance(guidance_scale=5.0, sag_scale=1.0, scheduler=pipe.scheduler))
    finally:
        for h in handles:
            h.remove()
    # boundary 0.7 of 1000: steps 0 and 1 on the high-noise expert, step 2 on the low-noise one
    assert calls == ([0] * 6 + [1] * 3 if two_experts else [0] * 9)
    effect, diff = (expected - plain).abs().max().item(), (got - expected).abs().max().item()
    baseline = (cfg - plain).abs().max().item()
    print(f"\nWan two_experts={two_experts}: |guider - enable_sag| = {diff:.3g}, plain CFG {baseline:.3g}, "
          f"SAG effect {effect:.3g}")
    assert got.shape == expected.shape == (1, 4, 2, 8, 8) and effect > 1e-2
    assert diff <= 1e-5  # fp32: the guider's fused u + w (c - u) + s (u - d) against the session's shifted ways
    assert [hook_state(m) for m in experts] == before


class _PatchVideoDenoiser(torch.nn.Module):
    """A video denoiser that is not Wan: (B, 8, F, H, W) latents patchified (1, 2, 2) inside the model into
    frame-major tokens, one self-attention over them, unpatchified. `config` as diffusers models carry it (a 3-tuple
    patch_size, or a spatial one with patch_size_t), or none."""

    def __init__(self, config):
        super().__init__()
        if config is not None:
            self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        b, c, f, h, w = hidden_states.shape
        tokens = torch.nn.functional.avg_pool3d(hidden_states, (1, 2, 2)).flatten(2).transpose(1, 2)
        out = self.attn(tokens, tokens, tokens, need_weights=False)[0] + encoder_hidden_states.mean()
        out = out.transpose(1, 2).reshape(b, c, f, h // 2, w // 2)
        return (out.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4) - 0.1 * hidden_states,)


@pytest.mark.parametrize("config", [dict(patch_size=(1, 2, 2)), dict(patch_size=2, patch_size_t=1), None],
                         ids=["patch_3tuple", "patch_and_patch_t", "no_patch_size"])
def test_video_latents_of_any_denoiser_with_a_patch_size(bare, config):
    """5-D latents in general, no family record: the capture's (f, h, w) grid comes from the model's patch size
    (both diffusers spellings), each frame is blurred (the degraded batch's latents against reference.degrade at
    the scheduler's sigma), and the step differs from sag_scale=0. A model whose patching the config does not tell
    is refused (its 32 keys are not the latent's 2x8x8 grid), with the hooks taken off."""
    from types import SimpleNamespace

    _, scheduler, _ = bare
    model = _PatchVideoDenoiser(None if config is None else SimpleNamespace(**config)).eval()
    x = torch.randn(1, 8, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    before = hook_state(model)
    guider = SelfAttentionGuidance(guidance_scale=5.0, layer="attn", scheduler=scheduler)
    text = (torch.ones(1, 3, 8), torch.zeros(1, 3, 8))

    def step(g):
        t = scheduler.timesteps[1]
        g.set_state(step=1, num_inference_steps=3, timestep=t)
        batches, seen = g.prepare_inputs({"encoder_hidden_states": text}), []
        for batch in batches:
            g.prepare_models(model)
            handle = model.attn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            try:
                batch.noise_pred = model(x, t, encoder_hidden_states=batch.encoder_hidden_states)[0]
            finally:
                handle.remove()
                g.cleanup_models(model)
        return g(batches).pred, seen

    if config is None:
        with pytest.raises(ValueError, match=r"layer 'attn' attends over 32 keys, but the token grid of this call is "
                                             r"\(2, 8, 8\)"):
            step(guider)
        assert hook_state(model) == before
        return
    with torch.no_grad():
        guided, seen = step(guider)
        plain, _ = step(guider.new(sag_scale=0.0))
    assert len(seen) == 3 and (guided - plain).abs().max() > 1e-3
    tokens = seen[1].double()  # the unconditional call's tokens: the mask, float64, materialised probabilities
    attn = model.attn.double()
    probs = attn(tokens, tokens, tokens, need_weights=True, average_attn_weights=False)[1]
    mask = reference.mass_to_mask(reference.attention_mass(probs), (2, 4, 4))
    model.float()
    assert mask.any() and not mask.all()
    with torch.no_grad():
        out = model(x, scheduler.timesteps[1], encoder_hidden_states=text[1])[0]
    alpha, sigma = vp_input_alpha_sigma_from_sigma(scheduler.sigmas[1])
    c1, c2 = reference.signal_coefficients(alpha, sigma, "epsilon")
    x_deg = reference.degrade(x.double(), out.double(), mask, c1, c2)  # each frame blurred, the 3-D mask upsampled
    want = torch.nn.functional.avg_pool3d(x_deg, (1, 2, 2)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(seen[2].double(), want, rtol=0, atol=1e-5)  # what the degraded call got
    assert hook_state(model) == before


def test_diffusers_cache_on_the_denoiser_refused(bare):
    """A diffusers cache (here Pyramid Attention Broadcast) would serve the degraded batch another batch's attention:
    refused before the step's first denoiser call."""
    from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    unet, scheduler, x = bare
    before = hook_state(unet)
    apply_pyramid_attention_broadcast(unet, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500))
    try:
        guider = SelfAttentionGuidance(guidance_scale=5.0, scheduler=scheduler)
        with Spy(unet) as spy, pytest.raises(ValueError, match=r"the denoiser \(UNet2DConditionModel\) has a "
                                                               r"diffusers cache enabled \(pyramid_attention_broad"):
            _loop_step(guider, unet, scheduler, x)
        assert spy.calls == []
    finally:  # the module's shared UNet
        HookRegistry.check_if_exists_or_initialize(unet).remove_hook("pyramid_attention_broadcast", recurse=True)
    assert hook_state(unet) == before
