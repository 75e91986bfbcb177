"""sag_fast/schedule.py against the diffusers schedulers themselves, in a real sampling loop.

For each scheduler: scale_model_input, then our (alpha, sigma) -> (c1, c2), then scheduler.step with a
random model output; the x0 our coefficients imply, x0_hat = (c1*x_in + c2*o)/alpha, must equal the
scheduler's own x0 prediction (pred_original_sample, or what it stores / documents).
"""
from __future__ import annotations

import types

import pytest
import torch

from sag_fast import schedule
from sag_fast._profiling import count_dispatched_ops, host_syncs

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler, EDMEulerScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler,
    LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NO_CLIP = dict(clip_sample=False)  # DDPM/DDIM clip x0 to [-1, 1] by default (SD configs turn it off)
# fp32 throughout (diffusers' tables and our fp32 outputs): ~1e-7 relative; 2e-5 leaves room for the
# cancellation in x - sigma*o at high noise, while an off-by-one sigma is off by >1e-3.
RTOL = 2e-5


def _cases():
    for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler, DEISMultistepScheduler, UniPCMultistepScheduler,
                DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EulerDiscreteScheduler,
                EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler, KDPM2DiscreteScheduler):
        for ptype in ("epsilon", "v_prediction"):
            extra = NO_CLIP if cls in (DDPMScheduler, DDIMScheduler) else {}
            yield pytest.param(cls, dict(SD, prediction_type=ptype, **extra), id=f"{cls.__name__}-{ptype}")
    yield pytest.param(DDIMScheduler, dict(prediction_type="sample", **NO_CLIP), id="DDIMScheduler-sample-linear")
    yield pytest.param(DDIMScheduler, dict(SD, **NO_CLIP, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           timestep_spacing="trailing"), id="DDIMScheduler-v-zero_snr")
    yield pytest.param(EulerDiscreteScheduler, dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                    timestep_spacing="trailing"), id="Euler-v-zero_snr")
    for cls in (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EulerDiscreteScheduler,
                HeunDiscreteScheduler, LMSDiscreteScheduler, KDPM2DiscreteScheduler, UniPCMultistepScheduler):
        for ptype in ("epsilon", "v_prediction"):
            yield pytest.param(cls, dict(SD, prediction_type=ptype, use_karras_sigmas=True),
                               id=f"{cls.__name__}-{ptype}-karras")
    yield pytest.param(DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True),
                       id="DPMSolverMultistep-flow")
    yield pytest.param(UniPCMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True),
                       id="UniPC-flow")
    yield pytest.param(FlowMatchEulerDiscreteScheduler, {}, id="FlowMatchEuler")
    yield pytest.param(FlowMatchEulerDiscreteScheduler, dict(shift=3.0), id="FlowMatchEuler-shift3")
    yield pytest.param(LCMScheduler, dict(SD, **NO_CLIP), id="LCMScheduler")


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _scheduler_x0(sched, out, x, x_in, o, t, step_used):
    """The scheduler's own x0 prediction for this step (x: the latents given to step(), x_in: model input)."""
    name = type(sched).__name__
    if getattr(out, "pred_original_sample", None) is not None:
        return out.pred_original_sample
    if name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"):
        return sched.model_outputs[-1]  # dpmsolver++ / predict_x0: the converted output is x0
    if name == "DEISMultistepScheduler":  # stores eps; x0 by its own alpha_t, sigma_t
        a, s = sched._sigma_to_alpha_sigma_t(sched.sigmas[step_used])
        return (x - s * sched.model_outputs[-1]) / a
    if name == "FlowMatchEulerDiscreteScheduler":  # documented: x0 = x - sigma*v, sigma = sigmas[step]
        return x - sched.sigmas[step_used] * o
    if name == "LCMScheduler":  # denoised = c_out*x0 + c_skip*x
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        return (out.denoised - c_skip * x) / c_out
    raise AssertionError(f"no x0 source for {name}")


def _step_kwargs(sched):
    return {"generator": torch.Generator().manual_seed(1)} if "generator" in sched.step.__code__.co_varnames else {}


def _make(cls, config):
    if cls is LMSDiscreteScheduler:
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    return cls(**config)


def _scale_model_input(sched, x, t):
    return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # FlowMatch: none


