"""SAG on video (issue 16): Wan 2.1 text-to-video, AnimateDiff and HunyuanVideo through their registry records. The latents are (B, C, F, H, W);
the mask comes from the middle block's self-attention over the (f, h, w) token grid; the degrade blurs each frame.
Wan's CFG is two calls per step (conditional, then unconditional): the second runs the degraded forward and both
predictions get the same shift. Tested as the image families are: scale 0 and disable_sag bit-exact, SAG's effect,
batch invariance, the window, what the extra forward receives, one guided call against the float64 reference."""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from sag_fast import reference
from sag_fast.diffusers import disable_sag, enable_sag, last_mask
from sag_fast.diffusers.tiny import tiny_wan_pipeline
from test_diffusers_transformers import flow_coefficients, plain_replay, recorded_calls

GRID = (2, 4, 4)  # tokens of 5 frames (2 latent frames) at 64x64 (8x8 latents, 2x2 patches)


@contextlib.contextmanager
def spied_forward(cls):
    """Records the keyword arguments (tensors cloned) of every forward of model class `cls` while inside."""
    seen = []
    original = cls.forward

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        return original(self, *args, **kwargs)

    cls.forward = spy
    try:
        yield seen
    finally:
        cls.forward = original


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _embeds(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, 32, generator=g), torch.randn(batch, 6, 32, generator=g)


def frames(pipe, batch=1, seed=0, embeds=None, **kw):
    pe, ne = embeds if embeds is not None else _embeds(batch)
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(seed),
                **{**call, **kw}).frames


@functools.lru_cache(maxsize=1)
def _plain():
    return frames(tiny_wan_pipeline())


def test_wan_scale_zero_and_disable_are_exact_and_sag_changes_the_video():
    pipe = tiny_wan_pipeline()
    plain = _plain()
    enable_sag(pipe, 1.0)
    guided = frames(pipe)
    assert guided.shape == plain.shape == (1, 4, 2, 8, 8)
    assert (guided - plain).abs().max() > 1e-2
    mask = last_mask(pipe)
    assert mask.shape == (1, *GRID) and mask.any() and not mask.all()
    enable_sag(pipe, 0.0)
    assert torch.equal(frames(pipe), plain)
    disable_sag(pipe)
    assert torch.equal(frames(pipe), plain)


def test_wan_batch_invariance_and_window():
    pipe = tiny_wan_pipeline()
    enable_sag(pipe, 1.0)
    one = _embeds(1, seed=3)
    other = _embeds(1, seed=4)
    # the pipeline draws the batch's noise from one generator: give each row its own by passing latents
    g = torch.Generator().manual_seed(0)
    noise_one = torch.randn(1, 4, 2, 8, 8, generator=g)
    noise_other = torch.randn(1, 4, 2, 8, 8, generator=g)
    alone = frames(pipe, embeds=one, latents=noise_one)
    both = frames(pipe, embeds=(torch.cat([other[0], one[0]]), torch.cat([other[1], one[1]])),
                  latents=torch.cat([noise_other, noise_one]))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)
    # the window: SAG on the first step only differs from SAG everywhere and from none
    enable_sag(pipe, 1.0, stop=0.34)
    first_only = frames(pipe, embeds=one, latents=noise_one)
    disable_sag(pipe)
    plain = frames(pipe, embeds=one, latents=noise_one)
    assert (first_only - alone).abs().max() > 1e-4 and (first_only - plain).abs().max() > 1e-4


def test_wan_extra_forward_gets_the_unconditional_embeddings_and_a_degraded_video():
    pipe = tiny_wan_pipeline()
    pe, ne = _embeds(2)
    with spied_forward(type(pipe.transformer)) as seen:
        enable_sag(pipe, 1.0)  # the hook wraps the spy
        frames(pipe, embeds=(pe, ne), num_inference_steps=2)
    assert len(seen) == 6  # per step: cond, uncond (guided), degraded
    for step in range(2):
        cond, uncond, degraded = seen[3 * step: 3 * step + 3]
        assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(uncond["encoder_hidden_states"], ne)
        assert torch.equal(degraded["encoder_hidden_states"], ne)
        assert torch.equal(degraded["timestep"], uncond["timestep"])
        assert degraded["hidden_states"].shape == uncond["hidden_states"].shape == (2, 4, 2, 8, 8)
        if step:  # at the first step sigma = 1: x0's estimate, so the degrade, is 0
            assert not torch.equal(degraded["hidden_states"], uncond["hidden_states"])


