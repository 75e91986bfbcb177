"""Pins sag_fast/reference.py to diffusers' own (deprecated) StableDiffusionSAGPipeline.

The pipeline's methods are called unbound with a small stand-in `self` (a scheduler and
`unet.config.attention_head_dim`), so no model is needed. Everything runs on CPU in float64.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from sag_fast import reference as ref

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (  # noqa: E402
    StableDiffusionSAGPipeline as Pipe,
    gaussian_blur_2d,
)

F64 = torch.float64
# alphas_cumprod and DPMSolver's sigmas are fp32 in diffusers and the pipeline mixes fp32 and fp64
# coefficients (pred_x0 indexes the fp32 table, add_noise converts it to fp64; DPMSolver's add_noise
# re-derives alpha from its own fp32 sigmas). Those roundings are ~1e-7 relative, hence 1e-6.
RTOL = 1e-6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def stand_in(scheduler, heads):
    """The part of the pipeline `self` that pred_x0 / pred_epsilon / sag_masking read."""
    return types.SimpleNamespace(scheduler=scheduler,
                                 unet=types.SimpleNamespace(config=types.SimpleNamespace(attention_head_dim=heads)))


def make_scheduler(cls, prediction_type):
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    sched.set_timesteps(10)
    return sched


def random_probs(b, heads, nk, scale=3.0):
    # a peaked softmax so that the attention mass spreads well around its mean and the mask is mixed
    return torch.softmax(scale * torch.randn(b * heads, nk, nk, dtype=F64), dim=-1)


SHAPES = [  # (latent H, W), attention grid (h, w)
    ((16, 16), (4, 4)),
    ((24, 20), (6, 5)),
    ((65, 47), (9, 6)),   # non-divisible both ways
    ((13, 31), (7, 3)),
]


# -------------------------------------------------------------------------- sag_masking + add_noise
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("latent_hw,grid", SHAPES)
def test_degrade_matches_diffusers_sag_masking(scheduler_cls, prediction_type, latent_hw, grid):
    b, c, heads = 2, 4, 3
    sched = make_scheduler(scheduler_cls, prediction_type)
    pipe = stand_in(sched, [5, heads])  # a list: the pipeline takes its last entry
    h, w = latent_hw
    x = torch.randn(b, c, h, w, dtype=F64)
    probs = random_probs(b, heads, grid[0] * grid[1])
    mask = ref.attention_mask(probs, grid, (h, w), heads=heads)
    assert 0 < mask.float().mean() < 1, "the test needs a mixed mask"

    ac = sched.alphas_cumprod.to(F64)
    ts = sched.timesteps
    for t in (ts[0], ts[len(ts) // 2], ts[-1]):
        o = torch.randn_like(x)
        want = Pipe.sag_masking(
            pipe, Pipe.pred_x0(pipe, x, o, t), probs, grid, t, Pipe.pred_epsilon(pipe, x, o, t))
        alpha, sigma = ac[t].sqrt(), (1 - ac[t]).sqrt()
        c1, c2 = ref.signal_coefficients(alpha, sigma, prediction_type)
        got = ref.degrade(x, o, mask, c1, c2)
        assert got.dtype == F64
        assert rel_err(got, want) < RTOL, (int(t), rel_err(got, want))
        # per-sample coefficients of shape (B,) give the same answer
        got_b = ref.degrade(x, o, mask, c1.expand(b), c2.expand(b))
        assert rel_err(got_b, want) < RTOL


def test_degrade_unmasked_region_is_exactly_x():
    """Outside the mask the pipeline's blend and re-noise give back x; the reference must give x itself."""
    x, o = torch.randn(2, 3, 17, 11, dtype=F64), torch.randn(2, 3, 17, 11, dtype=F64)
    mask = torch.rand(2, 5, 4) > 0.5
    up = ref.upsample_mask(mask, (17, 11))[:, None].expand_as(x)
    got = ref.degrade(x, o, mask, torch.tensor([0.9, 0.7]), torch.tensor([-0.3, -0.5]))
    assert torch.equal(got[~up], x[~up])
    assert not torch.allclose(got[up], x[up])


