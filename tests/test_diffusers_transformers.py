"""SAG on the transformer / flow-matching pipelines (issue 10): SD3 (joint attention, flow matching) and PixArt
(CFG kept in a local variable, learned variance). For each: scale 0 and disable_sag bit-exact, SAG changes the
output, batch invariance, a start/stop window, and one guided denoiser call equal to the float64 reference
recomputed with materialised attention probabilities (the joint rule: image-key mass from image queries, the
softmax over every key, threshold relative to the mean image-key mass)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_checks import gen, hook_state
from sag_fast import reference
from sag_fast.diffusers import disable_sag, enable_sag, sag_config
from sag_fast.diffusers.tiny import tiny_sd3_pipeline

SD3_CALL = dict(num_inference_steps=2, max_sequence_length=4, output_type="np")


def sd3_images(pipe, prompt="a cat", seed=0, **kwargs):
    return np.asarray(pipe(prompt, generator=gen(seed), **{**SD3_CALL, **kwargs}).images)


@contextlib.contextmanager
def recorded_sdpa():
    """Records (q, k, scale) of every scaled_dot_product_attention call, in order (blocks run in order, so
    transformer_blocks.1's call is the second): independent of the processors and of sag_fast's capture."""
    seen = []
    original = F.scaled_dot_product_attention

    def sdpa(*a, **kw):
        q, k = (a[0], a[1]) if len(a) > 1 else (kw["query"], kw["key"])
        seen.append((q.detach().clone(), k.detach().clone(), kw.get("scale")))
        return original(*a, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = original


def recorded_calls(model):
    """Every call of model through its __call__, in order: (its kwargs, a clone of its output)."""
    seen = []
    model.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0].clone())), with_kwargs=True)
    return seen


def plain_replay(pipe, seen, index: int):
    """The recorded guided call `index` of pipe.transformer (recorded_calls) run again with SAG disabled:
    (its kwargs without hidden_states, hidden_states x, the guided output, the plain output, the plain run's
    recorded scaled_dot_product_attention calls)."""
    kwargs, guided = seen[index]
    kwargs.pop("return_dict", None)
    x = kwargs.pop("hidden_states")
    disable_sag(pipe)
    with torch.no_grad(), recorded_sdpa() as qk:
        out = pipe.transformer(hidden_states=x, return_dict=False, **kwargs)[0]
    return kwargs, x, guided, out, qk


def flow_coefficients(sigma: float):
    """(c1, c2) of the reference for flow matching at sigma: x = (1 - sigma) x0 + sigma eps."""
    return reference.signal_coefficients(torch.tensor(1 - sigma, dtype=torch.float64),
                                         torch.tensor(sigma, dtype=torch.float64), "flow")


def assert_packed_guided_call(model, kwargs, x, out, guided, mask, sigma, scale, hw=(8, 8)):
    """A packed-latent guided call against the reference: unpack, reference.degrade with flow (c1, c2) at sigma,
    the degraded forward on the packed x~, reference.guidance_shift, pack (Flux, QwenImage)."""
    from sag_fast.diffusers.session import pack_latents, unpack_latents

    x4, out4 = unpack_latents(x, *hw), unpack_latents(out, *hw)
    c1, c2 = flow_coefficients(sigma)
    x_deg = reference.degrade(x4.double(), out4.double(), mask, c1, c2).float()
    with torch.no_grad():
        degraded = model(hidden_states=pack_latents(x_deg), return_dict=False, **kwargs)[0]
    want = pack_latents(reference.guidance_shift(out4.double(), unpack_latents(degraded, *hw).double(), scale).float())
    torch.testing.assert_close(guided, want, rtol=0, atol=2e-4)


def joint_mask_reference(q, k, scale, image_span, grid, threshold=1.0):
    """float64, materialised: softmax over all keys; mass of image keys from image queries, mean over heads;
    mask = mass > threshold * mean image-key mass; (B, h, w) bool."""
    q, k = q.double(), k.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)          # (B, H, N, N)
    start, n = image_span
    mass = probs[:, :, start:start + n, start:start + n].sum(-2).mean(1)   # (B, n)
    return (mass > threshold * mass.mean(-1, keepdim=True)).reshape(-1, *grid)


# ------------------------------------------------------------------------------------------------- SD3
def test_sd3_default_layer_scale_zero_disable_and_effect():
    pipe = tiny_sd3_pipeline()
    state = hook_state(pipe.transformer)
    plain = sd3_images(pipe)
    enable_sag(pipe, 0.0)
    assert np.array_equal(sd3_images(pipe), plain)
    enable_sag(pipe, 1.0)
    session = vars(pipe)["_sag_fast_state"]
    assert session.capture.layer_name == "transformer_blocks.1.attn" and session.capture.joint == "image_first"
    guided = sd3_images(pipe)
    assert np.abs(guided - plain).max() > 1e-3
    assert np.array_equal(sd3_images(pipe), guided)
    disable_sag(pipe)
    assert sag_config(pipe) is None and hook_state(pipe.transformer) == state
    assert np.array_equal(sd3_images(pipe), plain)


def test_sd3_batch_invariance_and_window():
    pipe = tiny_sd3_pipeline()
    enable_sag(pipe, 1.0)
    both = np.asarray(pipe(["a cat", "a dog"], generator=[gen(0), gen(1)], **SD3_CALL).images)
    alone = np.asarray(pipe("a dog", generator=gen(1), **SD3_CALL).images)
    np.testing.assert_allclose(both[1], alone[0], rtol=0, atol=1e-4)
    forwards = []  # every forward of the transformer, the extra SAG ones included
    pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    enable_sag(pipe, 1.0, start=0.5, stop=1.0)
    window = sd3_images(pipe, num_inference_steps=4)
    assert forwards == [2, 2, 2, 1, 2, 1]  # steps 0, 1 plain; steps 2, 3 guided: + B unconditional rows
    enable_sag(pipe, 1.0)
    assert np.abs(sd3_images(pipe, num_inference_steps=4) - window).max() > 1e-4


def test_sd3_guided_call_equals_the_float64_reference():
    """One guided transformer call (CFG batch [uncond, cond]) against the reference: the joint mask from
    materialised probabilities of the layer's real q/k, reference.degrade with flow matching's (c1, c2) from
    the scheduler's sigma, the degraded forward, reference.guidance_shift."""
    pipe = tiny_sd3_pipeline()
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    sd3_images(pipe, num_inference_steps=2)
    kwargs, guided = seen[1]  # the second step: at the first, sigma = 1 and SAG's x0 estimate is 0 (no effect)
    x, t = kwargs.pop("hidden_states"), kwargs.pop("timestep")
    kwargs.pop("return_dict", None)
    disable_sag(pipe)
    sigma = float(pipe.scheduler.sigmas[1])
    with torch.no_grad(), recorded_sdpa() as qk:
        out = model(x, timestep=t, return_dict=False, **kwargs)[0]
    q, k, scale = qk[1]  # transformer_blocks.1
    b = x.shape[0] // 2
    n = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    mask = joint_mask_reference(q[:b], k[:b], scale, (0, n), (x.shape[-2] // 2, x.shape[-1] // 2))
    assert mask.any() and not mask.all()
    c1, c2 = flow_coefficients(sigma)
    x_deg = reference.degrade(x[:b].double(), out[:b].double(), mask, c1, c2).float()
    cut = {name: (v[:b] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 * b else v)
           for name, v in kwargs.items()}
    with torch.no_grad():
        degraded = model(x_deg, timestep=t[:b], return_dict=False, **cut)[0]
    want = reference.guidance_shift(out.double(), degraded.double(), 0.9).float()
    torch.testing.assert_close(guided, want, rtol=0, atol=2e-4)


def test_sd3_skip_layer_guidance_call_is_left_alone():
    pipe = tiny_sd3_pipeline()
    enable_sag(pipe, 1.0)
    sizes = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: sizes.append((k["hidden_states"].shape[0], k.get("skip_layers"))), with_kwargs=True)
    out = sd3_images(pipe, num_inference_steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                     skip_layer_guidance_stop=1.0)
    assert np.isfinite(out).all() and any(s[1] == [1] for s in sizes)


def test_sd3_refused_layer_and_generic_errors():
    pipe = tiny_sd3_pipeline()
    with pytest.raises(ValueError, match="not an attention layer"):
        enable_sag(pipe, layer="pos_embed")
    assert sag_config(pipe) is None


# ------------------------------------------------------------------------------------------------ Flux
def flux_inputs(seed=0, batch=1, negative=False):
    g = torch.Generator().manual_seed(seed + 100)
    kw = dict(prompt_embeds=torch.randn(batch, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
              height=64, width=64, num_inference_steps=2, output_type="latent")
    if negative:
        kw.update(negative_prompt_embeds=torch.randn(batch, 5, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g), true_cfg_scale=4.0)
    return kw


def flux_latents(pipe, seed=0, **kwargs):
    return pipe(generator=gen(seed), **{**flux_inputs(), **kwargs}).images


def test_pack_unpack_round_trip_is_exact():
    from sag_fast.diffusers.session import pack_latents, unpack_latents
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 6, 10))  # diffusers' own packing
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))


