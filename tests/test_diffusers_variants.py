"""SAG on the image-family variants of issue 15: Flux Fill / Control (packed conditioning channels after the
latent's), Flux Kontext (context-image tokens after the latent tokens), PAG + SAG (a third way, PAG's processors
swapped out for the extra forward) and the real DeepFloyd IF / Kandinsky 2.2 UNets (added-KV attention: image
queries, keys [text, image]). Each through its registry record, checked as the other families are: scale 0 and
disable_sag bit-exact, SAG's effect, batch invariance, the window, what the extra forward receives, one guided
call against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from diffusers_checks import gen, hook_state
from sag_fast import reference
from sag_fast.diffusers import disable_sag, enable_sag
from sag_fast.diffusers.session import pack_latents, unpack_latents
from sag_fast.diffusers.tiny import tiny_flux_pipeline
from test_diffusers_transformers import flow_coefficients, joint_mask_reference, plain_replay, recorded_calls, \
    recorded_sdpa


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


IMG = torch.rand(1, 3, 64, 64, generator=gen(7))
CONTEXT = torch.rand(1, 3, 64, 32, generator=gen(8))   # Kontext's context image: 4x2 = 8 tokens after the 16


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t[t.shape[0] - batch:]   # batch 1 is row 1 of batch 2: the batch-invariance pair


def _flux_call(batch, negative=False):
    g = torch.Generator().manual_seed(100)
    kw = dict(prompt_embeds=_rows(torch.randn(2, 5, 32, generator=g), batch),
              pooled_prompt_embeds=_rows(torch.randn(2, 32, generator=g), batch), height=64, width=64)
    if negative:
        kw.update(negative_prompt_embeds=_rows(torch.randn(2, 5, 32, generator=g), batch),
                  negative_pooled_prompt_embeds=_rows(torch.randn(2, 32, generator=g), batch), true_cfg_scale=4.0)
    return kw


def _flux(cls_name, channels):
    import diffusers

    return lambda: tiny_flux_pipeline(getattr(diffusers, cls_name), in_channels=channels)


_KONTEXT = dict(image=CONTEXT, max_area=64 * 64, _auto_resize=False)
_MASK = (torch.rand(1, 1, 64, 64, generator=gen(9)) > 0.5).float()
# Fill draws its noise after encoding the image with generator[0], so a 2-image call's image 1 would not start
# from the 1-image call's noise: give the noise (packed, 16 tokens x 64)
_FILL_NOISE = torch.randn(2, 16, 64, generator=gen(10))


def _if_call(batch):
    return dict(prompt_embeds=_rows(tp.embeds(2, 1), batch), negative_prompt_embeds=_rows(tp.embeds(2, 2), batch),
                height=8, width=8)


def _kandinsky_call(batch):
    g = torch.Generator().manual_seed(40)
    return dict(image_embeds=_rows(torch.randn(2, tp.IMAGE_EMBED, generator=g), batch),
                negative_image_embeds=_rows(torch.randn(2, tp.IMAGE_EMBED, generator=g), batch), height=16, width=16)


def _pag_call(batch, pag_scale=2.0, guidance_scale=5.0):
    return dict(prompt=["a cat", "a dog"][2 - batch:], pag_scale=pag_scale, guidance_scale=guidance_scale)


# name -> (build, call(batch) without generator/steps, ways of a guided call, calls per step, the degraded part of
# x (the rest passes through), the per-row model arguments checked)
_PACKED_LATENT = lambda x: x[..., :64]   # noqa: E731 - the 16 latent channels x 4, before the conditioning's
_TEXT = ("encoder_hidden_states",)
FAMILIES = {
    "flux_fill": (_flux("FluxFillPipeline", 384), lambda b: dict(_flux_call(b), image=IMG, mask_image=_MASK,
                                                                  latents=_rows(_FILL_NOISE, b)),
                  1, 1, _PACKED_LATENT, _TEXT + ("pooled_projections",)),
    "flux_control": (_flux("FluxControlPipeline", 128), lambda b: dict(_flux_call(b), control_image=IMG),
                     1, 1, _PACKED_LATENT, _TEXT + ("pooled_projections",)),
    "flux_kontext": (_flux("FluxKontextPipeline", 64), lambda b: dict(_flux_call(b), **_KONTEXT),
                     1, 1, lambda x: x[:, :16], _TEXT + ("pooled_projections",)),
    "flux_kontext_cfg": (_flux("FluxKontextPipeline", 64), lambda b: dict(_flux_call(b, True), **_KONTEXT),
                         1, 2, lambda x: x[:, :16], _TEXT + ("pooled_projections",)),
    "pag_sd": (tp.pag_pipeline, _pag_call, 3, 1, lambda x: x, _TEXT),
    "pag_sd_no_cfg": (tp.pag_pipeline, lambda b: _pag_call(b, guidance_scale=1.0), 2, 1, lambda x: x, _TEXT),
    "pag_sdxl": (lambda: tp.pag_pipeline(sdxl=True), _pag_call, 3, 1, lambda x: x,
                 _TEXT + ("added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids")),
    "if_added_kv": (lambda: tp.if_pipeline(added_kv=True), _if_call, 2, 1, lambda x: x, _TEXT),
    "if_sr_added_kv": (lambda: tp.if_superresolution_pipeline(added_kv=True),
                       lambda b: dict(_if_call(b), image=_rows(torch.rand(2, 3, 4, 4, generator=gen(11)), b)), 2, 1,
                       lambda x: x[:, :3], _TEXT + ("class_labels",)),
    "kandinsky22_added_kv": (lambda: tp.kandinsky22_pipeline(added_kv=True), _kandinsky_call, 2, 1,
                             lambda x: x[:, :4], ("added_cond_kwargs.image_embeds",)),
}


def _run(pipe, name, batch=1, gens=None, steps=2, **kw):
    call = {**FAMILIES[name][1](batch), "num_inference_steps": steps,
            "output_type": "latent" if "pag" in name or "flux" in name else "pt", **kw}
    out = pipe(generator=[gen(s) for s in (gens or [1] * batch)], **call)
    return torch.as_tensor(np.asarray(out.images)) if not isinstance(out.images, torch.Tensor) else out.images


def _model(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_scale_zero_disable_effect_and_batch_invariance(name):
    pipe = FAMILIES[name][0]()
    state = hook_state(_model(pipe))
    plain = _run(pipe, name)
    enable_sag(pipe, 0.0)
    assert torch.equal(_run(pipe, name), plain)
    enable_sag(pipe, 1.0)
    guided = _run(pipe, name)
    assert (guided - plain).abs().max() > 1e-3
    # image 1 of a 2-image call equals that image alone (the same generator seed: diffusers' Fill / Kontext
    # encode the one conditioning image with generator[0] for the whole batch)
    both = _run(pipe, name, batch=2)
    torch.testing.assert_close(both[1:], guided, rtol=0, atol=1e-4)
    assert (both[0] - both[1]).abs().max() > 1e-3   # the rows differ: the check can fail
    disable_sag(pipe)
    assert hook_state(_model(pipe)) == state
    assert torch.equal(_run(pipe, name), plain)


@pytest.mark.parametrize("name", ["flux_fill", "flux_kontext_cfg", "pag_sd", "if_sr_added_kv"])
def test_window_and_extra_forward_rows(name):
    """start=0.5 of 4 steps: the extra forward only in steps 2 and 3; each gets exactly the unconditional rows
    of the step's last model call: the latent part degraded, the conditioning channels / context tokens as
    they were, the per-row arguments cut, the timestep's rows."""
    from test_diffusers_contract import spy_forward

    build, _, ways, per_step, latent, per_row = FAMILIES[name]
    pipe = build()
    with spy_forward(_model(pipe)) as calls:
        enable_sag(pipe, 1.0, start=0.5)
        _run(pipe, name, steps=4)
    ts = [float(kw["timestep"].reshape(-1)[0]) for _, kw in calls]
    counts = [ts.count(t) for t in dict.fromkeys(ts)]
    assert counts == [per_step, per_step, per_step + 1, per_step + 1]
    for step in (2, 3):
        end = sum(counts[:step + 1])
        (x, kw), (xd, kwd) = calls[end - 2], calls[end - 1]
        b = x.shape[0] // ways
        rows = slice(0, b)   # the unconditional way is the first in every layout here
        assert xd.shape[0] == b and xd.shape[1:] == x.shape[1:]
        assert not torch.equal(latent(xd), latent(x[rows]))
        rest = torch.ones_like(xd, dtype=torch.bool)
        latent(rest).fill_(False)   # the passed-through part of x: everything but the latent's
        assert torch.equal(xd[rest], x[rows][rest])
        for path in per_row:
            full, cut = kw, kwd
            for key in path.split("."):
                full, cut = full[key], cut[key]
            assert torch.equal(cut, full[rows]), path
        t = kw["timestep"]
        assert torch.equal(kwd["timestep"], t[rows] if t.dim() and t.shape[0] == x.shape[0] else t)


