"""SAG on Chroma, Lumina 2, CogView4, AuraFlow, HunyuanDiT, Kandinsky 3 and LCM (issue 15): one registry record
each. One test function per check, parametrized over the families: scale 0 and disable_sag bit-exact, SAG changes
the output, batch invariance and the start/stop window, and one guided call against the float64 reference with
the extra forward's inputs read off the model (exactly the unconditional rows and their conditioning).

The reference is recomputed from what the SAG layer really attends with (its SDPA q, k, scale and attention mask,
recorded in the guided call) with materialised float64 probabilities: the image queries' mass on the image keys
(joint attention: the image tokens are the last n before any trailing padding of the row), reference.degrade with
the scheduler's coefficients at the step, and reference.guidance_shift."""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tiny_pipelines as tp
from diffusers_checks import gen, hook_state
from sag_fast import reference
from sag_fast.diffusers import disable_sag, enable_sag, sag_config
from sag_fast.diffusers.session import pack_latents, unpack_latents

pytestmark = pytest.mark.usefixtures("one_thread")


def _embeds(n: int, seed: int) -> torch.Tensor:
    return torch.cat([torch.randn(1, tp.EMBED_LEN, tp.TEXT_HIDDEN, generator=gen(seed + 7 * i)) for i in range(n)])


def _mask(n: int, kept=(8, 5)) -> torch.Tensor:
    """(n, EMBED_LEN) bool token masks, row i keeping its first kept[i % 2] tokens (padded text)."""
    return torch.stack([torch.arange(tp.EMBED_LEN) < kept[i % 2] for i in range(n)])


def _text(n: int, masks: tuple[str, ...] = (), neg_kept=(6, 3), dtype=torch.bool) -> dict:
    out = dict(prompt_embeds=_embeds(n, 1), negative_prompt_embeds=_embeds(n, 2))
    for name in masks:  # the negative (unconditional) rows get their own padding
        out[name] = _mask(n, neg_kept if name.startswith("negative") else (8, 5)).to(dtype)
    return out


@dataclass
class Case:
    build: Callable
    call: Callable[[int], dict]   # batch of n rows, each row's inputs its own
    flow: bool = True             # flow matching (sigma table) or VP (alphas_cumprod at t)
    sign: float = 1.0             # the scheduler gets sign * the model output


_SIZE = dict(height=64, width=64)
CASES = {
    # Chroma's own text encoding gives a float 0/1 token mask, whose outer product SDPA adds to the scores
    "chroma": Case(tp.chroma_pipeline, lambda n: dict(**_text(n, ("prompt_attention_mask",
                                                                   "negative_prompt_attention_mask"),
                                                               dtype=torch.float32), guidance_scale=4.0, **_SIZE)),
    "lumina2": Case(tp.lumina2_pipeline, lambda n: dict(**_text(n, ("prompt_attention_mask",
                                                                     "negative_prompt_attention_mask")),
                                                         guidance_scale=4.0, cfg_normalization=False, **_SIZE),
                    sign=-1.0),
    "cogview4": Case(tp.cogview4_pipeline, lambda n: dict(**_text(n), guidance_scale=4.0, **_SIZE)),
    "auraflow": Case(tp.auraflow_pipeline, lambda n: dict(**_text(n, ("prompt_attention_mask",
                                                                       "negative_prompt_attention_mask")),
                                                           guidance_scale=4.0, **_SIZE)),
    "hunyuandit": Case(tp.hunyuandit_pipeline, lambda n: dict(
        **_text(n, ("prompt_attention_mask", "negative_prompt_attention_mask")), prompt_embeds_2=_embeds(n, 3),
        negative_prompt_embeds_2=_embeds(n, 4), prompt_attention_mask_2=_mask(n),
        negative_prompt_attention_mask_2=_mask(n, (4, 7)), guidance_scale=4.0, use_resolution_binning=False,
        **_SIZE), flow=False),
    "kandinsky3": Case(tp.kandinsky3_pipeline, lambda n: dict(
        **_text(n, ("attention_mask", "negative_attention_mask")), guidance_scale=4.0, **_SIZE), flow=False),
    "lcm": Case(tp.lcm_pipeline, lambda n: dict(prompt_embeds=_embeds(n, 1), guidance_scale=6.0, **_SIZE),
                flow=False),
}
FAMILIES = list(CASES)


def _image(n: int) -> dict:
    """img2img inputs: n different images in [0, 1], most of the schedule (2 steps at strength 0.9: 1 step)."""
    return dict(image=torch.rand(n, 3, 64, 64, generator=gen(11)), strength=0.9)


def _img2img(build, name):
    import diffusers

    return lambda: build(getattr(diffusers, name))


