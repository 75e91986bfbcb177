"""SAG on QwenImage (issue 15): packed 2x2 latents, true CFG in two transformer calls (conditional, then
unconditional) followed by the pipeline's norm rescaling, joint attention [text, image] with the padded text
keys masked out of the softmax (encoder_hidden_states_mask -> attn_mask -> the capture's key bias). Scale 0 and
disable_sag bit-exact, SAG changes the output, the pipeline's own CFG + rescaling acts on the SAG-shifted
predictions, batch invariance, the window, one guided call against the float64 reference with the padding
mask active, the extra forward's arguments, img2img / inpaint, the refusals."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from diffusers_checks import gen, hook_state
from sag_fast.diffusers import disable_sag, enable_sag, sag_config
from sag_fast.diffusers.tiny import tiny_qwenimage_pipeline
from test_diffusers_transformers import assert_packed_guided_call, recorded_calls, recorded_sdpa

STATE = "_sag_fast_state"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest's: tiny models run several times faster on one thread here
    yield


def qwen_inputs(seed=0, batch=1, negative=True, text=(6, 5), pad=(2, 3), steps=2):
    """Prompt embeddings with padded tails (masked out by prompt_embeds_mask), 32x32 images: 8x8 latents, 16
    image tokens. The padding holds large random values: a model that attended to it would change visibly."""
    g = torch.Generator().manual_seed(seed + 100)

    def embeds(n, p):
        e, m = torch.randn(batch, n, 32, generator=g), torch.ones(batch, n, dtype=torch.long)
        if p:
            e[:, n - p:] = 10 * torch.randn(batch, p, 32, generator=g)
            m[:, n - p:] = 0
        return e, m

    kw = dict(height=32, width=32, num_inference_steps=steps, output_type="latent")
    kw["prompt_embeds"], kw["prompt_embeds_mask"] = embeds(text[0], pad[0])
    if negative:
        kw["negative_prompt_embeds"], kw["negative_prompt_embeds_mask"] = embeds(text[1], pad[1])
        kw["true_cfg_scale"] = 4.0
    return kw


def latents(pipe, seed=0, **kw):
    return pipe(generator=gen(seed), **kw).images


@pytest.mark.parametrize("negative", [False, True], ids=["no_cfg", "true_cfg"])
def test_scale_zero_disable_and_effect(negative):
    pipe = tiny_qwenimage_pipeline()
    kw = qwen_inputs(negative=negative)
    state = hook_state(pipe.transformer)
    plain = latents(pipe, **kw)
    enable_sag(pipe, 0.0)
    assert torch.equal(latents(pipe, **kw), plain)
    enable_sag(pipe, 1.0)
    capture = vars(pipe)[STATE].capture
    assert (capture.layer_name, capture.joint) == ("transformer_blocks.1.attn", "text_first")
    forwards = []
    handle = pipe.transformer.img_in.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    guided = latents(pipe, **kw)
    handle.remove()
    assert (guided - plain).abs().max() > 1e-3
    assert len(forwards) == 2 * (3 if negative else 2)  # one extra forward per step, with or without true CFG
    disable_sag(pipe)
    assert sag_config(pipe) is None and hook_state(pipe.transformer) == state
    assert torch.equal(latents(pipe, **kw), plain)


def test_true_cfg_and_rescaling_act_on_the_shifted_predictions():
    """Both calls' outputs get the same shift s(u - d) (computed in the unconditional call), and what the
    scheduler steps with is the pipeline's own combination of them: comb = u' + w(c' - u'), then
    comb * |c'| / |comb| per token (norms over the packed channels)."""
    pipe = tiny_qwenimage_pipeline()
    kw = qwen_inputs()
    enable_sag(pipe, 0.8)
    model = pipe.transformer
    seen = []
    model.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0])), with_kwargs=True)
    stepped = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda pred, *a, **k: stepped.append(pred.clone()) or step(pred, *a, **k)
    latents(pipe, **kw)
    del pipe.scheduler.step
    # step 1 (at step 0 sigma = 1 and SAG has no effect); the conditional output is shifted after its hook ran:
    # read the tensor the pipeline holds, not a clone
    (k_c, c_shifted), (k_u, u_shifted) = seen[2], seen[3]
    disable_sag(pipe)
    with torch.no_grad():
        c = model(**{**k_c, "return_dict": False})[0]
        u = model(**{**k_u, "return_dict": False})[0]
    delta = u_shifted - u
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(c_shifted - c, delta, rtol=0, atol=1e-5)
    c2, u2 = c_shifted.double(), u_shifted.double()
    comb = u2 + 4.0 * (c2 - u2)
    want = comb * (c2.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(stepped[1].double(), want, rtol=0, atol=1e-5)
    unshifted = u + 4.0 * (c - u)  # the rescaling against the unshifted c would differ: the test can tell
    assert (want - unshifted * (c.norm(dim=-1, keepdim=True) / unshifted.norm(dim=-1, keepdim=True))).abs().max() > 1e-3


def test_extra_forward_gets_the_unconditional_call_and_its_conditioning(monkeypatch):
    """Split CFG: the extra forward runs inside the unconditional call, on all its rows (B), with that call's
    negative embeddings, their padding mask, img_shapes and timestep, and the degraded latents."""
    from diffusers import QwenImageTransformer2DModel

    calls = []
    forward = QwenImageTransformer2DModel.forward

    @functools.wraps(forward)  # its signature: the engine binds the forward's arguments by name
    def recording(self, *args, **kwargs):  # the class's forward: the extra forward calls it past the hooks
        calls.append(dict(kwargs))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer2DModel, "forward", recording)
    pipe = tiny_qwenimage_pipeline()
    kw = qwen_inputs(batch=2)
    enable_sag(pipe, 1.0)
    pipe(generator=[gen(0), gen(1)], **kw)
    assert len(calls) == 6
    cond, uncond, extra = calls[3:6]  # step 1; the extra forward is called from inside the unconditional call
    assert torch.equal(cond["encoder_hidden_states"], kw["prompt_embeds"])
    assert torch.equal(uncond["encoder_hidden_states"], kw["negative_prompt_embeds"])
    for name in ("encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance"):
        a, b = uncond[name], extra[name]
        assert (a is None and b is None) or torch.equal(a, b), name
    assert extra["img_shapes"] == uncond["img_shapes"] == [[(1, 4, 4)]] * 2
    assert extra["hidden_states"].shape == uncond["hidden_states"].shape == (2, 16, 64)
    assert not torch.equal(extra["hidden_states"], uncond["hidden_states"])