def test_wan_guided_call_equals_the_float64_reference():
    """The unconditional call of the second step: the mask from the middle block's self-attention q/k (3-D grid,
    materialised probabilities), reference.degrade per frame with flow (c1, c2) at the step's sigma, the degraded
    forward, reference.guidance_shift."""
    pipe = tiny_wan_pipeline(dtype=torch.float64)
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    pe, ne = _embeds(1)
    frames(pipe, embeds=(pe.double(), ne.double()))
    # step 1: [cond, uncond] calls; the uncond call is the guided one
    kwargs, x, guided, out, qk = plain_replay(pipe, seen, 3)
    sigma = float(pipe.scheduler.sigmas[1])
    q, k, scale = qk[2]  # blocks.1.attn1 (each block: self-attention, then cross-attention)
    mask = reference.mass_to_mask(reference.attention_mass_from_qk(q, k, scale), GRID)
    assert mask.any() and not mask.all()
    c1, c2 = (c.float().double() for c in flow_coefficients(sigma))  # the step's coefficients are fp32 values
    x_deg = reference.degrade(x, out, mask, c1, c2)
    with torch.no_grad():
        degraded = model(hidden_states=x_deg, return_dict=False, **kwargs)[0]
    want = reference.guidance_shift(out, degraded, 0.9)
    torch.testing.assert_close(guided, want, rtol=1e-9, atol=1e-9)


def test_wan22_two_experts_are_both_guided():
    """Wan 2.2 switches from `transformer` to `transformer_2` at boundary_ratio: each gets the hook and a capture on
    the same layer path; every step of either expert runs its degraded forward on that expert."""
    pipe = tiny_wan_pipeline(two_experts=True)
    plain = frames(pipe, num_inference_steps=4)
    enable_sag(pipe, 1.0)
    counts = {"transformer": [], "transformer_2": []}
    handles = [getattr(pipe, name).patch_embedding.register_forward_pre_hook(
        lambda m, a, name=name: counts[name].append(a[0].shape[0])) for name in counts]
    try:
        guided = frames(pipe, num_inference_steps=4)
    finally:
        for h in handles:
            h.remove()
    # per step of an expert: the conditional call, the unconditional one, the degraded one
    assert len(counts["transformer"]) % 3 == 0 and len(counts["transformer_2"]) % 3 == 0
    assert len(counts["transformer"]) >= 3 and len(counts["transformer_2"]) >= 3
    assert len(counts["transformer"]) + len(counts["transformer_2"]) == 12
    assert (guided - plain).abs().max() > 1e-2
    enable_sag(pipe, 0.0)
    assert torch.equal(frames(pipe, num_inference_steps=4), plain)
    disable_sag(pipe)
    assert torch.equal(frames(pipe, num_inference_steps=4), plain)
    for name in counts:
        registry = vars(getattr(pipe, name)).get("_diffusers_hook")
        assert registry is None or not registry.hooks


# ------------------------------------------------------------------------------------------ AnimateDiff
def _animatediff(pipe, prompt="a cat", **kw):
    call = dict(num_frames=3, height=64, width=64, num_inference_steps=3, output_type="latent")
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**call, **kw}).frames


def test_animatediff_exact_when_off_and_one_mask_per_frame():
    import tiny_pipelines as tp

    pipe = tp.animatediff_pipeline()
    plain = _animatediff(pipe)
    enable_sag(pipe, 1.0)
    guided = _animatediff(pipe)
    assert (guided - plain).abs().max() > 1e-2
    mask = last_mask(pipe)
    assert mask.shape == (1, 3, 4, 4)  # (uncond rows, frames, the mid block's 4x4 grid)
    enable_sag(pipe, 0.0)
    assert torch.equal(_animatediff(pipe), plain)
    disable_sag(pipe)
    assert torch.equal(_animatediff(pipe), plain)