# the img2img pipelines of the UNet families: the text-to-image batch layout from part-way into the schedule; only
# the reference test runs them (the other checks are the text-to-image pipeline's, through the same record)
IMG2IMG = {
    "kandinsky3_img2img": Case(_img2img(tp.kandinsky3_pipeline, "Kandinsky3Img2ImgPipeline"),
                               lambda n: dict(CASES["kandinsky3"].call(n), **_image(n)), flow=False),
    "lcm_img2img": Case(_img2img(tp.lcm_pipeline, "LatentConsistencyModelImg2ImgPipeline"),
                        lambda n: dict(CASES["lcm"].call(n), **_image(n)), flow=False),
}
PIPELINES = ("ChromaPipeline", "ChromaImg2ImgPipeline", "Lumina2Pipeline", "CogView4Pipeline", "AuraFlowPipeline",
             "HunyuanDiTPipeline", "Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline", "LatentConsistencyModelPipeline",
             "LatentConsistencyModelImg2ImgPipeline")  # the records tested here
# replayed on a fake CUDA device by tests/test_diffusers_session.py. Not Lumina 2 (its rotary embedding reads the
# text lengths to the host, .tolist()) nor CogView4 (its rotary embedding indexes beyond tests/fake_cuda.py's shim):
# both fail inside the model's own forward, before anything of SAG's runs. Not Kandinsky 3 and LCM: UNets whose SAG
# path the SD cases already replay (Kandinsky 3's many small convs take ~13 s under fake tensors).
FAKE_CUDA = ("chroma", "auraflow", "hunyuandit")


def _row(call: dict, i: int) -> dict:
    return {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in call.items()}


def _latents(pipe, call: dict, steps: int = 2, seed=0) -> torch.Tensor:
    generator = [gen(s) for s in seed] if isinstance(seed, list) else gen(seed)
    return pipe(generator=generator, num_inference_steps=steps, output_type="latent", **call).images


def _model(pipe) -> torch.nn.Module:
    return getattr(pipe, "unet", None) or pipe.transformer


# ------------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize("name", FAMILIES)
def test_scale_zero_disable_and_effect(name):
    case = CASES[name]
    pipe = case.build()
    state = hook_state(_model(pipe))
    call = case.call(1)
    plain = _latents(pipe, call)
    enable_sag(pipe, 0.0)
    assert torch.equal(_latents(pipe, call), plain)
    enable_sag(pipe, 1.0)
    guided = _latents(pipe, call)
    assert (guided - plain).abs().max() > 1e-4 * plain.abs().max()
    disable_sag(pipe)
    assert sag_config(pipe) is None and hook_state(_model(pipe)) == state
    assert torch.equal(_latents(pipe, call), plain)


@contextlib.contextmanager
def _recorded_forwards(model: torch.nn.Module):
    """Every run of model's forward (the guided calls and SAG's extra forwards, which bypass __call__): its
    arguments by name, its output, and the (q, k, scale, attn_mask) of each SDPA call inside the layers passed
    to `watch(layer)`. Enter it before enable_sag (SAG's hook keeps the forward it finds)."""
    cls = type(model)
    signature = inspect.signature(cls.forward)
    seen = []

    class Recording(cls):
        def forward(self, *args, **kwargs):
            arguments = dict(signature.bind(self, *args, **kwargs).arguments)
            arguments.pop("self")
            arguments.update(arguments.pop("kwargs", None) or {})
            entry = dict(arguments=arguments, sdpa=[])
            seen.append(entry)
            out = super().forward(*args, **kwargs)
            entry["out"] = (out[0] if isinstance(out, tuple) else out.sample).detach().clone()
            return out

    Recording.forward.__signature__ = signature  # SAG binds the forward's arguments by name
    class SDPA(TorchFunctionMode):  # entered around the layer, outside SAG's own probe: sees what it passes on
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                got = {**dict(zip(("query", "key", "value", "attn_mask"), args)), **kwargs}
                seen[-1]["sdpa"].append((got["query"].detach().clone(), got["key"].detach().clone(),
                                         got.get("scale"), got.get("attn_mask")))
            return func(*args, **kwargs)

    hooks, modes = [], []

    def enter(module, args):
        modes.append(SDPA())
        modes[-1].__enter__()

    def watch(layer):
        hooks.extend([layer.register_forward_pre_hook(enter),
                      layer.register_forward_hook(lambda m, a, o: modes.pop().__exit__(None, None, None))])

    model.__class__ = Recording
    try:
        yield seen, watch
    finally:
        model.__class__ = cls
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_invariance_and_window(name):
    """Row 1 of a batch of two (different text, padding and noise per row) equals that row alone; with
    start=0.5 over 4 steps, only the last two steps get the extra forward."""
    case = CASES[name]
    pipe = case.build()
    call = case.call(1)
    with _recorded_forwards(_model(pipe)) as (seen, _):
        plain = _latents(pipe, call, steps=4)
        per_step = len(seen) // 4
        enable_sag(pipe, 1.0)
        both = _latents(pipe, case.call(2), seed=[0, 1])
        alone = _latents(pipe, _row(case.call(2), 1), seed=1)
        torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-4)
        enable_sag(pipe, 1.0, start=0.5)
        del seen[:]
        window = _latents(pipe, call, steps=4)
        assert len(seen) == 4 * per_step + 2  # steps 2 and 3: + one extra forward each
        enable_sag(pipe, 1.0)
        full = _latents(pipe, call, steps=4)
    scale = plain.abs().max()
    assert (window - plain).abs().max() > 1e-4 * scale and (full - window).abs().max() > 1e-4 * scale