@pytest.mark.parametrize("cls,config", list(_cases()))
def test_implied_x0_matches_scheduler(cls, config):
    sched = _make(cls, config)
    sched.set_timesteps(10 if cls is not LCMScheduler else 4)
    schedule.check_supported(sched)
    x = torch.randn(2, 3, 5, 7) * getattr(sched, "init_noise_sigma", 1.0)
    checked = 0
    for t in sched.timesteps[:7]:
        x_in = _scale_model_input(sched, x, t)
        alpha, sigma = schedule.model_input_alpha_sigma(sched, t)
        c1, c2 = schedule.signal_coefficients_for(sched, t)
        assert alpha.dtype == sigma.dtype == c1.dtype == torch.float32 and alpha.shape == t.shape == ()
        o = torch.randn_like(x)
        signal = c1 * x_in + c2 * o  # alpha * x0_hat, what SAG blurs
        if float(alpha) == 0:  # terminal step of a zero-SNR / flow schedule: no signal, x0 is undefined here
            assert signal.abs().max() == 0
            x = sched.step(o, t, x, **_step_kwargs(sched)).prev_sample
            continue
        ours = signal / alpha
        if isinstance(sched, PNDMScheduler):
            # PNDM returns no x0: compare its DDIM-type transition to prev_t with the one our x0_hat implies
            prev_t = max(int(t) - 37, 0)
            ap = sched.alphas_cumprod[prev_t]
            eps = (x_in - alpha * ours) / sigma
            torch.testing.assert_close(ap.sqrt() * ours + (1 - ap).sqrt() * eps,
                                       sched._get_prev_sample(x, t, prev_t, o), rtol=RTOL, atol=RTOL * x.abs().max())
            out = sched.step(o, t, x)
        else:
            out = sched.step(o, t, x, **_step_kwargs(sched))
            step_after = getattr(sched, "step_index", None)
            theirs = _scheduler_x0(sched, out, x, x_in, o, t, None if step_after is None else step_after - 1)
            assert _rel(ours, theirs) < RTOL, (int(checked), float(t), _rel(ours, theirs))
        checked += 1
        x = out.prev_sample
    assert checked >= 4


def _flow_or_vp(sched):
    return "flow" if schedule.prediction_type(sched) == "flow" else "vp"


@pytest.mark.parametrize("cls,config", list(_cases()))
def test_lookup_matches_step_index_and_batches(cls, config):
    """The device lookup (before the first step) gives the sigma of the step index; (B,) timesteps too;
    alpha, sigma lie on the VP circle (alpha^2 + sigma^2 = 1) or the flow line (alpha + sigma = 1)."""
    sched = _make(cls, config)
    sched.set_timesteps(10 if cls is not LCMScheduler else 4)
    x = torch.randn(1, 2, 3, 3)
    for t in sched.timesteps[:5]:
        _scale_model_input(sched, x, t)
        a, s = schedule.model_input_alpha_sigma(sched, t)
        kept = sched._step_index if hasattr(sched, "_step_index") else None
        if kept is not None and len(set(sched.timesteps.tolist())) == len(sched.timesteps):
            sched._step_index = None  # force the lookup; diffusers' own rule agrees when timesteps are unique
            a2, s2 = schedule.model_input_alpha_sigma(sched, t)
            sched._step_index = kept
            torch.testing.assert_close((a2, s2), (a, s), rtol=0, atol=0)
        ab, sb = schedule.model_input_alpha_sigma(sched, t.expand(3))
        assert ab.shape == (3,) and torch.equal(ab, a.expand(3)) and torch.equal(sb, s.expand(3))
        if _flow_or_vp(sched) == "flow":
            torch.testing.assert_close(a + s, torch.ones(()), rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(a * a + s * s, torch.ones(()), rtol=0, atol=1e-6)
        sched.step(torch.randn_like(x), t, x, **_step_kwargs(sched))


def test_lookup_second_of_duplicates_and_low_precision_timestep():
    """diffusers' first-step rule (second of equal entries), and a bf16 timestep still finds its entry."""
    ts = torch.tensor([999.0, 759.0, 759.0, 500.0, 250.0], dtype=torch.float64)
    idx = schedule._lookup_index(ts, torch.tensor([759.0, 999.0, 250.0, 500.0]))
    assert idx.tolist() == [2, 0, 4, 3]
    sched = EulerDiscreteScheduler(**SD)
    sched.set_timesteps(10)
    want = schedule.model_input_alpha_sigma(sched, sched.timesteps[3])
    ts_bf16 = sched.timesteps[3].to(torch.bfloat16)
    assert float(ts_bf16) != float(sched.timesteps[3])  # it did lose precision
    sched._step_index = None
    got = schedule.model_input_alpha_sigma(sched, ts_bf16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cls,config", [
    (DDIMScheduler, SD), (DPMSolverMultistepScheduler, dict(SD, use_karras_sigmas=True)),
    (EulerDiscreteScheduler, SD), (KDPM2DiscreteScheduler, SD), (FlowMatchEulerDiscreteScheduler, {}),
    (UniPCMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True)),
])
def test_no_host_sync(cls, config):
    sched = cls(**config)
    sched.set_timesteps(10)
    t = sched.timesteps[1]
    for step_index in (None, 1):  # the device lookup, then the scheduler's own step index
        if hasattr(sched, "_step_index"):
            sched._step_index = step_index
        _, counts = count_dispatched_ops(lambda: (schedule.signal_coefficients_for(sched, t),
                                                  schedule.model_input_alpha_sigma(sched, t.expand(2))))
        assert counts, "the dispatch mode saw nothing: the test would be vacuous"
        synced = host_syncs(counts)
        assert not synced, f"host sync ops {synced} (step_index={step_index})"