def test_animatediff_guided_call_equals_the_float64_reference():
    """The UNet folds the frames into its batch (b-major): the uncond way's F rows of the mid-block spatial
    self-attention give one mask per frame; the text, repeated per frame by the pipeline, is cut per (row, frame);
    reference.degrade per frame with DDIM's (c1, c2); reference.guidance_shift."""
    import tiny_pipelines as tp
    from diffusers_checks import plain_forward, record_call

    pipe = tp.animatediff_pipeline()
    enable_sag(pipe, 0.9)
    unet = pipe.unet
    with record_call(unet, 1, pipe.scheduler) as rec:  # the second step (one UNet call per step, CFG batched)
        _animatediff(pipe)
    (x, t), kwargs, guided = rec["args"], rec["kwargs"], rec["output"]
    disable_sag(pipe)
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    seen = {}
    handles = [attn.to_q.register_forward_hook(lambda m, a, o: seen.setdefault("q", o)),
               attn.to_k.register_forward_hook(lambda m, a, o: seen.setdefault("k", o))]
    try:
        out = plain_forward(unet, x, t, **kwargs)
    finally:
        for h in handles:
            h.remove()
    frames_ = x.shape[2]
    rows = slice(0, frames_)  # the unconditional way (batch 1): its frames, b-major
    q = attn.head_to_batch_dim(seen["q"][rows].double())
    k = attn.head_to_batch_dim(seen["k"][rows].double())
    mass = reference.attention_mass(attn.get_attention_scores(q, k, None), heads=attn.heads)
    mask = reference.mass_to_mask(mass, (4, 4)).unsqueeze(0)  # (1, F, 4, 4)
    assert mask.any() and not mask.all()
    a = pipe.scheduler.alphas_cumprod[int(t)].double()
    c1, c2 = (c.float().double() for c in reference.signal_coefficients(a.sqrt(), (1 - a).sqrt(), "epsilon"))
    x_deg = reference.degrade(x[:1].double(), out[:1].double(), mask, c1, c2).float()
    cut = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:frames_]}
    degraded = plain_forward(unet, x_deg, t, **cut)
    want = reference.guidance_shift(out.double(), degraded.double(), 0.9).float()
    torch.testing.assert_close(guided, want, rtol=0, atol=2e-5)


def test_animatediff_free_init_guides_every_iteration():
    """FreeInit runs the whole schedule several times in one call: the window is read from the timestep's place in
    the schedule, so every iteration is guided (a count of model calls would put the second one past the end)."""
    import tiny_pipelines as tp

    pipe = tp.animatediff_pipeline()
    pipe.enable_free_init(num_iters=2, use_fast_sampling=False)
    enable_sag(pipe, 1.0)
    batches = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        _animatediff(pipe)
    finally:
        handle.remove()
    # 2 iterations x 3 steps x [the CFG batch of 2 rows x 3 frames, the degraded uncond row x 3 frames]
    assert batches == [6, 3] * 6, batches


# --------------------------------------------------------------------------------------------- Wan I2V
def _i2v(pipe, batch=1, seed=0, embeds=None, image_seed=7, **kw):
    """Wan image-to-video: the transformer input is [x_t (4), mask (4), image latent (4)] (12 ch), its output 4."""
    pe, ne = embeds if embeds is not None else _embeds(batch)
    g = torch.Generator().manual_seed(image_seed)
    image = kw.pop("image", None)
    image = torch.rand(1, 3, 64, 64, generator=g) if image is None else image
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    return pipe(image=image, prompt_embeds=pe, negative_prompt_embeds=ne,
                generator=torch.Generator().manual_seed(seed), **{**call, **kw}).frames


@functools.lru_cache(maxsize=1)
def _i2v_pipe():
    from sag_fast.diffusers.tiny import tiny_wan_i2v_pipeline

    return tiny_wan_i2v_pipeline()


