"""The batch contract (sag_fast/diffusers/contract.py) against the real diffusers pipelines (tiny random models).

Part 1, no SAG session: every table row is checked against the denoiser call its pipeline really makes (the
unconditional rows are found by content: the negative prompt embeddings, DiT's null class, pix2pix's zero
image latents, GLIGEN's zero masks), and degraded_kwargs cuts exactly the per-row arguments.
Part 2, through enable_sag (issue 8, items 5, 6, 7, 10, 11, 12, 13, 14): a spy on the denoiser's forward
proves the extra forward receives exactly the unconditional rows and the unchanged conditioning channels;
image k of a batch equals that image alone; refusals happen at enable_sag with their message."""
from __future__ import annotations

import contextlib
import functools
import inspect

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from diffusers import DDIMPipeline, StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline
from diffusers_checks import gen
from sag_fast.diffusers.contract import BatchContract, CallLayout, SAGLayout, contract_for
from sag_fast.diffusers.tiny import TEXT_HIDDEN, TEXT_MAX_LENGTH, tiny_dit_pipeline, tiny_sd3_pipeline, \
    tiny_sd_components, tiny_sd_pipeline, tiny_unet2d_pipeline

IMG = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
MASK = torch.zeros(1, 1, 64, 64)
MASK[..., 16:48, 16:48] = 1
LOW_RES = torch.linspace(0, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=gen(seed))


def sd_text(n: int = 1, seed: int = 10) -> dict:
    """Distinct prompt / negative prompt embeddings: the unconditional rows are recognised by their content."""
    return dict(prompt_embeds=_randn(n, TEXT_MAX_LENGTH, TEXT_HIDDEN, seed=seed),
                negative_prompt_embeds=_randn(n, TEXT_MAX_LENGTH, TEXT_HIDDEN, seed=seed + 1))


def sdxl_text(n: int = 1, seed: int = 20) -> dict:
    return dict(prompt_embeds=_randn(n, TEXT_MAX_LENGTH, 2 * TEXT_HIDDEN, seed=seed),
                negative_prompt_embeds=_randn(n, TEXT_MAX_LENGTH, 2 * TEXT_HIDDEN, seed=seed + 1),
                pooled_prompt_embeds=_randn(n, TEXT_HIDDEN, seed=seed + 2),
                negative_pooled_prompt_embeds=_randn(n, TEXT_HIDDEN, seed=seed + 3))


def t5_text(n: int = 1, seed: int = 30, mask: bool = False) -> dict:
    out = dict(prompt_embeds=tp.embeds(n, seed), negative_prompt_embeds=tp.embeds(n, seed + 1))
    if mask:  # PixArt
        out.update(prompt=None, negative_prompt=None, prompt_attention_mask=torch.ones(n, tp.EMBED_LEN),
                   negative_prompt_attention_mask=torch.ones(n, tp.EMBED_LEN), use_resolution_binning=False)
    return out


def kandinsky_embeds(n: int = 1, seed: int = 40) -> dict:
    return dict(image_embeds=_randn(n, tp.IMAGE_EMBED, seed=seed),
                negative_image_embeds=_randn(n, tp.IMAGE_EMBED, seed=seed + 1))