def test_pag_scale_zero_is_plain_sag_and_processors_are_restored():
    """PAG at scale 0 stacks no third way: SAG on the PAG pipeline equals SAG on the same components' plain
    pipeline, bit for bit. With PAG on, its processors are back on the layers after each extra forward, and
    the pipeline's own restore leaves the UNet's processors as before the call."""
    from diffusers import StableDiffusionPipeline

    pipe = tp.pag_pipeline()
    enable_sag(pipe, 1.0)
    with_pag = _run(pipe, "pag_sd", pag_scale=0.0)
    before = dict(pipe.unet.attn_processors)
    seen = []
    layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(type(layer.processor).__name__))
    _run(pipe, "pag_sd")
    assert seen == ["PAGCFGIdentitySelfAttnProcessor2_0", "AttnProcessor2_0"] * 2  # the PAG way, then the extra
    assert dict(pipe.unet.attn_processors) == before
    disable_sag(pipe)
    plain = StableDiffusionPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    enable_sag(plain, 1.0)
    ref = plain(prompt=["a dog"], guidance_scale=5.0, num_inference_steps=2, output_type="latent",
                generator=[gen(1)]).images
    assert torch.equal(ref, with_pag)


# ------------------------------------------------------------------------------ one call vs float64 reference
def _flux_reference(name):
    """The second step's guided call (at the first, sigma = 1: SAG's x0 estimate is 0) recomputed: unpack the
    latent tokens / channels, the joint mask ([text, image(, context)]) from the recorded q/k of
    transformer_blocks.1, reference.degrade of the latent channels only, the degraded forward with the
    conditioning channels / context tokens as they were, reference.guidance_shift on the latent tokens."""
    pipe = FAMILIES[name][0]()
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    _run(pipe, name)
    kwargs, x, guided, out, qk = plain_replay(pipe, seen, 1)
    q, k, scale = qk[1]
    n_txt = kwargs["encoder_hidden_states"].shape[1]
    mask = joint_mask_reference(q, k, scale, (n_txt, 16), (4, 4))
    assert mask.any() and not mask.all()
    x4, tail = unpack_latents(x[:, :16], 8, 8), x[:, 16:]
    out4 = unpack_latents(out[:, :16], 8, 8)
    c1, c2 = flow_coefficients(float(pipe.scheduler.sigmas[1]))
    x_deg = torch.cat([reference.degrade(x4[:, :16].double(), out4.double(), mask, c1, c2).float(), x4[:, 16:]], 1)
    with torch.no_grad():
        degraded = model(hidden_states=torch.cat([pack_latents(x_deg), tail], 1), return_dict=False, **kwargs)[0]
    shifted = reference.guidance_shift(out4.double(), unpack_latents(degraded[:, :16], 8, 8).double(), 0.9)
    want = torch.cat([pack_latents(shifted.float()), out[:, 16:]], 1)   # context tokens' outputs untouched
    torch.testing.assert_close(guided, want, rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", ["flux_fill", "flux_kontext"])
def test_flux_variant_guided_call_equals_the_float64_reference(name):
    _flux_reference(name)


def test_kontext_true_cfg_shifts_both_calls_and_leaves_the_context_tokens():
    pipe = FAMILIES["flux_kontext_cfg"][0]()
    enable_sag(pipe, 0.8)
    model = pipe.transformer
    seen = []
    model.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0])), with_kwargs=True)
    _run(pipe, "flux_kontext_cfg")
    (k_c, c_shifted), (k_u, u_shifted) = seen[2], seen[3]   # the second step's conditional, unconditional calls
    disable_sag(pipe)
    with torch.no_grad():
        c = model(**{**k_c, "return_dict": False})[0]
        u = model(**{**k_u, "return_dict": False})[0]
    assert c.shape[1] == 24 and (u_shifted - u)[:, :16].abs().max() > 1e-3
    torch.testing.assert_close(c_shifted - c, u_shifted - u, rtol=0, atol=1e-5)
    assert torch.equal(c_shifted[:, 16:], c[:, 16:]) and torch.equal(u_shifted[:, 16:], u[:, 16:])