def _reference_mask(q, k, scale, attn_mask, joint: bool, n_img: int, grid) -> torch.Tensor:
    """float64 SAG mask from materialised probabilities: the softmax over every key with the attention mask
    (bool: dropped keys; float: added); mass of the image keys from the image queries, mean over heads, above
    its mean. Joint rows put the image tokens last before the row's trailing padding (Lumina 2), read per row."""
    q, k = q.double(), k.double()
    b, heads, n_all, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    kept = torch.ones(b, n_all, dtype=torch.bool)
    if attn_mask is not None:
        m = attn_mask.expand(b, heads, n_all, n_all)
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, float("-inf"))
            kept = m[:, 0, -1]  # per key (Lumina 2) or the last (image) query's row of an outer product (Chroma)
        else:
            logits = logits + m.double()
    probs = torch.softmax(logits, -1)
    masks = []
    for r in range(b):
        end = int(kept[r].nonzero().max()) + 1 if joint else n_all
        start = end - n_img
        mass = probs[r, :, start:end, start:end].sum(-2).mean(0)
        masks.append((mass > mass.mean()).reshape(grid))
    return torch.stack(masks)


@pytest.mark.parametrize("name", FAMILIES + list(IMG2IMG))
def test_guided_call_equals_the_float64_reference_and_the_extra_forward_gets_the_unconditional_rows(name):
    case = {**CASES, **IMG2IMG}[name]
    pipe = case.build()
    scale = 0.9
    model = _model(pipe)
    outputs = []
    model.register_forward_hook(lambda m, a, k, o: outputs.append(o[0] if isinstance(o, tuple) else o.sample),
                                with_kwargs=True)
    with _recorded_forwards(model) as (seen, watch):
        enable_sag(pipe, scale)
        session = vars(pipe)["_sag_fast_state"]
        contract, capture = session.contract, session.capture
        watch(capture.layer)
        call = case.call(2)
        _latents(pipe, call, seed=[0, 1])
    # the second step (at the first, flow matching's sigma = 1 leaves SAG's x0 estimate 0): its guided call's
    # own forward, then SAG's extra forward; the guided call is the pipeline's last model call
    guided_entry, extra_entry = seen[-2], seen[-1]
    guided = outputs[-1]
    family = contract.family
    args, extra_args = guided_entry["arguments"], extra_entry["arguments"]
    x_name, t_name = next(iter(args)), "timestep"
    x, t, out = args[x_name], args[t_name], guided_entry["out"]
    ways = family.ways if family.cfg == "batched" else 1
    b = x.shape[0] // ways
    rows = slice(family.uncond_index * b, (family.uncond_index + 1) * b)
    # the extra forward: exactly the unconditional rows of every argument with a row per batch row (whatever the
    # record says), everything else as in the call; and those rows are the negative prompt's (from the inputs)
    assert torch.equal(extra_args[t_name], t if t.dim() == 0 else t[rows])  # a 0-dim timestep serves every row
    for key, value in args.items():
        if key in (x_name, t_name):
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == x.shape[0]:
            assert torch.equal(extra_args[key], value[rows]), key
        else:
            assert extra_args.get(key) is value or extra_args.get(key) == value, key
    negative = call.get("negative_prompt_embeds", call["prompt_embeds"])  # LCM: one way, its only prompt
    assert torch.equal(extra_args["encoder_hidden_states"], negative)
    # the reference step
    c = family.latent(model)
    packed = x.dim() == 3
    x4, out4 = (unpack_latents(x, 8, 8), unpack_latents(out, 8, 8)) if packed else (x, out)
    q, k, sdpa_scale, attn_mask = guided_entry["sdpa"][0]
    n_img = 16
    mask = _reference_mask(q[rows], k[rows], sdpa_scale, None if attn_mask is None else attn_mask[rows],
                           family.joint is not None and q.shape[2] > n_img, n_img, (4, 4))
    assert mask.any() and not mask.all()
    if case.flow:
        sigma = pipe.scheduler.sigmas[1].double()
        c1, c2 = reference.signal_coefficients(1 - sigma, sigma, "flow")
    else:
        acp = pipe.scheduler.alphas_cumprod[int(t.reshape(-1)[0])].double()
        c1, c2 = reference.signal_coefficients(acp.sqrt(), (1 - acp).sqrt(), pipe.scheduler.config.prediction_type)
    x_deg = reference.degrade(x4[rows, :c].double(), out4[rows, :c].double(), mask, c1, case.sign * c2).float()
    x_deg = torch.cat([x_deg, x4[rows, c:]], 1)
    got_x = unpack_latents(extra_args[x_name], 8, 8) if packed else extra_args[x_name]
    torch.testing.assert_close(got_x, x_deg, rtol=0, atol=1e-4)
    degraded = unpack_latents(extra_entry["out"], 8, 8) if packed else extra_entry["out"]
    with torch.no_grad():  # the degraded forward recomputed at the reference's x~
        again = dict(extra_args, **{x_name: pack_latents(x_deg) if packed else x_deg, "return_dict": False})
        recomputed = type(model).forward(model, **again)[0]
    torch.testing.assert_close(unpack_latents(recomputed, 8, 8) if packed else recomputed, degraded, rtol=0,
                               atol=1e-4)
    want = reference.guidance_shift(out4.double(), degraded.double(), scale, c, family.uncond_index).float()
    torch.testing.assert_close(unpack_latents(guided, 8, 8) if packed else guided, want, rtol=0, atol=2e-4)
    assert (want - out4).abs().max() > 1e-3 * out4.abs().max()