def _neg_image_embeds(rows_kwargs, call, x_rows=None, latent=None):
    neg = call["negative_image_embeds"]
    emb = rows_kwargs["added_cond_kwargs"]["image_embeds"]
    return torch.equal(emb, neg.repeat_interleave(emb.shape[0] // neg.shape[0], 0))


def _neg_text(rows_kwargs, call, x_rows=None, latent=None):
    """The unconditional rows carry the negative prompt embeddings."""
    neg = call["negative_prompt_embeds"]
    ehs = rows_kwargs["encoder_hidden_states"]
    return torch.equal(ehs, neg.repeat_interleave(ehs.shape[0] // neg.shape[0], 0))


def _sd3_neg_text(rows_kwargs, call, x_rows=None, latent=None):
    """SD3's unconditional rows carry the embeddings of the negative prompt (encoded by the same tiny encoders)."""
    neg = _pipe("sd3").encode_prompt(call["negative_prompt"], None, None, do_classifier_free_guidance=False,
                                     max_sequence_length=call["max_sequence_length"])[0]
    ehs = rows_kwargs["encoder_hidden_states"]
    return torch.equal(ehs, neg.repeat_interleave(ehs.shape[0] // neg.shape[0], 0))


def _pix2pix_uncond(rows_kwargs, call, x_rows, latent):
    return _neg_text(rows_kwargs, call) and bool((x_rows[:, latent:] == 0).all())


# name -> (builder, call kwargs, expected (ways with CFG, uncond index, latent channels), uncond check)
# uncond check(kwargs of the uncond rows, call kwargs, x of the uncond rows, latent channels) -> bool
CASES = {
    "sd": (tiny_sd_pipeline, dict(**sd_text()), (2, 0, 4), _neg_text),
    "sd_inpaint9": (tp.sd_inpaint_pipeline, dict(image=IMG, mask_image=MASK, **sd_text()), (2, 0, 4), _neg_text),
    "sdxl_inpaint9": (tp.sdxl_inpaint_pipeline, dict(image=IMG, mask_image=MASK, height=64, width=64, strength=1.0,
                                                     **sdxl_text()),
                      (2, 0, 4), _neg_text),
    "pix2pix": (tp.sd_pix2pix_pipeline, dict(image=IMG, **sd_text()), (3, 2, 4), None),
    "sdxl_pix2pix": (tp.sdxl_pix2pix_pipeline, dict(image=IMG, height=64, width=64, **sdxl_text()), (3, 2, 4), None),
    "depth2img": (tp.depth2img_pipeline, dict(image=IMG, depth_map=torch.rand(1, 64, 64, generator=gen(3)),
                                              **sd_text()), (2, 0, 4), _neg_text),
    "x4_upscaler": (tp.x4_upscaler_pipeline, dict(image=LOW_RES, **sd_text()), (2, 0, 4), _neg_text),
    "controlnet": (tp.controlnet_pipeline, dict(image=IMG, **sd_text()), (2, 0, 4), _neg_text),
    "controlnet_sdxl": (lambda: tp.controlnet_pipeline(sdxl=True), dict(image=IMG, height=64, width=64, **sdxl_text()),
                        (2, 0, 4), _neg_text),
    "controlnet_multi": (lambda: tp.controlnet_pipeline(multi=True), dict(image=[IMG, IMG.flip(-1)],
                                                                          controlnet_conditioning_scale=[1.0, 0.5],
                                                                          **sd_text()), (2, 0, 4), _neg_text),
    "gligen": (tp.gligen_pipeline, dict(gligen_phrases=["a dog"], gligen_boxes=[[0.1, 0.1, 0.6, 0.6]], **sd_text()),
               (2, 0, 4), None),
    "dit": (tiny_dit_pipeline, dict(class_labels=[1]), (2, 1, 4), None),
    "pixart": (tp.pixart_pipeline, dict(**t5_text(mask=True), height=64, width=64), (2, 0, 4), _neg_text),
    "pixart_sigma": (lambda: tp.pixart_pipeline(sigma=True), dict(**t5_text(mask=True), height=64, width=64),
                     (2, 0, 4), _neg_text),
    "if_stage_1": (tp.if_pipeline, dict(**t5_text(), height=8, width=8), (2, 0, 3), _neg_text),
    "if_stage_2": (tp.if_superresolution_pipeline, dict(image=LOW_RES, **t5_text(), height=16, width=16),
                   (2, 0, 3), _neg_text),
    "ddpm": (tiny_unet2d_pipeline, dict(batch_size=1), (1, 0, 3), None),
    # the other rows of the table, checked the same way
    "sd_img2img": (lambda: tiny_sd_pipeline(StableDiffusionImg2ImgPipeline), dict(image=IMG, **sd_text()), (2, 0, 4),
                   _neg_text),
    "sd_inpaint4": (lambda: tp.sd_inpaint_pipeline(4), dict(image=IMG, mask_image=MASK, **sd_text()), (2, 0, 4),
                    _neg_text),
    "sdxl": (tp.sdxl_pipeline, dict(height=64, width=64, **sdxl_text()), (2, 0, 4), _neg_text),
    "sdxl_img2img": (lambda: tp.sdxl_pipeline("Img2Img"), dict(image=IMG, strength=0.6, **sdxl_text()), (2, 0, 4),
                     _neg_text),
    "controlnet_img2img": (lambda: tp.controlnet_pipeline(kind="Img2Img"), dict(image=IMG, control_image=IMG,
                                                                                 **sd_text()), (2, 0, 4), _neg_text),
    "controlnet_inpaint": (lambda: tp.controlnet_pipeline(kind="Inpaint"), dict(image=IMG, mask_image=MASK,
                                                                                 control_image=IMG, **sd_text()),
                           (2, 0, 4), _neg_text),
    "controlnet_sdxl_img2img": (lambda: tp.controlnet_pipeline(sdxl=True, kind="Img2Img"),
                                dict(image=IMG, control_image=IMG, height=64, width=64, **sdxl_text()), (2, 0, 4),
                                _neg_text),
    "controlnet_sdxl_inpaint": (lambda: tp.controlnet_pipeline(sdxl=True, kind="Inpaint"),
                                dict(image=IMG, mask_image=MASK, control_image=IMG, height=64, width=64, strength=1.0,
                                     **sdxl_text()), (2, 0, 4), _neg_text),
    "ddim": (lambda: tiny_unet2d_pipeline(DDIMPipeline), dict(batch_size=1), (1, 0, 3), None),
    "if_img2img": (lambda: tp.if_pipeline("Img2Img"), dict(image=LOW_RES, **t5_text()), (2, 0, 3), _neg_text),
    "if_inpainting": (lambda: tp.if_pipeline("Inpainting"), dict(image=LOW_RES, mask_image=LOW_RES[:, :1] > 0.5,
                                                                 **t5_text()), (2, 0, 3), _neg_text),
    "if_img2img_sr": (lambda: tp.if_superresolution_pipeline("Img2Img"),
                      dict(image=LOW_RES, original_image=torch.rand(1, 3, 16, 16, generator=gen(5)), **t5_text()),
                      (2, 0, 3), _neg_text),
    "if_inpainting_sr": (lambda: tp.if_superresolution_pipeline("Inpainting"),
                         dict(image=LOW_RES, original_image=torch.rand(1, 3, 16, 16, generator=gen(5)),
                              mask_image=torch.rand(1, 1, 16, 16, generator=gen(6)) > 0.5, **t5_text()),
                         (2, 0, 3), _neg_text),
    "kandinsky22_img2img": (lambda: tp.kandinsky22_pipeline(kind="Img2Img"),
                            dict(**kandinsky_embeds(), image=IMG[..., :16, :16], height=16, width=16, strength=0.6),
                            (2, 0, 4), None),
    "kandinsky22_inpaint": (lambda: tp.kandinsky22_pipeline(kind="Inpaint"),
                            dict(**kandinsky_embeds(), image=IMG[..., :16, :16], mask_image=MASK[0, 0, 24:40, 24:40],
                                 height=16, width=16), (2, 0, 4), None),
    "kandinsky22_controlnet_img2img": (lambda: tp.kandinsky22_pipeline(controlnet=True, kind="Img2Img"),
                                       dict(**kandinsky_embeds(), image=IMG[..., :16, :16], strength=0.6,
                                            hint=torch.rand(1, 3, 64, 64, generator=gen(4)), height=16, width=16),
                                       (2, 0, 4), None),
    "kandinsky22": (tp.kandinsky22_pipeline, dict(**kandinsky_embeds(), height=16, width=16), (2, 0, 4), None),
    "kandinsky22_controlnet": (lambda: tp.kandinsky22_pipeline(controlnet=True),
                               dict(**kandinsky_embeds(), hint=torch.rand(1, 3, 64, 64, generator=gen(4)), height=16,
                                    width=16), (2, 0, 4), None),
    "sd3": (tiny_sd3_pipeline, dict(prompt="a cat", negative_prompt="a dog", max_sequence_length=4), (2, 0, 16),
            None),
    "sd3_img2img": (lambda: tiny_sd3_pipeline(StableDiffusion3Img2ImgPipeline),
                    dict(image=IMG, strength=0.8, prompt="a cat", negative_prompt="a dog", max_sequence_length=4),
                    (2, 0, 16), None),
}
# the CFG-off call of each (None: the pipeline has no CFG)
CFG_OFF = {"pix2pix": dict(image_guidance_scale=0.5), "sdxl_pix2pix": dict(image_guidance_scale=0.5), "ddpm": None,
           "ddim": None}


def _uncond_check(name):
    check = CASES[name][3]
    if check is not None:
        return check
    if name in ("pix2pix", "sdxl_pix2pix"):
        return _pix2pix_uncond
    if name == "dit":
        return lambda kw, call, x, lat: bool((kw["class_labels"] == 1000).all())
    if name.startswith("sd3"):
        return _sd3_neg_text
    if name.startswith("kandinsky"):
        return _neg_image_embeds
    if name == "gligen":
        return lambda kw, call, x, lat: bool((kw["cross_attention_kwargs"]["gligen"]["masks"] == 0).all())
    return lambda kw, call, x, lat: True


@functools.lru_cache(maxsize=None)
def _pipe(name):
    return CASES[name][0]()


def _model(pipe):
    return pipe.unet if isinstance(getattr(pipe, "unet", None), torch.nn.Module) else pipe.transformer


def _flat(signature, args, kwargs, drop_self=False) -> dict:
    bound = signature.bind(*args, **kwargs)
    out = dict(bound.arguments)
    if drop_self:
        out.pop("self", None)
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD and p.name in out:
            out.update(out.pop(p.name))
    return out


def call_args(pipe, **kwargs) -> dict:
    """The pipeline __call__'s arguments bound with defaults (what the session hands to layout())."""
    signature = inspect.signature(type(pipe).__call__)
    bound = signature.bind(pipe, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    out.update(out.pop("kwargs", None) or {})
    return out


def _run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return np.asarray(pipe(generator=kwargs.pop("generator", gen(seed)), **kwargs).images)


class _Stop(Exception):
    pass


def first_model_call(pipe, **kwargs) -> tuple[torch.Tensor, dict]:
    """(x, other arguments by name) of the pipeline's first denoiser call (no SAG); the call stops there."""
    model = _model(pipe)
    signature = inspect.signature(model.forward)
    seen = []

    def hook(module, args, kw):
        named = _flat(signature, args, kw)
        x = named.pop(next(iter(signature.parameters)))
        seen.append((x, named))
        raise _Stop

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            _run(pipe, num_inference_steps=2, **kwargs)
    finally:
        handle.remove()
    x, named = seen[0]
    for k in ("timestep", "return_dict"):
        named.pop(k, None)
    return x, named


# =============================================================================== part 1: the table itself
@pytest.mark.parametrize("name", list(CASES))
def test_table_row_matches_the_pipelines_batch(name):
    """layout() on the pipeline's real denoiser call: ways * B == batch, the uncond rows are the unconditional
    ones (by content), CFG off gives one way, num_images_per_prompt=2 keeps the layout."""
    build, kwargs, (ways, uncond, latent), _ = CASES[name]
    pipe = _pipe(name)
    contract = contract_for(pipe, _model(pipe))
    check = _uncond_check(name)
    images = 2
    call = dict(kwargs)
    if name in ("ddpm", "ddim"):
        call["batch_size"] = 2
        images = 2
    elif name == "dit":
        call["class_labels"] = [1, 3]
        images = 2
    else:
        call["num_images_per_prompt"] = 2
    x, model_kwargs = first_model_call(pipe, **call)
    layout = contract.layout(pipe, call_args(pipe, **call), x, model_kwargs)
    assert layout == CallLayout(ways, uncond, latent)
    assert x.shape[0] == ways * images
    b = x.shape[0] // ways
    rows = slice(uncond * b, (uncond + 1) * b)
    cut = contract.degraded_kwargs(model_kwargs, rows, x.shape[0], x[rows], None)
    assert check(cut, call, x[rows], latent), f"{name}: the rows the contract calls unconditional are not"
    if ways > 1:  # and no other way passes the same check
        for other in range(ways):
            if other != uncond:
                r = slice(other * b, (other + 1) * b)
                other_rows = contract.degraded_kwargs(model_kwargs, r, x.shape[0], x[r], None)
                assert not check(other_rows, call, x[r], latent)

    off = CFG_OFF.get(name, dict(guidance_scale=1.0))
    if off is not None:
        x1, kw1 = first_model_call(pipe, **{**kwargs, **off})
        assert contract.layout(pipe, call_args(pipe, **{**kwargs, **off}), x1, kw1) == CallLayout(1, 0, latent)
        assert x1.shape[0] == 1


def test_every_registry_pipeline_is_checked_against_its_pipeline():
    from sag_fast.diffusers import registry

    covered = {registry.pipeline_class(_pipe(name))[0].__name__ for name in CASES}
    supported = {p for f in registry.FAMILIES if f.refusal is None for p in f.pipelines}
    # the packed records (Flux and its variants) are checked through real calls in test_diffusers_transformers.py
    # and test_diffusers_variants.py (Flux does not repeat given prompt embeddings for num_images_per_prompt,
    # which the probe here relies on), PAG's extra way in test_diffusers_variants.py, the video records (5-D
    # latents) in test_diffusers_video.py, QwenImage's in test_diffusers_qwenimage.py; issue 15's families (Chroma, Lumina 2, CogView4, AuraFlow, HunyuanDiT,
    # Kandinsky 3, LCM) through real calls in test_diffusers_families.py, whose reference test reads the extra
    # forward's arguments (the unconditional rows) off the model
    from test_diffusers_families import PIPELINES as families

    elsewhere = {p for f in registry.FAMILIES if f.packed or f.video or f.extra_ways is not None for p in f.pipelines}
    assert {"FluxPipeline", "FluxKontextPipeline", "StableDiffusionPAGPipeline", "WanPipeline"} <= elsewhere
    assert covered == supported - elsewhere - set(families)


def test_lcm_unet_has_no_cfg_way():
    """SD's do_classifier_free_guidance is off for a UNet with time_cond_proj_dim (LCM) whatever the scale."""
    from diffusers import StableDiffusionPipeline

    pipe = tp._sd(StableDiffusionPipeline, tp.cond_unet(time_cond_proj_dim=8))
    contract = contract_for(pipe, pipe.unet)
    x, kw = first_model_call(pipe, **sd_text(), guidance_scale=7.5)
    assert x.shape[0] == 1 and kw["timestep_cond"].shape[0] == 1
    assert contract.layout(pipe, call_args(pipe, guidance_scale=7.5), x, kw) == CallLayout(1, 0, 4)


def test_layout_uses_the_pipeline_defaults_and_reads_the_cfg_property_live():
    pipe = tiny_sd_pipeline()
    contract = contract_for(pipe, pipe.unet)
    x = torch.zeros(2, 4, 8, 8)
    # outside a call the property has nothing to read: guidance_scale's default, 7.5
    assert contract.layout(pipe, {}, x, _sd_kwargs(2)).ways == 2
    pipe._guidance_scale = 1.0  # what the SD loop reads (a step-end callback may set it mid-run): one way
    assert contract.layout(pipe, {"guidance_scale": 7.5}, x[:1], _sd_kwargs(1)).ways == 1
    with pytest.raises(RuntimeError, match="the per-row model argument encoder_hidden_states"):
        contract.layout(pipe, {"guidance_scale": 7.5}, x[:1], _sd_kwargs(2))  # a batch that does not fit


def _sd_kwargs(total=4):
    return dict(encoder_hidden_states=_randn(total, 77, 32, seed=1), timestep_cond=None,
                cross_attention_kwargs=None, added_cond_kwargs=None)


def test_degraded_kwargs_cuts_only_the_per_row_arguments():
    pipe = _pipe("sd")
    contract = contract_for(pipe, pipe.unet)
    coincidence = torch.arange(4.0)  # first dim == the batch, but not a per-row argument
    kw = dict(_sd_kwargs(), cross_attention_kwargs={"scale": 0.5, "bias": coincidence}, mystery=coincidence,
              added_cond_kwargs={"text_embeds": _randn(4, 8, seed=2), "image_embeds": [_randn(4, 1, 8, seed=3)]})
    rows = slice(0, 2)
    out = contract.degraded_kwargs(kw, rows, 4, torch.zeros(2, 4, 8, 8), None)
    assert torch.equal(out["encoder_hidden_states"], kw["encoder_hidden_states"][rows])
    assert out["cross_attention_kwargs"] is kw["cross_attention_kwargs"]
    assert out["mystery"] is coincidence and out["cross_attention_kwargs"]["bias"] is coincidence
    assert torch.equal(out["added_cond_kwargs"]["text_embeds"], kw["added_cond_kwargs"]["text_embeds"][rows])
    assert torch.equal(out["added_cond_kwargs"]["image_embeds"][0], kw["added_cond_kwargs"]["image_embeds"][0][rows])
    assert kw["encoder_hidden_states"].shape[0] == 4 and kw["added_cond_kwargs"]["text_embeds"].shape[0] == 4


def test_degraded_kwargs_cuts_gligen_nested_and_controlnet_residuals():
    pipe = _pipe("sd")
    contract = contract_for(pipe, pipe.unet)
    gligen = {"boxes": _randn(4, 30, 4, seed=4), "positive_embeddings": _randn(4, 30, 32, seed=5),
              "masks": torch.ones(4, 30)}
    down = tuple(_randn(4, c, 8, 8, seed=6 + i) for i, c in enumerate((16, 16, 32)))
    kw = dict(_sd_kwargs(), cross_attention_kwargs={"gligen": gligen, "scale": 1.0},
              down_block_additional_residuals=down, mid_block_additional_residual=_randn(4, 32, 4, 4, seed=9))
    rows = slice(2, 4)
    out = contract.degraded_kwargs(kw, rows, 4, torch.zeros(2, 4, 8, 8), None)
    assert out["cross_attention_kwargs"]["scale"] == 1.0
    for k, v in gligen.items():
        assert torch.equal(out["cross_attention_kwargs"]["gligen"][k], v[rows])
    assert kw["cross_attention_kwargs"]["gligen"] is gligen and gligen["boxes"].shape[0] == 4  # not modified
    assert isinstance(out["down_block_additional_residuals"], tuple)
    assert all(torch.equal(a, b[rows]) for a, b in zip(out["down_block_additional_residuals"], down, strict=True))
    assert torch.equal(out["mid_block_additional_residual"], kw["mid_block_additional_residual"][rows])


def test_dit_class_labels_and_pixart_masks_are_per_row():
    dit = _pipe("dit")
    c = contract_for(dit, dit.transformer)
    labels = torch.tensor([1, 3, 1000, 1000])
    out = c.degraded_kwargs({"class_labels": labels}, slice(2, 4), 4, torch.zeros(2, 4, 8, 8), None)
    assert out["class_labels"].tolist() == [1000, 1000]
    px = _pipe("pixart")
    c = contract_for(px, px.transformer)
    kw = dict(encoder_hidden_states=_randn(2, 8, 32, seed=1), encoder_attention_mask=torch.tensor([[1.0] * 8, [0.0] * 8]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    out = c.degraded_kwargs(kw, slice(0, 1), 2, torch.zeros(1, 4, 8, 8), None)
    assert out["encoder_attention_mask"].tolist() == [[1.0] * 8] and out["added_cond_kwargs"]["resolution"] is None


def test_layout_refuses_a_batch_that_does_not_fit():
    pipe = tiny_sd_pipeline()
    contract = contract_for(pipe, pipe.unet)
    with pytest.raises(RuntimeError, match="batch of 3, not a multiple of 2"):
        contract.layout(pipe, {"guidance_scale": 7.5}, torch.zeros(3, 4, 8, 8), _sd_kwargs(3))
    with pytest.raises(RuntimeError, match=r"encoder_hidden_states has shape \(2, 77, 32\).*4 rows"):
        contract.layout(pipe, {"guidance_scale": 7.5}, torch.zeros(4, 4, 8, 8), _sd_kwargs(2))
    with pytest.raises(RuntimeError, match=r"added_cond_kwargs.time_ids has shape \(1, 6\)"):
        contract.layout(pipe, {"guidance_scale": 7.5}, torch.zeros(4, 4, 8, 8),
                        dict(_sd_kwargs(), added_cond_kwargs={"time_ids": torch.zeros(1, 6)}))
    with pytest.raises(RuntimeError, match="4 latent channels but the denoiser input"):
        contract.layout(pipe, {"guidance_scale": 7.5}, torch.zeros(4, 3, 8, 8), _sd_kwargs())


# ------------------------------------------------------------------------------------ declaration, refusals
from diffusers import StableDiffusionPipeline  # noqa: E402


class CustomPipeline(StableDiffusionPipeline):
    """A user pipeline with its own __call__: its batch layout is unknown to sag_fast."""

    def __call__(self, prompt, my_scale: float = 3.0, **kwargs):
        return super().__call__(prompt, guidance_scale=my_scale, **kwargs)


def test_unknown_pipeline_is_refused_with_the_way_to_declare_it():
    pipe = tiny_sd_pipeline(CustomPipeline)
    with pytest.raises(ValueError, match=r"CustomPipeline.*SAGLayout.*layout="):
        contract_for(pipe, pipe.unet)
    layout = SAGLayout(cfg=lambda call: call["my_scale"] > 1, ways=2, uncond_index=0, latent_channels=4,
                       per_row=("encoder_hidden_states", "cross_attention_kwargs.gligen"))
    contract = contract_for(pipe, pipe.unet, layout=layout)
    assert isinstance(contract, BatchContract)
    x = torch.zeros(2, 4, 8, 8)
    assert contract.layout(pipe, {"my_scale": 3.0}, x, _sd_kwargs(2)) == CallLayout(2, 0, 4)
    assert contract.layout(pipe, {"my_scale": 1.0}, x, _sd_kwargs(2)) == CallLayout(1, 0, 4)
    assert SAGLayout(cfg=False, latent_channels=None).per_row == ("encoder_hidden_states",)
    assert contract_for(pipe, pipe.unet, layout=SAGLayout(cfg=False)).layout(pipe, {}, x, {}) == CallLayout(1, 0, 4)
    # a plain subclass that keeps diffusers' __call__ keeps its table row
    sub = tiny_sd_pipeline(type("MySD", (StableDiffusionPipeline,), {}))
    assert contract_for(sub, sub.unet).layout(sub, {"guidance_scale": 5.0}, torch.zeros(2, 4, 8, 8),
                                              _sd_kwargs(2)) == CallLayout(2, 0, 4)


@pytest.mark.parametrize("bad,match", [
    (dict(ways=0), "ways must be a positive int"), (dict(ways=2, uncond_index=2), r"uncond_index must be in \[0, ways=2\)"),
    (dict(latent_channels=0), "latent_channels must be None or a positive int"), (dict(per_row=(1,)), "per_row"),
    (dict(cfg="yes"), "cfg must be a bool or a function"),
])
def test_sag_layout_validates(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SAGLayout(**bad)


def test_contract_for_argument_errors():
    pipe = _pipe("sd")
    with pytest.raises(TypeError, match="layout must be a sag_fast.SAGLayout"):
        contract_for(pipe, pipe.unet, layout={"ways": 2})
    with pytest.raises(ValueError, match=r"StableDiffusionPipeline with a UNet2DModel denoiser is not supported"):
        contract_for(pipe, tiny_unet2d_pipeline().unet)


def _flux_control_img2img():
    from diffusers import FluxControlImg2ImgPipeline

    c = tp.flux_pipeline().components
    return FluxControlImg2ImgPipeline(**{k: c[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                           "text_encoder_2", "tokenizer_2", "transformer")})


def _pag_img2img():
    from diffusers import StableDiffusionPAGImg2ImgPipeline

    return StableDiffusionPAGImg2ImgPipeline(**tiny_sd_components(), pag_applied_layers="mid")


REFUSED = {
    "pag_sd_img2img": (_pag_img2img, "PAG.*known for StableDiffusionPAGPipeline"),
    "animatediff_video2video": (lambda: _animatediff_v2v(), "video layout is not in the registry yet"),
    "flux_control_img2img": (lambda: _flux_control_img2img(), "packed.*not supported yet"),
    "latent_upscaler": (tp.latent_upscaler_pipeline, "Karras-preconditioned"),
    "gligen_text_image": (tp.gligen_text_image_pipeline, "calls the UNet twice per step"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_contract_refuses(name):
    build, match = REFUSED[name]
    pipe = build()
    with pytest.raises(ValueError, match=match):
        contract_for(pipe, _model(pipe))
    with pytest.raises(ValueError, match=match):  # a declared layout cannot make these correct
        contract_for(pipe, _model(pipe), layout=SAGLayout())


def test_linear_attention_is_refused():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    pipe = tiny_sd_pipeline()
    pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(SanaLinearAttnProcessor2_0())
    with pytest.raises(ValueError, match="linear attention.*SanaLinearAttnProcessor2_0"):
        contract_for(pipe, pipe.unet)


# ========================================================================== part 2: through enable_sag
@contextlib.contextmanager
def spy_forward(model):
    """Records every forward of `model` (its class forward, patched for this instance only): x and the other
    arguments by name. Installed before enable_sag so that SAG's hook calls through it."""
    cls = type(model)
    original = cls.forward
    signature = inspect.signature(original)
    x_name = list(signature.parameters)[1]
    calls = []

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        if self is model:
            named = _flat(signature, (self, *args), kwargs, drop_self=True)
            x = named.pop(x_name)
            calls.append((x.clone(), named))
        return original(self, *args, **kwargs)

    cls.forward = spy
    try:
        yield calls
    finally:
        cls.forward = original


def enable(pipe, **kw):
    import sag_fast

    return sag_fast.enable_sag(pipe, **kw)


def disable(pipe):
    import sag_fast

    sag_fast.disable_sag(pipe)


def _pairs(calls, steps):
    """(plain forward, extra forward) per denoising step (img2img-like calls run fewer than `steps`)."""
    assert calls and len(calls) % 2 == 0 and len(calls) <= 2 * steps, \
        f"expected a plain and an extra forward per step, got {len(calls)} forwards for {steps} steps"
    return [(calls[2 * i], calls[2 * i + 1]) for i in range(len(calls) // 2)]


def check_extra_forward(name, pipe, call, *, ways, uncond, latent, per_row=("encoder_hidden_states",), steps=2):
    """Runs the SAG pipeline: each guided step's extra forward gets exactly the unconditional rows of the
    step's model batch (per-row arguments cut, conditioning channels unchanged, latent channels degraded)."""
    model = _model(pipe)
    with spy_forward(model) as calls:
        enable(pipe, scale=1.0)
        try:
            _run(pipe, num_inference_steps=steps, **call)
        finally:
            disable(pipe)
    for (x, kw), (xd, kwd) in _pairs(calls, steps):
        b = x.shape[0] // ways
        assert x.shape[0] == ways * b and xd.shape[0] == b, f"{name}: extra forward batch {xd.shape[0]} != {b}"
        rows = slice(uncond * b, (uncond + 1) * b)
        assert xd.shape[1] == x.shape[1]
        assert torch.equal(xd[:, latent:], x[rows, latent:]), f"{name}: conditioning channels changed"
        assert not torch.equal(xd[:, :latent], x[rows, :latent]), f"{name}: the latent was not degraded"
        for path in per_row:
            full, cut = kw, kwd
            for key in path.split("."):
                full, cut = full[key], cut[key]
            assert torch.equal(cut, full[rows]), f"{name}: {path} of the extra forward is not the uncond rows"
        t, td = kw.get("timestep"), kwd.get("timestep")
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == x.shape[0]:
            assert torch.equal(td, t[rows])
    return calls


def check_batch_invariant(pipe, one, two, gens=(0, 1), atol=1e-4):
    """Image 1 of the 2-image call equals the 1-image call with that image's seed."""
    enable(pipe, scale=1.0)
    try:
        both = _run(pipe, generator=[gen(s) for s in gens], **two)
        alone = _run(pipe, generator=[gen(gens[1])], **one)
    finally:
        disable(pipe)
    assert both.shape[0] == 2 and alone.shape[0] == 1
    np.testing.assert_allclose(both[1], alone[0], atol=atol)


def _cat(a, b):
    return {k: (torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k]) for k in a}


# -- item 5: PAG (StableDiffusionPAGPipeline / SDXL: tests/test_diffusers_variants.py) ---------------------
def test_item5_pag_without_a_record_is_refused_at_enable():
    pipe = _pag_img2img()
    with pytest.raises(ValueError, match=r"PAG.*StableDiffusionPipeline.from_pipe"):
        enable(pipe)
    assert not hasattr(pipe, "_sag_fast_state") or pipe._sag_fast_state is None


# -- item 6: 9-channel inpainting -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd_inpaint9", "sdxl_inpaint9"])
def test_item6_inpaint_9_channels(name):
    pipe = _pipe(name)
    per_row = ("encoder_hidden_states",) + (("added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids")
                                            if "sdxl" in name else ())
    check_extra_forward(name, pipe, dict(CASES[name][1]), ways=2, uncond=0, latent=4, per_row=per_row)
    text = sdxl_text if "sdxl" in name else sd_text
    base = {k: v for k, v in CASES[name][1].items() if k not in text()}
    # diffusers' inpaint pipelines encode the one masked image with generator[0] for the whole batch: with two
    # generators of the same seed (the prompts differ) image 1 of the batch sees the generator states it sees alone
    check_batch_invariant(pipe, dict(base, **text(1, seed=50)), dict(base, **_cat(text(1, seed=60), text(1, seed=50))),
                          gens=(1, 1))


# -- item 7: packed latents ----------------------------------------------------------------------------
def test_item7_packed_latents_without_a_record_refused_at_enable():
    """Flux, Fill, Control and Kontext are supported (test_diffusers_transformers.py, test_diffusers_variants.py);
    a packed-latent pipeline the registry does not know how to unpack is refused at enable time."""
    with pytest.raises(ValueError, match="packed.*not supported yet"):
        enable(_flux_control_img2img(), layer="transformer_blocks.0.attn")


# -- item 10: CFG kept in a local variable ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["if_stage_1", "pixart", "pixart_sigma", "gligen", "x4_upscaler",
                                  "kandinsky22_controlnet"])
def test_item10_local_cfg_extra_forward_is_the_uncond_rows(name):
    pipe = _pipe(name)
    per_row = {"pixart": ("encoder_hidden_states", "encoder_attention_mask"),
               "pixart_sigma": ("encoder_hidden_states", "encoder_attention_mask"),
               "kandinsky22_controlnet": ("added_cond_kwargs.image_embeds", "added_cond_kwargs.hint"),
               "x4_upscaler": ("encoder_hidden_states", "class_labels")}.get(name, ("encoder_hidden_states",))
    check_extra_forward(name, pipe, dict(CASES[name][1]), ways=2, uncond=0, latent=CASES[name][2][2],
                        per_row=per_row)


@pytest.mark.parametrize("name", ["if_stage_1", "pixart"])
def test_item10_batch_invariance(name):
    pipe = _pipe(name)
    base = dict(CASES[name][1])
    one, other = t5_text(1, seed=70, mask=name == "pixart"), t5_text(1, seed=80, mask=name == "pixart")
    check_batch_invariant(pipe, {**base, **one}, {**base, **_cat(other, one)})


# -- item 11: more input channels than output ------------------------------------------------------------
@pytest.mark.parametrize("name,ways,uncond", [("pix2pix", 3, 2), ("sdxl_pix2pix", 3, 2), ("depth2img", 2, 0),
                                              ("x4_upscaler", 2, 0), ("if_stage_2", 2, 0)])
def test_item11_concatenated_conditioning_channels(name, ways, uncond):
    pipe = _pipe(name)
    per_row = {"if_stage_2": ("encoder_hidden_states", "class_labels"),
               "x4_upscaler": ("encoder_hidden_states", "class_labels")}.get(name, ("encoder_hidden_states",))
    calls = check_extra_forward(name, pipe, dict(CASES[name][1]), ways=ways, uncond=uncond, latent=CASES[name][2][2],
                                per_row=per_row)
    if "pix2pix" in name:  # the degraded way is the unconditional one: no image (zero image latents), not way 1
        xd = calls[1][0]
        assert (xd[:, 4:] == 0).all()


@pytest.mark.parametrize("name", ["pix2pix", "depth2img"])
def test_item11_batch_invariance(name):
    pipe = _pipe(name)
    base = {k: v for k, v in CASES[name][1].items() if k not in sd_text()}
    check_batch_invariant(pipe, dict(base, **sd_text(1, seed=50)), dict(base, **_cat(sd_text(1, seed=60),
                                                                                        sd_text(1, seed=50))))


# -- item 12: video (AnimateDiff and Wan have records: tests/test_diffusers_video.py) ------------------------
def _animatediff_v2v():
    from diffusers import AnimateDiffVideoToVideoPipeline

    return tp.animatediff_pipeline(AnimateDiffVideoToVideoPipeline)


def test_item12_video_pipeline_without_a_record_refused_at_enable():
    pipe = _animatediff_v2v()
    with pytest.raises(ValueError, match="video layout is not in the registry yet"):
        enable(pipe)


# -- item 13: GLIGEN ------------------------------------------------------------------------------------
def test_item13_gligen_nested_arguments_follow_the_rows():
    pipe = _pipe("gligen")
    calls = check_extra_forward("gligen", pipe, dict(CASES["gligen"][1]), ways=2, uncond=0, latent=4)
    (x, kw), (xd, kwd) = calls[0], calls[1]
    full, cut = kw["cross_attention_kwargs"]["gligen"], kwd["cross_attention_kwargs"]["gligen"]
    for key in ("boxes", "positive_embeddings", "masks"):
        assert torch.equal(cut[key], full[key][:1])
    assert (cut["masks"] == 0).all() and (full["masks"][1:] == 1).any()
    base = {k: v for k, v in CASES["gligen"][1].items() if k not in sd_text()}
    check_batch_invariant(pipe, dict(base, **sd_text(1, seed=50)), dict(base, **_cat(sd_text(1, seed=60),
                                                                                        sd_text(1, seed=50))))


# -- item 14: ControlNet ---------------------------------------------------------------------------------
@contextlib.contextmanager
def spy_controlnet(controlnet):
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args[0].clone() if args else kwargs["sample"].clone(), output))

    handle = controlnet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["controlnet", "controlnet_sdxl", "controlnet_multi"])
def test_item14_controlnet_residuals_recomputed_at_the_degraded_input(name):
    pipe = _pipe(name)
    with spy_controlnet(pipe.controlnet) as cn:
        calls = check_extra_forward(name, pipe, dict(CASES[name][1]), ways=2, uncond=0, latent=4)
    assert len(cn) == 4  # per step: the pipeline's ControlNet call, then the replay at the degraded input
    for step in range(2):
        (x, kw), (xd, kwd) = calls[2 * step], calls[2 * step + 1]
        (cn_x, cn_out), (replay_x, replay_out) = cn[2 * step], cn[2 * step + 1]
        assert torch.equal(replay_x, xd[:, :4]) and cn_x.shape[0] == 2 and replay_x.shape[0] == 1
        assert kwd["mid_block_additional_residual"] is replay_out[1]
        assert all(a is b for a, b in zip(kwd["down_block_additional_residuals"], replay_out[0], strict=True))
        assert not torch.equal(kwd["mid_block_additional_residual"], kw["mid_block_additional_residual"][:1])


def test_item14_controlnet_recorder_only_lives_during_a_call():
    """The ControlNet recorder is a hook only between begin_call and end_call: nothing on the ControlNet between
    calls (copies and pickles of the pipeline see nothing), nothing after remove()."""
    import copy
    import pickle

    pipe = _pipe("controlnet")
    hooks = dict(pipe.controlnet._forward_hooks)
    contract = contract_for(pipe, pipe.unet)
    assert dict(pipe.controlnet._forward_hooks) == hooks
    contract.begin_call(pipe)
    assert len(pipe.controlnet._forward_hooks) == len(hooks) + 1
    contract.end_call()
    assert dict(pipe.controlnet._forward_hooks) == hooks
    copy.deepcopy(contract)  # holds no tensors or hooks between calls
    pickle.dumps(pipe.controlnet)
    contract.begin_call(pipe)
    contract.remove()
    assert dict(pipe.controlnet._forward_hooks) == hooks


def test_item14_controlnet_guess_mode_uncond_residuals_are_zeros():
    pipe = _pipe("controlnet")
    with spy_controlnet(pipe.controlnet) as cn:
        calls = check_extra_forward("controlnet", pipe, dict(CASES["controlnet"][1], guess_mode=True), ways=2,
                                    uncond=0, latent=4)
    assert len(cn) == 2  # guess mode: the ControlNet runs on the cond rows only, no replay
    kwd = calls[1][1]
    assert not kwd["mid_block_additional_residual"].any()
    assert all(not d.any() for d in kwd["down_block_additional_residuals"])


def test_item14_controlnet_batch_invariance():
    pipe = _pipe("controlnet")
    base = {k: v for k, v in CASES["controlnet"][1].items() if k not in sd_text()}
    check_batch_invariant(pipe, dict(base, **sd_text(1, seed=50)), dict(base, **_cat(sd_text(1, seed=60),
                                                                                        sd_text(1, seed=50))))


# -- the rows of the paper's and DiT's settings, through enable_sag -------------------------------------------
@pytest.mark.parametrize("name,ways,uncond,per_row", [("dit", 2, 1, ("class_labels",)), ("ddpm", 1, 0, ()),
                                                      ("sd", 2, 0, ("encoder_hidden_states",))])
def test_extra_forward_rows_for_dit_ddpm_sd(name, ways, uncond, per_row):
    check_extra_forward(name, _pipe(name), dict(CASES[name][1]), ways=ways, uncond=uncond,
                        latent=CASES[name][2][2], per_row=per_row)


def test_enable_sag_forwards_the_declared_layout():
    pipe = tiny_sd_pipeline(CustomPipeline)
    with pytest.raises(ValueError, match=r"CustomPipeline.*SAGLayout"):
        enable(pipe)
    layout = SAGLayout(cfg=lambda call: call["my_scale"] > 1, ways=2, uncond_index=0, latent_channels=4)
    with spy_forward(pipe.unet) as calls:
        enable(pipe, layout=layout)
        try:
            _run(pipe, prompt=None, **sd_text())
        finally:
            disable(pipe)
    for (x, kw), (xd, kwd) in _pairs(calls, 2):
        assert xd.shape[0] == 1 and torch.equal(kwd["encoder_hidden_states"], kw["encoder_hidden_states"][:1])


def test_sag_layout_is_public():
    import sag_fast

    assert sag_fast.SAGLayout is SAGLayout