def _cut(v, rows, total):
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == total:
        return v[rows]
    if isinstance(v, dict):
        return {k: _cut(w, rows, total) for k, w in v.items()}
    return v


@pytest.mark.parametrize("name", ["if_added_kv", "kandinsky22_added_kv"])
def test_added_kv_guided_call_equals_the_float64_reference(name):
    """The real IF / Kandinsky 2.2 block types: the mask from the mid block's added-KV attention, the image
    queries' softmax over [text keys, image keys], the mass of the image keys (reference.joint_attention_mass
    with image-only queries, float64), reference.degrade with the DDPM (c1, c2), the degraded forward on the
    unconditional rows, reference.guidance_shift of the first C of the 2C (learned variance) channels."""
    pipe = FAMILIES[name][0]()
    enable_sag(pipe, 0.9)
    model = pipe.unet
    assert vars(pipe)["_sag_fast_state"].capture.layer_name == "mid_block.attentions.0"
    from diffusers_checks import record_call

    with record_call(model, 1) as rec:
        _run(pipe, name)
    kwargs = {k: v for k, v in rec["kwargs"].items() if k != "return_dict"}
    named = dict(zip(("sample", "timestep"), rec["args"]))
    x, t, guided = named.get("sample", kwargs.pop("sample", None)), named.get("timestep", kwargs.pop("timestep", None)), \
        rec["output"]
    disable_sag(pipe)
    with torch.no_grad(), recorded_sdpa() as qk:
        out = model(x, t, return_dict=False, **kwargs)[0]
    q, k, scale = qk[1]   # down block 1's attention, then the mid block's
    b, n = x.shape[0] // 2, q.shape[2]
    assert k.shape[2] > n   # keys [text, image]
    mass = reference.joint_attention_mass_from_qk(q[:b].double(), k[:b].double(), (k.shape[2] - n, n), scale)
    mask = reference.joint_mass_to_mask(mass, (4, 4))
    assert mask.any() and not mask.all()
    acp = pipe.scheduler.alphas_cumprod[int(t.reshape(-1)[0])].double()
    c1, c2 = reference.signal_coefficients(acp.sqrt(), (1 - acp).sqrt(), "epsilon")
    c = out.shape[1] // 2
    x_deg = torch.cat([reference.degrade(x[:b, :c].double(), out[:b, :c].double(), mask, c1, c2).float(),
                       x[:b, c:]], 1)
    with torch.no_grad():
        degraded = model(x_deg, _cut(t, slice(0, b), 2 * b), return_dict=False,
                         **{kk: _cut(v, slice(0, b), 2 * b) for kk, v in kwargs.items()})[0]
    want = reference.guidance_shift(out.double(), degraded.double(), 0.9, c).float()
    torch.testing.assert_close(guided, want, rtol=0, atol=2e-4)