@pytest.mark.parametrize("negative", [False, True], ids=["distilled", "true_cfg"])
def test_flux_scale_zero_disable_and_effect(negative):
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    kw = flux_inputs(negative=negative)
    plain = pipe(generator=gen(0), **kw).images
    enable_sag(pipe, 0.0)
    assert torch.equal(pipe(generator=gen(0), **kw).images, plain)
    enable_sag(pipe, 1.0)
    assert vars(pipe)["_sag_fast_state"].capture.joint == "text_first"
    forwards = []
    pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    guided = pipe(generator=gen(0), **kw).images
    assert (guided - plain).abs().max() > 1e-3
    assert len(forwards) == 2 * (3 if negative else 2)  # one extra forward per step, also with true CFG
    disable_sag(pipe)
    assert torch.equal(pipe(generator=gen(0), **kw).images, plain)


def test_flux_true_cfg_adds_the_same_shift_to_both_calls():
    """u + w(c - u) + s(u - d): the conditional call's output gets the shift computed in the unconditional call."""
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    kw = flux_inputs(negative=True)
    enable_sag(pipe, 0.8)
    model = pipe.transformer
    seen = []
    model.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0])), with_kwargs=True)
    pipe(generator=gen(0), **kw)
    # the pipeline's calls of the second step (at the first, sigma = 1 and SAG has no effect); the extra
    # forward is inside the second call; the conditional output gets its shift after its hook ran, so read the
    # tensor the pipeline holds, not a clone
    (k_c, c_shifted), (k_u, u_shifted) = seen[2], seen[3]
    disable_sag(pipe)
    with torch.no_grad():
        c = model(**{**k_c, "return_dict": False})[0]
        u = model(**{**k_u, "return_dict": False})[0]
    delta_c, delta_u = c_shifted - c, u_shifted - u
    assert delta_u.abs().max() > 1e-3
    torch.testing.assert_close(delta_c, delta_u, rtol=0, atol=1e-5)