@pytest.fixture
def i2v():
    pipe = _i2v_pipe()
    yield pipe
    disable_sag(pipe)


def test_wan_i2v_exact_when_off_sag_changes_the_video_and_batch_invariance(i2v):
    plain = _i2v(i2v)
    enable_sag(i2v, 1.0)
    guided = _i2v(i2v)
    assert guided.shape == plain.shape == (1, 4, 2, 8, 8)
    assert (guided - plain).abs().max() > 1e-2
    mask = last_mask(i2v)
    assert mask.shape == (1, *GRID) and mask.any() and not mask.all()
    # batch invariance: a row's video does not depend on the other rows (own noise, own text, the same image)
    one, other = _embeds(1, seed=3), _embeds(1, seed=4)
    g = torch.Generator().manual_seed(0)
    noise_one, noise_other = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
    alone = _i2v(i2v, embeds=one, latents=noise_one)
    both = _i2v(i2v, embeds=(torch.cat([other[0], one[0]]), torch.cat([other[1], one[1]])),
                latents=torch.cat([noise_other, noise_one]))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)
    enable_sag(i2v, 0.0)
    assert torch.equal(_i2v(i2v), plain)
    disable_sag(i2v)
    assert torch.equal(_i2v(i2v), plain)


def test_wan_i2v_extra_forward_degrades_only_the_latent_channels(i2v):
    """Per step: the conditional call, the unconditional (guided) one, the degraded one. The degraded forward gets
    the unconditional text, the same CLIP image tokens and timestep, the conditioning channels (mask + image
    latent) unchanged, and a degraded x_t."""
    pe, ne = _embeds(2)
    with spied_forward(type(i2v.transformer)) as seen:
        enable_sag(i2v, 1.0)  # the hook wraps the spy
        _i2v(i2v, embeds=(pe, ne))
    assert len(seen) == 6
    for step in range(2):
        cond, uncond, degraded = seen[3 * step: 3 * step + 3]
        assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(uncond["encoder_hidden_states"], ne)
        assert torch.equal(degraded["encoder_hidden_states"], ne)
        assert degraded["encoder_hidden_states_image"].shape[0] == 2
        assert torch.equal(degraded["encoder_hidden_states_image"], uncond["encoder_hidden_states_image"])
        assert torch.equal(degraded["timestep"], uncond["timestep"])
        x, xd = uncond["hidden_states"], degraded["hidden_states"]
        assert xd.shape == x.shape == (2, 12, 2, 8, 8)
        assert torch.equal(xd[:, 4:], x[:, 4:])  # mask and image latent pass through
        if step:
            assert not torch.equal(xd[:, :4], x[:, :4])


def test_wan_i2v_guided_call_equals_the_float64_reference():
    """The unconditional call of the second step: the mask from the middle block's self-attention, reference.degrade
    of the latent channels only (the conditioning channels appended unchanged), the degraded forward with the
    same image tokens, reference.guidance_shift."""
    from sag_fast.diffusers.tiny import tiny_wan_i2v_pipeline

    pipe = tiny_wan_i2v_pipeline(dtype=torch.float64)
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    pe, ne = _embeds(1)
    _i2v(pipe, embeds=(pe.double(), ne.double()), image=torch.rand(1, 3, 64, 64).double())
    kwargs, x, guided, out, qk = plain_replay(pipe, seen, 3)
    sigma = float(pipe.scheduler.sigmas[1])
    # per block: the self-attention over the 32 video tokens, then cross-attention to the image and text tokens
    self_attention = [c for c in qk if c[1].shape[-2] == 32]
    assert len(self_attention) == 3 and len(qk) > 3
    q, k, scale = self_attention[1]  # blocks.1.attn1
    mask = reference.mass_to_mask(reference.attention_mass_from_qk(q, k, scale), GRID)
    assert mask.any() and not mask.all()
    c1, c2 = (c.float().double() for c in flow_coefficients(sigma))
    x_deg = torch.cat([reference.degrade(x[:, :4], out, mask, c1, c2), x[:, 4:]], dim=1)
    with torch.no_grad():
        degraded = model(hidden_states=x_deg, return_dict=False, **kwargs)[0]
    want = reference.guidance_shift(out, degraded, 0.9)
    torch.testing.assert_close(guided, want, rtol=1e-9, atol=1e-9)