class _PAGThenPlain(torch.nn.Module):
    """The UNet with PAG's processors for the 3-way call and the original ones for the extra forward (the
    reference helpers call forward(x, t, **kw))."""

    def __init__(self, unet, pag, plain):
        super().__init__()
        self.inner, self.pag, self.plain = unet, pag, plain

    def forward(self, x, t, return_dict=False, **kwargs):
        self.inner.set_attn_processor(dict(self.pag if x.shape[0] == 3 else self.plain))
        return self.inner(x, t, return_dict=False, **kwargs)


def test_pag_guided_call_equals_the_float64_reference():
    """CFG + PAG ([uncond, cond, cond perturbed]): the mask from the unconditional rows' attention at the mid
    block (PAG's processor attends normally for [uncond, cond]), the degraded forward with the processors PAG
    replaced, and the same shift on all three ways: u + w(c - u) + p(c - ptb) gets s(u - d) once."""
    from diffusers_checks import expected_guided_step, record_call

    pipe = tp.pag_pipeline()
    enable_sag(pipe, 0.9)
    model = pipe.unet
    plain_procs = dict(model.attn_processors)
    with record_call(model, 1) as rec:
        _run(pipe, "pag_sd")
    disable_sag(pipe)
    pipe._set_pag_attn_processor(pag_applied_layers=pipe.pag_applied_layers, do_classifier_free_guidance=True)
    pag_procs = dict(model.attn_processors)
    x, t = rec["args"][0], rec["args"][1]
    kwargs = {k: v for k, v in rec["kwargs"].items() if k != "return_dict"}
    acp = pipe.scheduler.alphas_cumprod[int(t)].double()
    with torch.no_grad():
        expected, out, mask = expected_guided_step(
            _PAGThenPlain(model, pag_procs, plain_procs), x, t, kwargs,
            attn_path="inner.mid_block.attentions.0.transformer_blocks.0.attn1",
            grid_path="inner.mid_block.attentions.0", alpha=acp.sqrt(), sigma=(1 - acp).sqrt(),
            prediction_type="epsilon", scale=0.9, ways=3)
    model.set_attn_processor(plain_procs)
    assert 0 < int(mask.sum()) < mask.numel() and not torch.equal(out[2], out[1])   # PAG's way differs
    torch.testing.assert_close(rec["output"], expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------- the added-KV capture
@pytest.mark.parametrize("processor", ["AttnAddedKVProcessor2_0", "AttnAddedKVProcessor"])
def test_added_kv_capture_equals_the_reference_on_both_processors(processor):
    """One added-KV Attention (as in UNetMidBlock2DSimpleCrossAttn) on a 4x4 grid with 5 text tokens: the mask the
    capture reads from SDPA (image queries padded into the joint kernel) or from the eager processor's
    softmax (probabilities) equals the float64 reference of the recorded q / k (keys [text, image])."""
    import diffusers.models.attention_processor as ap

    from sag_fast.capture import AttentionCapture

    model = torch.nn.Module()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model.attn = ap.Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=12, norm_num_groups=4,
                                  cross_attention_dim=16, bias=True, upcast_softmax=True,
                                  processor=getattr(ap, processor)())
        model.attn.to_q.weight.data *= 6   # peaked attention: a mask with both values
    hs, text = torch.randn(3, 16, 4, 4, generator=gen(4)), torch.randn(3, 5, 12, generator=gen(5))
    with torch.no_grad(), recorded_sdpa() as qk:
        model.attn.set_processor(ap.AttnAddedKVProcessor2_0())
        model.attn(hs, encoder_hidden_states=text)
        model.attn.set_processor(getattr(ap, processor)())
    q, k, _ = qk[0]
    assert q.shape[2] == 16 and k.shape[2] == 21
    rows = slice(1, 3)
    mass = reference.joint_attention_mass_from_qk(q[rows].double(), k[rows].double(), (5, 16))
    want = reference.joint_mass_to_mask(mass, (4, 4), 1.0)
    assert want.any() and not want.all()
    capture = AttentionCapture(model, "attn")
    assert capture.joint == "text_first"
    with torch.no_grad(), capture.capturing(rows):
        model.attn(hs, encoder_hidden_states=text)
    assert torch.equal(capture.mask, want)
    capture.remove()
    model.attn.set_processor(ap.JointAttnProcessor2_0() if hasattr(ap, "JointAttnProcessor2_0") else None)
    with pytest.raises(ValueError, match="does not fix where the image tokens are"):
        AttentionCapture(model, "attn")