# ------------------------------------------------------------------------------------------- refusals
def test_lumina2_call_that_drops_the_unconditional_call_is_refused_before_sampling():
    """Lumina 2 with cfg_trunc_ratio < 1 drops the unconditional call in the last steps (SAG could not pair a
    step's calls): refused at the call, before the transformer runs; without CFG the same argument is harmless.
    Its cfg_normalization (the default) runs: the pipeline renormalises the SAG-shifted predictions, as
    QwenImage's does."""
    pipe = tp.lumina2_pipeline()
    enable_sag(pipe, 1.0)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match="Lumina2Pipeline with SAG: .*cfg_trunc_ratio=1.0"):
        _latents(pipe, {**CASES["lumina2"].call(1), "cfg_trunc_ratio": 0.5})
    assert calls == []
    _latents(pipe, {**CASES["lumina2"].call(1), "cfg_trunc_ratio": 0.5, "guidance_scale": 1.0})
    assert calls
    _latents(pipe, {**CASES["lumina2"].call(1), "cfg_normalization": True})


def test_kandinsky3_layer_used_as_cross_attention_is_refused():
    """Kandinsky 3's self-attention blocks are diffusers Attention layers built with a context (flagged as
    cross-attention) and called with their own input as the context; a block given the text is refused."""
    pipe = tp.kandinsky3_pipeline()
    enable_sag(pipe, 1.0, layer="down_blocks.1.attentions.1.attention")
    with pytest.raises(RuntimeError, match="context other than its own input"):
        _latents(pipe, CASES["kandinsky3"].call(1))


def test_cli_samples_a_saved_lcm_folder(tmp_path):
    """`python -m sag_fast sample --model <folder>` on a saved LCM pipeline (one way: SAG is its only guidance)."""
    import json

    import numpy as np
    from PIL import Image

    from sag_fast.__main__ import main

    folder = tmp_path / "lcm"
    tp.lcm_pipeline().save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["sample", "--no-progress", "--output-dir", str(out), "--model", str(folder), "--steps", "2",
                 "--height", "64", "--width", "64", "--prompt", "a red square"]) == 0
    report = json.loads((out / "run.json").read_text())
    plain = np.asarray(Image.open(out / "sample0_nosag.png"), dtype=np.int16)
    guided = np.asarray(Image.open(out / "sample0_sag.png"), dtype=np.int16)
    assert plain.shape == (64, 64, 3) and np.abs(plain - guided).max() > 0 and report["settings"]["sag_scale"] > 0


def test_chroma_img2img():
    """ChromaImg2ImgPipeline: the text-to-image loop from part-way into the schedule (strength)."""
    from diffusers import ChromaImg2ImgPipeline

    pipe = tp.chroma_pipeline(ChromaImg2ImgPipeline)
    call = dict(CASES["chroma"].call(1), image=torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64),
                strength=0.8)
    plain = _latents(pipe, call, steps=4)
    enable_sag(pipe, 1.0)
    guided = _latents(pipe, call, steps=4)
    assert (guided - plain).abs().max() > 1e-3
    disable_sag(pipe)
    assert torch.equal(_latents(pipe, call, steps=4), plain)