def test_wan22_i2v_two_experts_without_image_tokens():
    """Wan 2.2 I2V A14B: no CLIP image tokens, two experts, both guided; scale 0 exact."""
    from sag_fast.diffusers.tiny import tiny_wan_i2v_pipeline

    pipe = tiny_wan_i2v_pipeline(image_embeds=False, two_experts=True)
    plain = _i2v(pipe, num_inference_steps=4)
    enable_sag(pipe, 1.0)
    counts = {"transformer": 0, "transformer_2": 0}
    handles = [getattr(pipe, name).patch_embedding.register_forward_pre_hook(
        lambda m, a, name=name: counts.__setitem__(name, counts[name] + 1)) for name in counts]
    try:
        guided = _i2v(pipe, num_inference_steps=4)
    finally:
        for h in handles:
            h.remove()
    assert counts["transformer"] >= 3 and counts["transformer_2"] >= 3 and sum(counts.values()) == 12
    assert (guided - plain).abs().max() > 1e-2
    enable_sag(pipe, 0.0)
    assert torch.equal(_i2v(pipe, num_inference_steps=4), plain)


@pytest.mark.parametrize("i2v_pipe", [False, True])
def test_wan22_expand_timesteps_refused_at_enable(i2v_pipe):
    """Wan 2.2 TI2V-5B (expand_timesteps): per-token timesteps, the clean first frame at t = 0; refused, naming
    the config key."""
    from sag_fast.diffusers.tiny import tiny_wan_i2v_pipeline

    pipe = tiny_wan_i2v_pipeline(image_embeds=False) if i2v_pipe else tiny_wan_pipeline()
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match=r"expand_timesteps=True.*per token.*not supported"):
        enable_sag(pipe, 1.0)
    assert vars(pipe.transformer).get("_diffusers_hook") is None or not vars(pipe.transformer)["_diffusers_hook"].hooks


# ----------------------------------------------------------------------- refused video families
def _bare(pipeline: str, transformer: str, config: dict, scheduler):
    """The pipeline class around a tiny transformer and a scheduler, its other components None (enough for
    enable_sag to decide)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline)
    components = {p: None for p in inspect.signature(cls.__init__).parameters if p != "self"}
    return cls(**{**components, "transformer": getattr(diffusers, transformer)(**config), "scheduler": scheduler})


@pytest.mark.parametrize("pipeline, transformer, config, scheduler, why", [
    ("LTXPipeline", "LTXVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16), "FlowMatchEulerDiscreteScheduler", "packed as 3-D token sequences"),
    ("CogVideoXPipeline", "CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=16), "CogVideoXDDIMScheduler", "frames before channels"),
])
def test_video_families_refused_with_their_reason(pipeline, transformer, config, scheduler, why):
    """Each refusal record's own reason reaches the user at enable_sag (before the video rule's generic one and
    before the scheduler check), and nothing stays installed."""
    import diffusers

    with torch.random.fork_rng(devices=[]):  # the random weights leave the test session's RNG alone
        torch.manual_seed(0)
        pipe = _bare(pipeline, transformer, config, getattr(diffusers, scheduler)())
    with pytest.raises(ValueError, match=f"^{pipeline}: .*{why}.*not supported"):
        enable_sag(pipe, 1.0)
    registry = vars(pipe.transformer).get("_diffusers_hook")
    assert registry is None or not registry.hooks
    assert type(pipe).__name__ == pipeline and "_sag_base_class" not in vars(type(pipe))


# ------------------------------------------------------------------------------------------ HunyuanVideo
def _hunyuan_embeds(batch=1, seed=1, valid=(4,), negative=True):
    """Prompt embeddings (B, 6, 32) with their attention masks (row b: valid[b] tokens, the rest right padding,
    as the Llama tokenizer pads) and pooled embeddings (B, 8); the negative ones too (true CFG)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix in ("", "negative_") if negative else ("",):
        mask = torch.zeros(batch, 6)
        for b in range(batch):
            mask[b, :valid[b % len(valid)]] = 1
        out.update({f"{prefix}prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                    f"{prefix}prompt_attention_mask": mask,
                    f"{prefix}pooled_prompt_embeds": torch.randn(batch, 8, generator=g)})
    return out