def test_batch_invariance_and_window():
    pipe = tiny_qwenimage_pipeline()
    enable_sag(pipe, 1.0)
    two = qwen_inputs(batch=2)
    both = pipe(generator=[gen(0), gen(1)], **two).images
    one = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in two.items()}
    alone = pipe(generator=gen(1), **one).images
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-4)
    kw = qwen_inputs(steps=4)
    forwards = []
    pipe.transformer.img_in.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    enable_sag(pipe, 1.0, start=0.5, stop=1.0)
    window = latents(pipe, **kw)
    assert len(forwards) == 2 * 2 + 3 * 2  # steps 0, 1: cond + uncond; steps 2, 3: + the extra forward
    enable_sag(pipe, 1.0)
    assert (latents(pipe, **kw) - window).abs().max() > 1e-4


def masked_joint_mask_reference(q, k, scale, key_mask, n_img, grid, threshold=1.0):
    """float64, materialised: softmax over the kept keys (text padding at -inf, as SDPA with the layer's boolean
    attn_mask), image-key mass from the image queries ([text, image]), threshold relative to its mean."""
    q, k = q.double(), k.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = torch.zeros(key_mask.shape, dtype=torch.float64).masked_fill(~key_mask, float("-inf"))
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale + bias[:, None, None, :], dim=-1)
    start = q.shape[2] - n_img
    mass = probs[:, :, start:, start:].sum(-2).mean(1)
    return (mass > threshold * mass.mean(-1, keepdim=True)).reshape(-1, *grid)


def test_guided_call_equals_the_float64_reference_with_the_text_padding_masked():
    """The unconditional call of step 1 (true CFG): unpack, the joint mask from materialised probabilities of the
    layer's real q/k (rotary applied) with the padded negative-prompt keys out of the softmax, reference.degrade
    with flow (c1, c2) at the step's sigma, the degraded forward, reference.guidance_shift, pack. The padding
    matters: the mask without the key mask is another one."""
    pipe = tiny_qwenimage_pipeline()
    kw = qwen_inputs(batch=2, pad=(2, 3))
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    pipe(generator=[gen(0), gen(1)], **kw)
    kwargs, guided = seen[3]  # step 1's unconditional call (seen: the pipeline's calls only)
    kwargs.pop("return_dict", None)
    x = kwargs.pop("hidden_states")
    disable_sag(pipe)
    with torch.no_grad(), recorded_sdpa() as qk:
        out = model(hidden_states=x, return_dict=False, **kwargs)[0]
    q, k, scale = qk[1]  # transformer_blocks.1
    text_mask = kwargs["encoder_hidden_states_mask"].bool()
    assert not text_mask.all()
    key_mask = torch.cat([text_mask, torch.ones(2, 16, dtype=torch.bool)], dim=1)
    mask = masked_joint_mask_reference(q, k, scale, key_mask, 16, (4, 4))
    assert mask.any() and not mask.all()
    unmasked = masked_joint_mask_reference(q, k, scale, torch.ones_like(key_mask), 16, (4, 4))
    assert not torch.equal(mask, unmasked), "the padding does not change the mask: the test could not see key_bias"
    sigma = float(pipe.scheduler.sigmas[1])
    assert_packed_guided_call(model, kwargs, x, out, guided, mask, sigma, 0.9)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint(kind):
    import diffusers

    cls = {"img2img": diffusers.QwenImageImg2ImgPipeline, "inpaint": diffusers.QwenImageInpaintPipeline}[kind]
    pipe = tiny_qwenimage_pipeline(cls)
    kw = dict(qwen_inputs(steps=3), image=torch.linspace(0, 1, 3 * 32 * 32).reshape(1, 3, 32, 32), strength=0.9)
    if kind == "inpaint":
        kw["mask_image"] = (torch.arange(32 * 32).reshape(1, 1, 32, 32) % 32 < 16).float()
    plain = latents(pipe, **kw)
    enable_sag(pipe, 1.0)
    guided = latents(pipe, **kw)
    assert (guided - plain).abs().max() > 1e-3
    disable_sag(pipe)
    assert torch.equal(latents(pipe, **kw), plain)