def test_cli_runs_a_pag_folder(tmp_path):
    """`python -m sag_fast sample --model <folder>` on a saved PAG pipeline (its default pag_scale 3: three ways)."""
    import json

    from PIL import Image

    from sag_fast.__main__ import main

    tp.pag_pipeline().save_pretrained(tmp_path / "pag")
    out = tmp_path / "run"
    assert main(["sample", "--no-progress", "--output-dir", str(out), "--model", str(tmp_path / "pag"), "--steps", "2",
                 "--height", "64", "--width", "64"]) == 0
    assert 0 < json.loads((out / "run.json").read_text())["mask_fraction"] < 1
    plain, guided = (np.asarray(Image.open(out / f"sample0_{k}.png"), dtype=np.int16) for k in ("nosag", "sag"))
    assert plain.shape == (64, 64, 3) and np.abs(plain - guided).max() > 0


def test_pag_processors_left_by_a_call_that_raised_are_refused():
    """diffusers' PAG pipelines put the UNet's processors back only when the call returns: after a call that raised,
    PAG's stay, and SAG's extra forward would split its rows into PAG's ways. Refused at the next call, before the
    UNet runs and leaving no call state behind; with the processors put back, SAG runs."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sag_fast import engine

    pipe = tp.pag_pipeline()
    enable_sag(pipe, 1.0)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt  # a call stopped mid-run
    with pytest.raises(KeyboardInterrupt):
        _run(pipe, "pag_sd", callback_on_step_end=boom)
    assert any(type(p).__name__.startswith("PAG") for p in pipe.unet.attn_processors.values())
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(RuntimeError, match="still has PAG's attention processors"):
        _run(pipe, "pag_sd")
    handle.remove()
    assert calls == [] and engine.active_call() is None
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert torch.isfinite(_run(pipe, "pag_sd")).all()