def hunyuan_frames(pipe, embeds=None, seed=0, **kw):
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=3, true_cfg_scale=4.0, output_type="latent")
    embeds = _hunyuan_embeds() if embeds is None else embeds
    return pipe(**embeds, generator=torch.Generator().manual_seed(seed), **{**call, **kw}).frames


def test_hunyuan_video_scale_zero_and_disable_are_exact_and_sag_changes_the_video():
    """True CFG (a negative prompt, true_cfg_scale > 1: cond call, then uncond call) and the guidance-distilled
    default (one call per step, the `guidance` embedding): scale 0 and disable_sag are bit-exact, SAG changes the
    video, the mask lies on the (2, 4, 4) video-token grid of the middle double-stream block's joint attention."""
    from sag_fast.diffusers.tiny import tiny_hunyuan_video_pipeline

    pipe = tiny_hunyuan_video_pipeline()
    distilled = dict(embeds=_hunyuan_embeds(negative=False), true_cfg_scale=1.0)
    plain, plain_distilled = hunyuan_frames(pipe), hunyuan_frames(pipe, **distilled)
    assert (plain - plain_distilled).abs().max() > 1e-3  # true CFG really ran
    enable_sag(pipe, 1.0)
    assert vars(pipe)["_sag_fast_state"].joint_layout == "image_first"
    guided = hunyuan_frames(pipe)
    assert guided.shape == plain.shape == (1, 4, 2, 8, 8) and (guided - plain).abs().max() > 1e-2
    mask = last_mask(pipe)
    assert mask.shape == (1, *GRID) and mask.any() and not mask.all()
    assert (hunyuan_frames(pipe, **distilled) - plain_distilled).abs().max() > 1e-2
    enable_sag(pipe, 0.0)
    assert torch.equal(hunyuan_frames(pipe), plain)
    disable_sag(pipe)
    assert torch.equal(hunyuan_frames(pipe), plain)
    assert torch.equal(hunyuan_frames(pipe, **distilled), plain_distilled)


def test_hunyuan_video_batch_invariance_with_different_text_padding():
    """Two prompts with different padding lengths in one batch: each row's key mask is its own, so the row guided
    alone and in the batch agree."""
    from sag_fast.diffusers.tiny import tiny_hunyuan_video_pipeline

    pipe = tiny_hunyuan_video_pipeline()
    enable_sag(pipe, 1.0)
    both = _hunyuan_embeds(batch=2, seed=5, valid=(2, 5))
    one = {k: v[1:] for k, v in both.items()}
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 2, 8, 8, generator=g)
    alone = hunyuan_frames(pipe, embeds=one, latents=noise[1:])
    batched = hunyuan_frames(pipe, embeds=both, latents=noise)
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-5)


def test_hunyuan_video_extra_forward_gets_exactly_the_unconditional_arguments():
    """Per step: the conditional call, the unconditional call (guided) and the degraded one, which gets the
    unconditional call's embeddings, text mask, pooled embeddings, guidance and timestep, and a degraded video."""
    from sag_fast.diffusers.tiny import tiny_hunyuan_video_pipeline

    pipe = tiny_hunyuan_video_pipeline()
    embeds = _hunyuan_embeds(batch=2, valid=(3, 5))
    with spied_forward(type(pipe.transformer)) as seen:
        enable_sag(pipe, 1.0)  # the hook wraps the spy
        hunyuan_frames(pipe, embeds=embeds, num_inference_steps=2)
    assert len(seen) == 6
    names = ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
    fields = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    for step in range(2):
        cond, uncond, degraded = seen[3 * step: 3 * step + 3]
        for name, field in zip(names, fields):
            assert torch.equal(cond[name], embeds[field])
            assert torch.equal(uncond[name], embeds[f"negative_{field}"])
            assert torch.equal(degraded[name], uncond[name])
        for name in ("guidance", "timestep"):
            assert torch.equal(degraded[name], uncond[name])
        assert degraded["hidden_states"].shape == uncond["hidden_states"].shape == (2, 4, 2, 8, 8)
        if step:  # at the first step sigma = 1: x0's estimate, so the degrade, is 0
            assert not torch.equal(degraded["hidden_states"], uncond["hidden_states"])


