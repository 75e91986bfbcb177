"""The state a guided pipeline call reads, read when it holds: CFG decided at each model call (not from the previous
call's guidance scale, and switched by step-end callbacks as the pipeline switches it), and what was changed on
the pipeline since enable_sag (a diffusers cache, a scheduler, a second expert) refused before the call samples.

Each test reproduces a set-up that was silently wrong before (found by review, failing on the code before the fix):
SAG's term on every other step only, on both split-CFG calls, or on rows of other images; a degraded forward
served another call's cached attention."""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_pipelines as tp
from diffusers_checks import gen
from sag_fast import engine
from sag_fast.diffusers import disable_sag, enable_sag

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def spy_guided(monkeypatch):
    """Every guided model evaluation of the session: its batch rows and the ways the engine was told."""
    seen = []
    real = engine.guided_forward

    def spy(forward, x, t, model_kwargs=None, *, config, capture=None, facts, on_shift=None):
        seen.append(dict(rows=x.shape[0], ways=facts.ways, uncond_index=facts.uncond_index))
        return real(forward, x, t, model_kwargs, config=config, capture=capture, facts=facts, on_shift=on_shift)

    monkeypatch.setattr(engine, "guided_forward", spy)
    yield seen


def _embeds(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, tp.EMBED_LEN, tp.TEXT_HIDDEN, generator=gen(seed))


_COGVIEW = dict(height=64, width=64, output_type="latent", num_inference_steps=4)


def _cogview_call(pipe, guidance_scale, **kw):
    return pipe(prompt_embeds=_embeds(1, 1), negative_prompt_embeds=_embeds(1, 2), guidance_scale=guidance_scale,
                generator=gen(0), **_COGVIEW, **kw).images


# ------------------------------------------------------------------------ split CFG: one decision per model call
def test_split_cfg_switched_off_mid_run_guides_every_step(monkeypatch):
    """diffusers' dynamic-CFG recipe (a step-end callback sets pipe._guidance_scale = 1) on a split-CFG pipeline:
    step 0 guides its unconditional call, steps 1-3 their one call each (the call parity used to skip every other
    one, and add the term to a prediction already used)."""
    pipe = tp.cogview4_pipeline()
    enable_sag(pipe, 0.75)

    def cfg_off(p, i, t, kw):
        if i == 0:
            p._guidance_scale = 1.0
        return {}

    with spy_guided(monkeypatch) as seen:
        _cogview_call(pipe, 4.0, callback_on_step_end=cfg_off)
    assert len(seen) == 4, f"{len(seen)} guided evaluations for 4 steps"


@pytest.mark.parametrize("before, now", [(4.0, 1.0), (1.0, 4.0)])
def test_split_cfg_is_decided_by_this_calls_guidance_scale(monkeypatch, before, now):
    """The pipeline sets its guidance scale after its __call__ begins: SAG reads CFG at the model calls, not the
    previous pipeline call's scale. CFG then none: one guided call per step (was: every other step). None then CFG:
    only the unconditional call of each step is guided (was: both, the conditional way's term reaching the result at
    w * s); and the result equals a fresh pipeline's."""
    pipe = tp.cogview4_pipeline()
    enable_sag(pipe, 0.75)
    _cogview_call(pipe, before)
    with spy_guided(monkeypatch) as seen:
        got = _cogview_call(pipe, now)
    assert len(seen) == 4, f"{len(seen)} guided evaluations for 4 steps"
    fresh = tp.cogview4_pipeline()
    enable_sag(fresh, 0.75)
    torch.testing.assert_close(got, _cogview_call(fresh, now), rtol=0, atol=1e-6)


def test_pix2pix_cfg_switched_off_mid_run_is_one_way(monkeypatch):
    """SD InstructPix2Pix reads its live do_classifier_free_guidance property: after a callback switches CFG off
    (and cuts the embeddings to one way), the 3-row batch of 3 images is one way, not 3 ways whose row 2 would
    guide rows 0 and 1 (other images)."""
    pipe = tp.sd_pix2pix_pipeline()
    enable_sag(pipe, 0.75)

    def cfg_off(p, i, t, kw):
        if i == 0:
            p._guidance_scale = 0.0
            return {"prompt_embeds": kw["prompt_embeds"].chunk(3)[0], "image_latents": kw["image_latents"].chunk(3)[0]}
        return {}

    image = torch.rand(3, 3, 64, 64, generator=gen(3))
    with spy_guided(monkeypatch) as seen:
        pipe(["a cat"] * 3, image=image, guidance_scale=5.0, image_guidance_scale=1.5, num_inference_steps=2,
             output_type="latent", generator=gen(0), callback_on_step_end=cfg_off,
             callback_on_step_end_tensor_inputs=["prompt_embeds", "image_latents"])
    assert [(s["rows"], s["ways"]) for s in seen] == [(9, 3), (3, 1)]


# ------------------------------------------------------------------- changed since enable_sag: refused at the call
def test_diffusers_cache_is_refused_at_enable_sag_and_at_the_call():
    """Pyramid Attention Broadcast (and diffusers' other caches) reuse activations across the denoiser's calls, so
    SAG's extra forward would be served another call's attention: refused at enable_sag, and before a call samples
    when enabled since; disable_cache() lifts it."""
    from diffusers import PyramidAttentionBroadcastConfig

    pipe = tp.cogview4_pipeline()
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                             spatial_attention_timestep_skip_range=(-1, 1001),
                                             current_timestep_callback=lambda: pipe.current_timestep)
    pipe.transformer.enable_cache(config)
    with pytest.raises(ValueError, match=r"pipe.transformer has a diffusers cache enabled \(pyramid_attention_broad"
                                         r"cast.*disable_cache\(\)"):
        enable_sag(pipe, 0.75)
    pipe.transformer.disable_cache()
    enable_sag(pipe, 0.75)
    plain_calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: plain_calls.append(1), with_kwargs=True)
    pipe.transformer.enable_cache(config)
    with pytest.raises(ValueError, match="pipe.transformer has a diffusers cache enabled"):
        _cogview_call(pipe, 4.0)
    assert plain_calls == []
    pipe.transformer.disable_cache()
    _cogview_call(pipe, 4.0)
    assert plain_calls
    disable_sag(pipe)


def test_unsupported_scheduler_swapped_in_is_refused_before_sampling():
    from diffusers import EDMEulerScheduler

    pipe = tp.cogview4_pipeline()
    enable_sag(pipe, 0.75)
    pipe.scheduler = EDMEulerScheduler()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match="scheduler EDMEulerScheduler is not supported"):
        _cogview_call(pipe, 4.0)
    assert calls == []


def test_a_second_call_while_one_runs_is_refused():
    """A call made while the pipeline's SAG call runs (here from a step-end callback; another thread is the same
    case) would share that call's scheduler and SAG's per-call records: refused, and the running call completes
    as if it had not been tried."""
    pipe = tp.cogview4_pipeline()
    enable_sag(pipe, 0.75)
    want = _cogview_call(pipe, 4.0)
    errors = []

    def reenter(p, i, t, kw):
        try:
            _cogview_call(p, 4.0)
        except RuntimeError as exc:
            errors.append(str(exc))
        return {}

    got = _cogview_call(pipe, 4.0, callback_on_step_end=reenter)
    assert len(errors) == 4 and "already running a call" in errors[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _cogview_call(pipe, 4.0)  # and the pipeline is free again