def test_flux_batch_invariance_and_layer_choice():
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    enable_sag(pipe, 1.0)
    two = flux_inputs(batch=2)
    both = pipe(generator=[gen(0), gen(1)], **two).images
    one = dict(two, prompt_embeds=two["prompt_embeds"][1:], pooled_prompt_embeds=two["pooled_prompt_embeds"][1:])
    alone = pipe(generator=gen(1), **one).images
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-4)
    default = pipe(generator=gen(0), **flux_inputs()).images
    enable_sag(pipe, 1.0, layer="single_transformer_blocks.1.attn")  # single-stream: [text, image] in one sequence
    single = pipe(generator=gen(0), **flux_inputs()).images
    assert (single - default).abs().max() > 1e-4


def test_flux_guided_call_equals_the_float64_reference():
    """Guidance-distilled Flux, one guided call: unpack, joint mask ([text, image]: image keys after the text,
    rotary applied) from materialised probabilities, reference.degrade with flow (c1, c2) at the step's sigma,
    the degraded forward on the packed x~, reference.guidance_shift, pack."""
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    pipe(generator=gen(0), **flux_inputs())
    # the second step (at the first, sigma = 1: x0's estimate, and SAG's effect, is 0)
    kwargs, x, guided, out, qk = plain_replay(pipe, seen, 1)
    sigma = float(pipe.scheduler.sigmas[1])
    q, k, scale = qk[1]  # transformer_blocks.1 (double-stream)
    n_txt = kwargs["encoder_hidden_states"].shape[1]
    mask = joint_mask_reference(q, k, scale, (n_txt, 16), (4, 4))
    assert mask.any() and not mask.all()
    assert_packed_guided_call(model, kwargs, x, out, guided, mask, sigma, 0.9)


# ---------------------------------------------------------------------------------------------- PixArt
def _pixart_call():
    import tiny_pipelines as tp
    from test_diffusers_contract import t5_text

    return tp, dict(**t5_text(mask=True), height=64, width=64, output_type="np", num_inference_steps=3,
                    guidance_scale=4.5)