def test_hunyuan_video_guided_call_equals_the_float64_reference_with_the_text_mask():
    """The unconditional call of the second step, float64: the mask from the middle double-stream block's joint
    attention (video tokens first, then the 6 text tokens of which 4 are padding, dropped from the softmax by the
    key bias built here from the prompt's attention mask), reference.degrade per frame with flow (c1, c2) at the
    step's sigma, the degraded forward, reference.guidance_shift. Ignoring the padding gives another mask."""
    from sag_fast.diffusers.tiny import tiny_hunyuan_video_pipeline

    pipe = tiny_hunyuan_video_pipeline(dtype=torch.float64)
    enable_sag(pipe, 0.9)
    model = pipe.transformer
    seen = recorded_calls(model)
    embeds = {k: v.double() for k, v in _hunyuan_embeds(seed=5, valid=(2,)).items()}
    hunyuan_frames(pipe, embeds=embeds)
    kwargs, x, guided, out, qk = plain_replay(pipe, seen, 3)  # step 1: [cond, uncond]; uncond is guided
    n = 2 * 4 * 4
    joint = [(q, k, scale) for q, k, scale in qk if q.shape[2] == n + 6]  # the blocks' joint attention, in order
    assert len(joint) == 4  # 3 double-stream blocks, 1 single-stream block
    q, k, scale = joint[1]  # transformer_blocks.1, the middle one
    text = embeds["negative_prompt_attention_mask"]  # (1, 6): 2 tokens, 4 padding
    bias = torch.zeros(1, n + 6, dtype=torch.float64)
    bias[:, n:] = torch.where(text > 0, 0.0, float("-inf"))
    mass = reference.joint_attention_mass_from_qk(q, k, (0, n), scale, key_bias=bias)
    mask = reference.joint_mass_to_mask(mass, GRID)
    assert mask.any() and not mask.all()
    unmasked = reference.joint_mass_to_mask(reference.joint_attention_mass_from_qk(q, k, (0, n), scale), GRID)
    assert not torch.equal(unmasked, mask), "the padding does not change the mask: the test would not see it"
    sigma = float(pipe.scheduler.sigmas[1])
    c1, c2 = (c.float().double() for c in flow_coefficients(sigma))  # the step's coefficients are fp32 values
    x_deg = reference.degrade(x, out, mask, c1, c2)
    with torch.no_grad():
        degraded = model(hidden_states=x_deg, return_dict=False, **kwargs)[0]
    want = reference.guidance_shift(out, degraded, 0.9)
    torch.testing.assert_close(guided, want, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # a capture that ignored the padding would give this instead
        ignored = model(hidden_states=reference.degrade(x, out, unmasked, c1, c2), return_dict=False, **kwargs)[0]
    assert (reference.guidance_shift(out, ignored, 0.9) - guided).abs().max() > 1e-6


def test_wan22_expert_set_after_enable_sag_is_refused():
    """A second expert given to the pipeline after enable_sag would run unguided for its steps: refused at the call."""
    pipe = tiny_wan_pipeline(two_experts=True)
    second = pipe.transformer_2
    pipe.register_modules(transformer_2=None)
    enable_sag(pipe, 1.0)
    pipe.register_modules(transformer_2=second)
    with pytest.raises(RuntimeError, match="pipe.transformer_2 was set after enable_sag"):
        frames(pipe, num_inference_steps=2)
    enable_sag(pipe, 1.0)
    frames(pipe, num_inference_steps=2)