def test_tables_are_cached_until_set_timesteps():
    sched = DPMSolverMultistepScheduler(**SD)
    sched.set_timesteps(10)
    first = schedule._device_table(sched, "sigmas", torch.device("cpu"))
    assert schedule._device_table(sched, "sigmas", torch.device("cpu")) is first
    sched.set_timesteps(12)
    again = schedule._device_table(sched, "sigmas", torch.device("cpu"))
    assert again is not first and again.shape[0] == sched.sigmas.shape[0]


def test_prediction_types():
    assert schedule.prediction_type(FlowMatchEulerDiscreteScheduler()) == "flow"
    assert schedule.prediction_type(DDIMScheduler(prediction_type="v_prediction")) == "v_prediction"
    assert schedule.prediction_type(EulerDiscreteScheduler(prediction_type="original_sample")) == "sample"
    assert schedule.prediction_type(DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                                use_flow_sigmas=True)) == "flow"


def test_python_number_timestep():
    sched = DDIMScheduler(**SD)
    a, s = schedule.model_input_alpha_sigma(sched, 999)
    ac = sched.alphas_cumprod[999].double()
    torch.testing.assert_close((a.double(), s.double()), (ac.sqrt(), (1 - ac).sqrt()), rtol=1e-7, atol=0)


def test_unsupported_raise_naming_the_scheduler():
    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        schedule.check_supported(EDMEulerScheduler())
    with pytest.raises(ValueError, match="MyScheduler"):
        schedule.model_input_alpha_sigma(type("MyScheduler", (), {"config": types.SimpleNamespace()})(), 10)
    bad = DDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match=r"DDIMScheduler.*'noise'"):
        schedule.prediction_type(bad)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        schedule.signal_coefficients_for(bad, 10)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        schedule.check_supported(DPMSolverMultistepScheduler(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.signal_coefficients_for(DDIMScheduler(), 10, prediction_type="noise")
    with pytest.raises(ValueError, match="timestep"):
        schedule.model_input_alpha_sigma(DDIMScheduler(), torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("cls,config", list(_cases()))
def test_step_coefficients_equal_the_per_step_computation(cls, config):
    """schedule.step_coefficients (tables built once per schedule, picked by step index or by the timestep's
    position in the schedule) gives signal_coefficients_for's values exactly, in a real loop; after the first
    steps it dispatches no op at all, and it never reads a device value."""
    sched = _make(cls, config)
    sched.set_timesteps(8 if cls is not LCMScheduler else 4)
    x = torch.randn(2, 3, 5, 7) * getattr(sched, "init_noise_sigma", 1.0)
    quiet = 0
    for i, t in enumerate(sched.timesteps):
        _scale_model_input(sched, x, t)
        for timestep in (t, t.expand(2)):  # the loop's 0-dim timestep, and expanded per row as SD3/Flux pass it
            (c1, c2), counts = count_dispatched_ops(lambda: schedule.step_coefficients(sched, timestep))
            w1, w2 = schedule.signal_coefficients_for(sched, timestep)
            assert torch.equal(c1.expand(w1.shape), w1) and torch.equal(c2.expand(w2.shape), w2), (i, float(t))
            assert host_syncs(counts) == {}
            quiet += i > 1 and not counts
        o = torch.randn_like(x)
        x = (sched.step(o, t, x) if isinstance(sched, PNDMScheduler) else sched.step(o, t, x, **_step_kwargs(sched))
             ).prev_sample
    assert quiet >= 2 * (len(sched.timesteps) - 2) - 2, "the per-step tables were not used"


def test_step_coefficients_fall_back_for_a_timestep_off_the_schedule():
    sched = DDIMScheduler(**SD)
    sched.set_timesteps(5)
    t = sched.timesteps[2].clone()  # a copy, not a view of the schedule: computed from its value
    (c1, c2), counts = count_dispatched_ops(lambda: schedule.step_coefficients(sched, t))
    w1, w2 = schedule.signal_coefficients_for(sched, t)
    assert counts and torch.equal(c1, w1) and torch.equal(c2, w2)