class _TimestepSecond(torch.nn.Module):
    """PixArt's forward takes (hidden_states, encoder_hidden_states, timestep): the (x, t, **kw) order the
    reference helpers call with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, return_dict=False, **kwargs):
        return self.inner(x, timestep=t, return_dict=False, **kwargs)


@pytest.mark.parametrize("sigma", [False, True], ids=["alpha", "sigma"])
def test_pixart_only_the_unconditional_rows_are_degraded_and_match_the_reference(sigma):
    """PixArt keeps CFG in a local variable ([uncond, cond]) and predicts a learned variance: the guided call
    equals the float64 reference with uncond_index 0, the variance channels untouched."""
    from diffusers_checks import expected_guided_step, record_call

    tp, call = _pixart_call()
    pipe = tp.pixart_pipeline(sigma=sigma)
    plain = np.asarray(pipe(generator=gen(0), **call).images)
    enable_sag(pipe, 0.9)
    assert vars(pipe)["_sag_fast_state"].capture.layer_name == "transformer_blocks.1.attn1"
    model = pipe.transformer
    with record_call(model, 1) as rec:
        guided = np.asarray(pipe(generator=gen(0), **call).images)
    assert np.abs(guided - plain).max() > 1e-3
    x = rec["args"][0] if rec["args"] else rec["kwargs"].pop("hidden_states")
    kwargs = {k: v for k, v in rec["kwargs"].items() if k not in ("return_dict", "hidden_states")}
    t = kwargs.pop("timestep")
    acp = pipe.scheduler.alphas_cumprod[int(t[0])].double()
    disable_sag(pipe)
    with torch.no_grad():
        expected, out, mask = expected_guided_step(
            _TimestepSecond(model), x, t, kwargs, attn_path="inner.transformer_blocks.1.attn1", grid_path=(4, 4),
            alpha=acp.sqrt(),
            sigma=(1 - acp).sqrt(), prediction_type="epsilon", scale=0.9, ways=2, uncond_index=0, guided=4)
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(rec["output"][:, 4:], out[:, 4:])
    torch.testing.assert_close(rec["output"], expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ generic path
def test_generic_joint_transformer_declared_with_a_layout():
    """A pipeline sag_fast does not know (a user subclass with its own __call__) around a joint-attention
    transformer: declared with SAGLayout (ways, per-row arguments, where the image tokens sit), it gives exactly
    what the known SD3 pipeline gives; undeclared it is refused at enable time."""
    from diffusers import StableDiffusion3Pipeline

    from sag_fast import SAGLayout

    class MyPipeline(StableDiffusion3Pipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    known = tiny_sd3_pipeline()
    enable_sag(known, 1.0)
    want = sd3_images(known)
    mine = tiny_sd3_pipeline(MyPipeline)
    with pytest.raises(ValueError, match="SAGLayout"):
        enable_sag(mine, 1.0)
    enable_sag(mine, 1.0, layout=SAGLayout(ways=2, uncond_index=0, latent_channels=16, joint="image_first",
                                           per_row=("encoder_hidden_states", "pooled_projections")))
    np.testing.assert_allclose(sd3_images(mine), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [False, True], ids=["alpha", "sigma"])
def test_pixart_scale_zero_disable_window_and_batch_invariance(sigma):
    from test_diffusers_contract import t5_text

    tp, call = _pixart_call()
    pipe = tp.pixart_pipeline(sigma=sigma)
    state = hook_state(pipe.transformer)
    plain = np.asarray(pipe(generator=gen(0), **call).images)
    enable_sag(pipe, 0.0)
    assert np.array_equal(np.asarray(pipe(generator=gen(0), **call).images), plain)
    enable_sag(pipe, 1.0, start=0.5)
    window = np.asarray(pipe(generator=gen(0), **call).images)
    enable_sag(pipe, 1.0)
    full = np.asarray(pipe(generator=gen(0), **call).images)
    assert np.abs(window - plain).max() > 1e-4 and np.abs(full - window).max() > 1e-4
    two = dict(call, **t5_text(n=2, mask=True))
    both = np.asarray(pipe(generator=[gen(0), gen(1)], **two).images)
    one = dict(call, **{k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in t5_text(n=2, mask=True).items()})
    alone = np.asarray(pipe(generator=gen(1), **one).images)
    np.testing.assert_allclose(both[1], alone[0], rtol=0, atol=1e-4)
    disable_sag(pipe)
    assert hook_state(pipe.transformer) == state
    assert np.array_equal(np.asarray(pipe(generator=gen(0), **call).images), plain)


def test_flux_window():
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    kw = dict(flux_inputs(), num_inference_steps=4)
    plain = pipe(generator=gen(0), **kw).images
    enable_sag(pipe, 1.0, stop=0.5)
    first_half = pipe(generator=gen(0), **kw).images
    enable_sag(pipe, 1.0)
    full = pipe(generator=gen(0), **kw).images
    assert (first_half - plain).abs().max() > 1e-4 and (full - first_half).abs().max() > 1e-4


def test_flux_img2img():
    from diffusers import FluxImg2ImgPipeline

    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(FluxImg2ImgPipeline)
    kw = dict(flux_inputs(), image=torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64), strength=0.8,
              num_inference_steps=4)
    plain = pipe(generator=gen(0), **kw).images
    enable_sag(pipe, 1.0)
    guided = pipe(generator=gen(0), **kw).images
    assert (guided - plain).abs().max() > 1e-3
    disable_sag(pipe)
    assert torch.equal(pipe(generator=gen(0), **kw).images, plain)