def test_edit_and_other_qwenimage_pipelines_are_refused_with_the_reason():
    """Edit (reference-image tokens after the latent tokens): its refusal record; ControlNet / Layered (no
    record): the packed-latent rule. Nothing is installed."""
    import diffusers

    from sag_fast.diffusers.tiny import tiny_qwenimage_transformer

    transformer = tiny_qwenimage_transformer()
    state = hook_state(transformer)
    for cls, match in ((diffusers.QwenImageEditPipeline, "reference images' tokens"),
                       (diffusers.QwenImageLayeredPipeline, "packed 3-D latents.*without a record")):
        pipe = cls.__new__(cls)
        diffusers.DiffusionPipeline.__init__(pipe)
        pipe.register_modules(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
        with pytest.raises(ValueError, match=match):
            enable_sag(pipe)
        assert sag_config(pipe) is None and hook_state(transformer) == state
    # the modular guider reads the latent's (H, W) off img_shapes: only a single (1, H/2, W/2) grid is a plain one
    from sag_fast.diffusers.registry import img_shapes_hw

    assert img_shapes_hw({"img_shapes": [[(1, 4, 6)]] * 2}) == (8, 12)
    assert img_shapes_hw({"img_shapes": [[(1, 4, 4), (1, 4, 4)]]}) is None  # Edit: reference-image tokens appended
    assert img_shapes_hw({"img_shapes": None}) is None and img_shapes_hw({}) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_modular_guider_matches_enable_sag_on_classic_qwenimage(dtype):
    """sag_fast's SelfAttentionGuidance as the guider of diffusers' modular QwenImage pipeline (QwenImageAutoBlocks:
    packed latents unpacked with the record's packed_hw, t / 1000 recomputed per batch, the loop's norm rescaling
    against the guider's pred_cond, which is the shifted c') gives the latents of enable_sag on QwenImagePipeline
    (same tiny components, rebuilt from their seeds; same embeddings, padding masks and seed); the transformer is
    left as it was."""
    from diffusers.modular_pipelines import QwenImageAutoBlocks

    from sag_fast.diffusers.guider import SelfAttentionGuidance

    classic = tiny_qwenimage_pipeline(dtype=dtype)
    pipe = QwenImageAutoBlocks().init_pipeline()
    twin = tiny_qwenimage_pipeline(dtype=dtype)
    pipe.update_components(transformer=twin.transformer, vae=twin.vae, scheduler=twin.scheduler)
    pipe.set_progress_bar_config(disable=True)
    kw = qwen_inputs(steps=3)
    embeds = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items() if "embeds" in k}
    call = dict(**embeds, height=32, width=32, num_inference_steps=3)

    def classic_run():
        out = classic(**call, true_cfg_scale=4.0, generator=gen(0), output_type="latent").images
        return classic._unpack_latents(out, 32, 32, classic.vae_scale_factor)

    plain = classic_run()
    enable_sag(classic, 0.75)
    expected = classic_run()
    disable_sag(classic)
    before = hook_state(pipe.transformer)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=4.0, sag_scale=0.75, scheduler=pipe.scheduler))
    got = pipe(**call, generator=gen(0), output="latents")
    effect, diff = (expected - plain).abs().max().item(), (got - expected).abs().max().item()
    print(f"\nQwenImage {dtype}: |guider - enable_sag| = {diff:.3g}, SAG effect {effect:.3g}")
    assert got.shape == expected.shape == (1, 16, 1, 8, 8) and effect > 1e-2
    assert diff <= (1e-12 if dtype == torch.float64 else 1e-4)
    assert hook_state(pipe.transformer) == before