def test_attention_mask_matches_diffusers_threshold():
    """The mask of sag_masking, rebuilt step by step with the pipeline's own expressions."""
    b, heads, grid, out = 3, 4, (5, 7), (19, 23)
    probs = random_probs(b, heads, 35)
    m = probs.reshape(b, heads, 35, 35).mean(1).sum(1) > 1.0
    want = F.interpolate(m.reshape(b, 1, *grid).to(F64), out) > 0.5
    got = ref.attention_mask(probs, grid, out, heads=heads)
    assert got.dtype == torch.bool and got.shape == (b, *out)
    assert torch.equal(got, want[:, 0])
    # (B, heads, Nq, Nk) layout gives the same mask; the mass from q and k gives the same mass
    assert torch.equal(ref.attention_mask(probs.reshape(b, heads, 35, 35), grid, out), got)
    q, k = torch.randn(b, heads, 35, 8, dtype=F64), torch.randn(b, heads, 35, 8, dtype=F64)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    torch.testing.assert_close(ref.attention_mass_from_qk(q, k), ref.attention_mass(p), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- blur
@pytest.mark.parametrize("kernel_size,sigma,hw", [(9, 1.0, (16, 16)), (3, 0.5, (5, 7)), (5, 2.0, (13, 6)),
                                                  (11, 3.0, (23, 12)), (1, 1.0, (3, 2))])
def test_gaussian_blur_matches_diffusers(kernel_size, sigma, hw):
    x = torch.randn(2, 3, *hw, dtype=F64)
    want = gaussian_blur_2d(x, kernel_size, sigma)
    # diffusers builds its kernel in fp32 and casts it to fp64: ~1e-7 relative
    assert rel_err(ref.gaussian_blur(x, kernel_size, sigma), want) < RTOL
    # non-contiguous input
    xt = torch.randn(2, 3, hw[1], hw[0], dtype=F64).transpose(-1, -2)
    assert rel_err(ref.gaussian_blur(xt, kernel_size, sigma), gaussian_blur_2d(xt, kernel_size, sigma)) < RTOL


# ------------------------------------------------------------------------------------ guidance
def test_guidance_combine_one_way_matches_pipeline():
    pred, degraded = torch.randn(3, 4, 9, 7, dtype=F64), torch.randn(3, 4, 9, 7, dtype=F64)
    s = 0.75
    noise_pred = pred.clone()
    noise_pred += s * (noise_pred - degraded)  # the pipeline, SAG without CFG
    torch.testing.assert_close(ref.guidance_combine(pred, degraded, 7.5, s), noise_pred, rtol=1e-13, atol=1e-13)


def test_guidance_combine_two_way_matches_pipeline():
    b, w, s = 2, 7.5, 0.75
    pred, degraded = torch.randn(2 * b, 4, 9, 7, dtype=F64), torch.randn(b, 4, 9, 7, dtype=F64)
    noise_pred_uncond, noise_pred_text = pred.chunk(2)  # the pipeline, CFG + SAG
    noise_pred = noise_pred_uncond + w * (noise_pred_text - noise_pred_uncond)
    noise_pred += s * (noise_pred_uncond - degraded)
    torch.testing.assert_close(ref.guidance_combine(pred, degraded, w, s), noise_pred, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("degraded_channels", [3, 6])
def test_guidance_combine_learned_variance(degraded_channels):
    """2C outputs (ADM, DiT): guide the first C channels, keep the variance of the conditional way."""
    b, c, w, s = 2, 3, 4.0, 0.5
    pred = torch.randn(2 * b, 2 * c, 5, 6, dtype=F64)
    degraded = torch.randn(b, degraded_channels, 5, 6, dtype=F64)
    got = ref.guidance_combine(pred, degraded, w, s, guided_channels=c)
    u, cond, d = pred[:b, :c], pred[b:, :c], degraded[:, :c]
    torch.testing.assert_close(got[:, :c], u + w * (cond - u) + s * (u - d), rtol=1e-13, atol=1e-13)
    assert torch.equal(got[:, c:], pred[b:, c:])
    one = ref.guidance_combine(pred[:b], degraded, w, s, guided_channels=c)
    torch.testing.assert_close(one[:, :c], u + s * (u - d), rtol=1e-13, atol=1e-13)
    assert torch.equal(one[:, c:], pred[:b, c:])


@pytest.mark.parametrize("guided", [-1, 2])
def test_guidance_shift_then_cfg_equals_combine(guided):
    b, c, w, s = 3, 4, 6.0, 0.8
    pred = torch.randn(2 * b, c, 7, 5, dtype=F64)
    degraded = torch.randn(b, c, 7, 5, dtype=F64)
    g = c if guided == -1 else guided
    shifted = ref.guidance_shift(pred, degraded, s, guided_channels=guided)
    u, cond = shifted.chunk(2)
    cfg = cond.clone()
    cfg[:, :g] = u[:, :g] + w * (cond[:, :g] - u[:, :g])
    torch.testing.assert_close(cfg, ref.guidance_combine(pred, degraded, w, s, guided_channels=guided),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(shifted[:, g:], pred[:, g:])  # channels past g untouched


# ----------------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("grid,out", [((9, 6), (65, 47)), ((3, 5), (7, 11)), ((2, 7), (82, 13)), ((5, 5), (5, 5)),
                                      ((4, 3), (8, 6)), ((7, 9), (5, 4))])
def test_upsample_mask_follows_the_fp32_index_rule(grid, out):
    """reference.upsample_mask against the index rule written out (not against F.interpolate, which it calls):
    src = min(floor(dst * fp32(in/out)), in - 1) in fp32 arithmetic, each output cell copying its source."""
    mask = torch.rand(2, *grid) > 0.5
    got = ref.upsample_mask(mask, out)
    rows, cols = (torch.clamp((torch.arange(o, dtype=torch.float32) * (torch.tensor(i, dtype=torch.float32) / o))
                              .floor().long(), max=i - 1) for i, o in zip(grid, out))
    assert torch.equal(got, mask[:, rows][:, :, cols])


@pytest.mark.parametrize("n_in,n_out,src", [
    (3, 7, [0, 0, 0, 1, 1, 2, 2]),
    (7, 3, [0, 2, 4]),
    (4, 8, [0, 0, 1, 1, 2, 2, 3, 3]),
    (5, 5, [0, 1, 2, 3, 4]),
])
def test_upsample_mask_hand_computed(n_in, n_out, src):
    """Source indices worked out by hand: output column j copies input column src[j]."""
    row = torch.arange(n_in)[None, None, :].expand(1, 1, n_in) % 2 == 0  # alternate True/False per column
    got = ref.upsample_mask(row.expand(1, 1, n_in), (1, n_out))
    assert got[0, 0].tolist() == [j % 2 == 0 for j in src]


def test_upsample_mask_fp32_scale_is_not_the_exact_quotient():
    """in=2, out=82: fp32(2/82)*41 rounds to just below 1, so output 41 copies input 0 (the exact rational
    rule would pick input 1). The kernels follow PyTorch's fp32 rule."""
    mask = torch.tensor([[[True, False]]])
    got = ref.upsample_mask(mask, (1, 82))[0, 0]
    assert got[:42].all() and not got[42:].any()


# --------------------------------------------------------------------------------- coefficients
def test_signal_coefficients_flow_is_exact():
    """Flow matching: x = (1-t) x0 + t eps, o = eps - x0, alpha = 1-t, sigma = t  =>  s = alpha*x0."""
    t = torch.tensor([0.0, 0.13, 0.5, 0.91, 1.0], dtype=F64)
    x0, eps = torch.randn(5, 4, 6, 3, dtype=F64), torch.randn(5, 4, 6, 3, dtype=F64)
    tt = t.view(-1, 1, 1, 1)
    x, o = (1 - tt) * x0 + tt * eps, eps - x0
    c1, c2 = ref.signal_coefficients(1 - t, t, "flow")
    s = c1.view(-1, 1, 1, 1) * x + c2.view(-1, 1, 1, 1) * o
    torch.testing.assert_close(s, (1 - tt) * x0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_signal_coefficients_vp(ptype):
    ac = torch.rand(6, dtype=F64) * 0.98 + 0.01
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    x0, eps = torch.randn(6, 3, 4, 5, dtype=F64), torch.randn(6, 3, 4, 5, dtype=F64)
    a, sg = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x = a * x0 + sg * eps
    o = {"epsilon": eps, "v_prediction": a * eps - sg * x0, "sample": x0}[ptype]
    c1, c2 = ref.signal_coefficients(alpha, sigma, ptype)
    torch.testing.assert_close(c1.view(-1, 1, 1, 1) * x + c2.view(-1, 1, 1, 1) * o, a * x0, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(1, 2, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="prediction_type"):
        ref.signal_coefficients(0.5, 0.5, "noise")
    with pytest.raises(ValueError, match="grid_hw"):
        ref.attention_mask(random_probs(1, 2, 12), (3, 5), (8, 8), heads=2)
    with pytest.raises(ValueError, match="heads"):
        ref.attention_mask(random_probs(1, 2, 12), (3, 4), (8, 8))
    with pytest.raises(ValueError, match="kernel_size"):
        ref.gaussian_blur(x, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size"):
        ref.gaussian_blur(x, kernel_size=17)  # image too small for the reflect padding
    with pytest.raises(ValueError, match="height"):
        ref.degrade(torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12), None, 1.0, -0.5)
    with pytest.raises(ValueError, match="sigma"):
        ref.gaussian_blur(x, sigma=0.0)
    with pytest.raises(ValueError, match="c1"):
        ref.degrade(x, x, None, torch.ones(2), 0.5)
    with pytest.raises(ValueError, match="mask"):
        ref.degrade(x, x, torch.ones(2, 4, 4, dtype=torch.bool), 1.0, 0.5)
    with pytest.raises(ValueError, match="guided_channels"):
        ref.guidance_combine(torch.randn(2, 4, 3, 3), torch.randn(1, 4, 3, 3), 1.0, 1.0, guided_channels=5)
    with pytest.raises(ValueError, match="pred"):
        ref.guidance_combine(torch.randn(3, 4, 3, 3), torch.randn(2, 4, 3, 3), 1.0, 1.0)


# ---------------------------------------------------------------------------------------- video
def test_video_degrade_is_diffusers_blur_per_frame():
    """Video latents (B, C, F, H, W): each frame blurred alone with diffusers' gaussian_blur_2d, the (B, f, h, w)
    mask upsampled with the fp32 index rule written out per axis, frames 0 1 1 2 2 of 3 mask frames over 5."""
    b, c, f, h, w = 2, 3, 5, 13, 10
    x, o = torch.randn(b, c, f, h, w, dtype=F64), torch.randn(b, c, f, h, w, dtype=F64)
    mask = torch.rand(b, 3, 4, 3) > 0.5
    c1, c2 = torch.tensor([0.9, 0.6], dtype=F64), torch.tensor([-0.3, -0.7], dtype=F64)
    got = ref.degrade(x, o, mask, c1, c2, 5, 1.3)

    def src(n_in, n_out):  # the fp32 index rule, written out
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out
        return torch.clamp((torch.arange(n_out, dtype=torch.float32) * scale).floor().long(), max=n_in - 1)

    frames, rows, cols = src(3, f), src(4, h), src(3, w)
    assert frames.tolist() == [0, 0, 1, 1, 2]
    for t in range(f):
        s = c1.view(-1, 1, 1, 1) * x[:, :, t] + c2.view(-1, 1, 1, 1) * o[:, :, t]
        m = mask[:, frames[t]][:, rows][:, :, cols][:, None]
        want = x[:, :, t] + m * (gaussian_blur_2d(s, 5, 1.3) - s)
        assert rel_err(got[:, :, t], want) < RTOL, t


def test_video_gaussian_blur_does_not_mix_frames():
    x = torch.randn(1, 2, 4, 9, 8, dtype=F64)
    y = ref.gaussian_blur(x, 5, 1.0)
    x2 = x.clone()
    x2[:, :, 1] += 1.0
    changed = (ref.gaussian_blur(x2, 5, 1.0) != y).flatten(3).any(-1)[0]  # (C, F)
    assert changed[:, 1].all() and not changed[:, [0, 2, 3]].any()


@pytest.mark.parametrize("grid,out", [((3, 9, 6), (7, 65, 47)), ((1, 2, 7), (5, 82, 13)), ((5, 4, 3), (3, 8, 6)),
                                      ((2, 3, 5), (2, 3, 5))])
def test_upsample_mask_video_follows_the_fp32_index_rule_per_axis(grid, out):
    mask = torch.rand(2, *grid) > 0.5
    got = ref.upsample_mask(mask, out)
    fr, rows, cols = (torch.clamp((torch.arange(o, dtype=torch.float32) * (torch.tensor(i, dtype=torch.float32) / o))
                                  .floor().long(), max=i - 1) for i, o in zip(grid, out))
    assert torch.equal(got, mask[:, fr][:, :, rows][:, :, :, cols])


def test_video_mask_keys_are_frame_major():
    """mass_to_mask on an (f, h, w) grid: key j = (t*h + i)*w + col lands at [t, i, col]."""
    f, h, w = 3, 2, 5
    mass = torch.rand(2, f * h * w, dtype=F64) * 2
    got = ref.mass_to_mask(mass, (f, h, w))
    assert got.shape == (2, f, h, w)
    for t, i, col in ((0, 0, 0), (1, 1, 3), (2, 0, 4), (2, 1, 2)):
        assert bool(got[1, t, i, col]) == bool(mass[1, (t * h + i) * w + col] > 1.0)
    assert torch.equal(ref.joint_mass_to_mask(mass, (f, h, w)).flatten(1), mass > mass.mean(-1, keepdim=True))


def test_video_bad_inputs_raise_naming_the_argument():
    x = torch.randn(1, 2, 3, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="mask"):
        ref.degrade(x, x, torch.ones(1, 4, 4, dtype=torch.bool), 1.0, 0.5)  # image mask for a video
    with pytest.raises(ValueError, match="mask"):
        ref.degrade(x[:, :, 0], x[:, :, 0], torch.ones(1, 2, 4, 4, dtype=torch.bool), 1.0, 0.5)
    with pytest.raises(ValueError, match="grid_hw"):
        ref.mass_to_mask(torch.rand(1, 24), (2, 3, 5))
    with pytest.raises(ValueError, match="grid_hw"):
        ref.mass_to_mask(torch.rand(1, 24), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="c1"):
        ref.degrade(x, x, None, torch.ones(3), 0.5)
