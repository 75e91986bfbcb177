"""sag_fast.sampler.SAGSampler on tiny diffusers models: runs, reproducible, scale 0 == a plain loop bit for bit,
the start/stop window costs one forward outside it, learned variance, CFG wiring, and bad input raising early."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from sag_fast import reference
from sag_fast.guidance import SAGConfig
from sag_fast.ops.testing import triton_on_cpu
from sag_fast.sampler import SAGSampler
from tiny_models import tiny_unet, tiny_unet_cond

STEPS = 3


def ddim():
    return DDIMScheduler(num_train_timesteps=100)


def count_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def plain_loop(model, scheduler, noise, steps, kwargs=None, uncond=None, w=1.0, generator=None):
    """A sampling loop without SAG, written out (the timestep expanded to the batch, as the sampler does)."""
    kwargs = kwargs or {}
    scheduler.set_timesteps(steps)
    lat = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if uncond is None:
            x_in = scheduler.scale_model_input(lat, t)
            out = model(x_in, t.expand(x_in.shape[0]), **kwargs).sample
        else:
            x_in = scheduler.scale_model_input(torch.cat([lat, lat]), t)
            both = {k: torch.cat([uncond[k], kwargs[k]]) for k in kwargs}
            u, c = model(x_in, t.expand(x_in.shape[0]), **both).sample.chunk(2)
            out = u + w * (c - u)
        lat = scheduler.step(out, t, lat, generator=generator, return_dict=False)[0]
    return lat


# --------------------------------------------------------------------------------------- running
def test_unet2d_ddim_runs_and_is_reproducible():
    model = tiny_unet()
    sampler = SAGSampler(model, ddim(), SAGConfig(scale=1.0), progress=True)
    with torch.no_grad():
        a = sampler((2, 3, 8, 8), num_inference_steps=2, generator=gen(1))
        b = sampler((2, 3, 8, 8), num_inference_steps=2, generator=gen(1))
        c = sampler((2, 3, 8, 8), num_inference_steps=2, generator=gen(2))
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scale_zero_is_a_plain_loop_bit_for_bit():
    model = tiny_unet()
    noise = torch.randn(2, 3, 8, 8)
    calls = count_calls(model)
    with torch.no_grad():
        got = SAGSampler(model, ddim(), SAGConfig(scale=0.0), progress=False)(noise, num_inference_steps=STEPS)
        assert len(calls) == STEPS
        want = plain_loop(model, ddim(), noise, STEPS)
        guided = SAGSampler(model, ddim(), SAGConfig(scale=0.9), progress=False)(noise, num_inference_steps=STEPS)
    assert torch.equal(got, want)
    assert not torch.allclose(guided, want)  # SAG changes the sample


def test_cfg_scale_zero_is_a_plain_cfg_loop_bit_for_bit():
    model = tiny_unet_cond()
    noise, e, e0 = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        got = SAGSampler(model, ddim(), SAGConfig(scale=0.0), guidance_scale=4.0, progress=False)(
            noise, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": e0}, num_inference_steps=STEPS)
        want = plain_loop(model, ddim(), noise, STEPS, {"encoder_hidden_states": e}, {"encoder_hidden_states": e0}, 4.0)
    assert torch.equal(got, want)


def reference_guided_output(model, layer_name, x_in, t_in, kwargs, c1, c2, config, guided=None):
    """The SAG-guided output of all ways of x_in (unconditional way first), from sag_fast.reference only:
    a plain forward that keeps the chosen layer's q and k, the softmax probabilities materialised in float64
    as diffusers' attention computes them, the mask of the unconditional rows, reference.degrade, the
    degraded forward, reference.guidance_shift. The grid is the spatial size of the input of the model
    block that holds the layer (UNet) or the latent size over the patch size (DiT)."""
    modules = dict(model.named_modules())
    attn = modules[layer_name]
    seen = {}

    def keep(key, value):  # hooks that return None leave the module's input and output alone
        seen.setdefault(key, value)

    hooks = [attn.to_q.register_forward_hook(lambda m, a, o: keep("q", o)),
             attn.to_k.register_forward_hook(lambda m, a, o: keep("k", o))]
    block = layer_name.rsplit(".transformer_blocks", 1)[0]
    if block in modules and block:
        hooks.append(modules[block].register_forward_pre_hook(lambda m, a: keep("hw", a[0].shape[-2:])))
    try:
        out = model(x_in, t_in, **kwargs).sample
    finally:
        for h in hooks:
            h.remove()
    b = x_in.shape[0] // 2 if "class_labels" in kwargs or "encoder_hidden_states" in kwargs else x_in.shape[0]
    rows = slice(0, b)
    q = attn.head_to_batch_dim(seen["q"][rows].double())
    k = attn.head_to_batch_dim(seen["k"][rows].double())
    probs = attn.get_attention_scores(q, k, None)
    if "hw" in seen and len(seen["hw"]) == 2 and seen["hw"][0] * seen["hw"][1] == probs.shape[-1]:
        grid = tuple(seen["hw"])
    else:  # DiT: tokens of the patchified latent
        p = model.config.patch_size
        grid = (x_in.shape[-2] // p, x_in.shape[-1] // p)
    mask = reference.mass_to_mask(reference.attention_mass(probs, heads=attn.heads), grid, config.threshold)
    c = x_in.shape[1]
    x_deg = reference.degrade(x_in[rows].double(), out[rows, :c].double(), mask, c1[rows].double(),
                              c2[rows].double(), config.kernel_size, config.blur_sigma).float()
    cut = {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == x_in.shape[:1] else v
           for k, v in kwargs.items()}
    degraded = model(x_deg, t_in[rows], **cut).sample
    return reference.guidance_shift(out.double(), degraded.double(), config.scale,
                                    -1 if guided is None else guided).float()


def vp_coefficients(scheduler, t, n):
    """(c1, c2) of an epsilon-predicting VP schedule at t, from alphas_cumprod on the host, for n rows."""
    acp = float(scheduler.alphas_cumprod[int(t)])
    return torch.full((n,), 1.0), torch.full((n,), -((1 - acp) ** 0.5))


@pytest.mark.parametrize("kernels", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1"))])
def test_cfg_sag_matches_a_reference_loop(kernels):
    """CFG + SAG through the sampler (fused ops, capture, schedule) == a loop written from sag_fast.reference
    with (c1, c2) from alphas_cumprod on the host and CFG applied to the guided output. kernels: the ops' CPU
    kernels (C++ degrade, torch masks), or their Triton kernels interpreted (sag_fast.ops.testing)."""
    model = tiny_unet_cond()
    noise, e, e0 = torch.randn(2, 4, 9, 11), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cfg, w = SAGConfig(scale=0.7, kernel_size=5), 3.0
    steps = 2 if kernels == "cpu" else 1  # the interpreter takes seconds per launch
    with torch.no_grad():
        sampler = SAGSampler(model, ddim(), cfg, guidance_scale=w, progress=False)
        with contextlib.nullcontext() if kernels == "cpu" else triton_on_cpu():
            got = sampler(noise, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": e0},
                          num_inference_steps=steps)
        layer = sampler.capture.layer_name
        plain = SAGSampler(model, ddim(), SAGConfig(scale=0.0), guidance_scale=w, progress=False)(
            noise, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": e0}, num_inference_steps=steps)
        scheduler = ddim()
        scheduler.set_timesteps(steps)
        lat = noise.clone()
        kw = {"encoder_hidden_states": torch.cat([e0, e])}
        for t in scheduler.timesteps:
            c1, c2 = vp_coefficients(scheduler, t, 4)
            out = reference_guided_output(model, layer, torch.cat([lat, lat]), t.expand(4), kw, c1, c2, cfg)
            u, c = out.chunk(2)
            lat = scheduler.step(u + w * (c - u), t, lat, return_dict=False)[0]
    torch.testing.assert_close(got, lat, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 10 * 1e-4  # SAG moved the sample well beyond the tolerance


@pytest.mark.parametrize("start, stop, guided", [(0.0, 1.0, 4), (0.25, 0.75, 2), (0.5, 0.5, 0), (0.0, 0.25, 1)])
def test_window_costs_one_forward_outside(start, stop, guided):
    model = tiny_unet()
    calls = count_calls(model)
    sampler = SAGSampler(model, ddim(), SAGConfig(scale=0.8, start=start, stop=stop), progress=False)
    with torch.no_grad():
        sampler((1, 3, 8, 8), num_inference_steps=4, generator=gen())
    assert len(calls) == 2 * guided + (4 - guided)


def test_learned_variance_ddpm_learned_range():
    model = tiny_unet(out_channels=6)
    calls = count_calls(model)
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    with torch.no_grad():
        a = SAGSampler(model, scheduler, SAGConfig(scale=1.0), progress=False)(
            (2, 3, 8, 8), num_inference_steps=STEPS, generator=gen(3))
        b = SAGSampler(model, scheduler, SAGConfig(scale=0.0), progress=False)(
            (2, 3, 8, 8), num_inference_steps=STEPS, generator=gen(3))
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    assert len(calls) == 3 * STEPS and not torch.allclose(a, b)


def test_dit_class_labels_cfg_learned_sigma_with_ddim():
    """DiT: 2C outputs, CFG over class labels (null class = num_embeds_ada_norm), the first C channels guided and
    given to DDIM; equal to the reference loop, and SAG changes the result."""
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    cfg, w = SAGConfig(scale=1.0, kernel_size=5), 2.0
    labels, null = torch.tensor([1, 7]), torch.tensor([10, 10])
    noise = torch.randn(2, 4, 10, 10)
    sampler = SAGSampler(model, ddim(), cfg, guidance_scale=w, progress=False)
    with torch.no_grad():
        x = sampler(noise, cond={"class_labels": labels}, uncond={"class_labels": null}, num_inference_steps=2)
        layer = sampler.capture.layer_name
        assert layer == "transformer_blocks.1.attn1"
        plain = SAGSampler(model, ddim(), SAGConfig(scale=0.0), guidance_scale=w, progress=False)(
            noise, cond={"class_labels": labels}, uncond={"class_labels": null}, num_inference_steps=2)
        scheduler = ddim()
        scheduler.set_timesteps(2)
        lat = noise.clone()
        kw = {"class_labels": torch.cat([null, labels])}
        for t in scheduler.timesteps:
            c1, c2 = vp_coefficients(scheduler, t, 4)
            out = reference_guided_output(model, layer, torch.cat([lat, lat]), t.expand(4), kw, c1, c2, cfg,
                                          guided=4)
            u, c = out[:, :4].chunk(2)
            lat = scheduler.step(u + w * (c - u), t, lat, return_dict=False)[0]
    assert x.shape == (2, 4, 10, 10)
    torch.testing.assert_close(x, lat, rtol=1e-4, atol=1e-4)
    assert (x - plain).abs().max() > 100 * 1e-4


# ------------------------------------------------------------------------------------- bad input
class NotAScheduler:
    config = {}

    def set_timesteps(self, *a, **k): ...

    def step(self, *a, **k): ...

    def scale_model_input(self, x, t):
        return x


def test_cuda_graph_on_cpu_raises():
    with pytest.raises(ValueError, match="cuda_graph"):
        SAGSampler(tiny_unet(), ddim(), cuda_graph=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheduler=NotAScheduler()), "not supported"),
    (dict(scheduler=object()), "scheduler"),
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(config=SAGConfig(layer="mid_block.nope")), "layer"),
    (dict(config={"scale": 1.0}), "config"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guided_channels=0), "guided_channels"),
])
def test_bad_construction_raises(kwargs, match):
    model = tiny_unet()
    args = dict(scheduler=ddim())
    args.update(kwargs)
    scheduler = args.pop("scheduler")
    with pytest.raises((ValueError, TypeError), match=match):
        SAGSampler(model, scheduler, **args)


@pytest.mark.parametrize("call, match", [
    (dict(x_T=(1, 3, 4, 4)), "kernel_size"),
    (dict(x_T=(1, 3, 8)), "x_T"),
    (dict(x_T=(1, 3, 8, 8), num_inference_steps=0), "num_inference_steps"),
    (dict(x_T=(1, 3, 8, 8), generator=0), "generator"),
    (dict(x_T=(1, 3, 8, 8), uncond={"class_labels": torch.tensor([0])}), "cond"),
    (dict(x_T=(2, 3, 8, 8), cond={"class_labels": torch.tensor([0])}), "batch"),
    (dict(x_T=(1, 3, 8, 8), cond={"class_labels": torch.tensor([1])}, uncond={"labels": torch.tensor([0])}), "keys"),
])
def test_bad_call_raises_before_sampling(call, match):
    model = tiny_unet()
    calls = count_calls(model)
    sampler = SAGSampler(model, ddim(), SAGConfig(scale=0.5), progress=False)
    x_T = call.pop("x_T")
    with pytest.raises((ValueError, TypeError), match=match):
        sampler(x_T, **call)
    assert calls == []


def test_guidance_scale_without_uncond_raises_before_sampling():
    model = tiny_unet_cond()
    calls = count_calls(model)
    sampler = SAGSampler(model, ddim(), guidance_scale=3.0, progress=False)
    with pytest.raises(ValueError, match="uncond"):
        sampler((1, 4, 8, 8), cond={"encoder_hidden_states": torch.randn(1, 5, 8)}, num_inference_steps=2)
    assert calls == []


def test_remove_restores_the_model():
    model = tiny_unet()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = model(x, 5).sample
        with SAGSampler(model, ddim(), progress=False) as sampler:
            sampler((1, 3, 8, 8), num_inference_steps=2, generator=gen())
            assert sampler.capture is not None
        assert sampler.capture is None
        assert torch.equal(model(x, 5).sample, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_guided_step_has_no_host_sync():
    model = tiny_unet_cond().cuda()
    sampler = SAGSampler(model, ddim(), SAGConfig(scale=0.8, kernel_size=5), guidance_scale=3.0, progress=False)
    e, e0 = torch.randn(2, 5, 8, device="cuda"), torch.randn(2, 5, 8, device="cuda")
    with torch.no_grad():
        sampler((2, 4, 16, 16), cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": e0},
                num_inference_steps=2)  # warm-up: kernels compiled, tables on the device
        sampler.scheduler.set_timesteps(4, device="cuda")
        t = sampler.scheduler.timesteps[1]
        lat = torch.randn(2, 4, 16, 16, device="cuda")
        kw = {"encoder_hidden_states": torch.cat([e0, e])}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sampler.model_output(lat, t, kw, 2, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_matches_eager(dtype):
    model = tiny_unet_cond().cuda().to(dtype)
    e, e0 = torch.randn(2, 5, 8, device="cuda", dtype=dtype), torch.randn(2, 5, 8, device="cuda", dtype=dtype)
    noise = torch.randn(2, 4, 16, 16, device="cuda", dtype=dtype)
    cfg = SAGConfig(scale=0.8, start=0.2)
    kw = dict(cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": e0}, num_inference_steps=5)
    with torch.no_grad():
        eager = SAGSampler(model, ddim(), cfg, guidance_scale=3.0, progress=False)(noise, **kw)
        graphed = SAGSampler(model, ddim(), cfg, guidance_scale=3.0, progress=False, cuda_graph=True)(noise, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(graphed, eager, rtol=tol, atol=tol)
