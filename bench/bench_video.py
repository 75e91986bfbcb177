"""End to end on video: one sampling step of a Wan-2.1-1.3B-sized and a Wan-2.1-14B-sized WanTransformer3DModel
(the real models' configs, random weights built on the GPU in bf16, nothing downloaded) at 480p x 81 frames
(latents 21x60x104, 21x30x52 = 32760 tokens), with no guidance, with CFG (true CFG: a conditional and an
unconditional call per step) and with SAG (`sag_fast.enable_sag`): step time, SAG's overhead against its floor
(three batch-1 calls per step against two: 1.5x CFG), the mask's share of the SAG step, and the peak memory.
The pipeline runs with prompt embeddings of the real shape (512 UMT5 tokens of 4096) and `output_type="latent"`,
so only the denoising loop is timed. On a CPU the rows are recorded as skipped (GPU only); a tiny config runs the
same code path there (test_video_rows_code_path_on_a_tiny_config).
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch
from bench_e2e import peak_memory
from conftest import QUICK, record_e2e, time_fn

from sag_fast.capture import AttentionCapture
from sag_fast.diffusers import disable_sag, enable_sag

HAS_CUDA = torch.cuda.is_available()
STEPS = 2  # a 14B step at 32760 tokens takes seconds: two steps a call, a few calls a variant
SAG_SCALE = 0.75

_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_1_3B = dict(_WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30)    # dim 1536
WAN_14B = dict(_WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40)    # dim 5120
VIDEO_480P = dict(height=480, width=832, num_frames=81)                       # latents 21 x 60 x 104
MODELS = {"Wan-1.3B-sized, 480p x 81 frames": WAN_1_3B}
if not QUICK:  # minutes of GPU time: the full run only
    MODELS["Wan-14B-sized, 480p x 81 frames"] = WAN_14B
VARIANTS = [("no guidance", None), ("CFG (true, 2 calls)", None), ("sag_fast SAG+CFG", "CFG (true, 2 calls)")]


@contextlib.contextmanager
def built(config: dict, device, dtype, text_tokens: int = 512):
    """A WanPipeline around a randomly initialised WanTransformer3DModel (no text encoder, no VAE: prompt
    embeddings in, latents out), built directly in `dtype` on `device` (a 14B model in fp32 would not fit)."""
    import diffusers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = diffusers.WanTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(default)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device).manual_seed(0)
    emb = lambda: torch.randn(1, text_tokens, config["text_dim"], device=device, dtype=dtype, generator=g)  # noqa: E731
    try:
        yield pipe, dict(prompt_embeds=emb(), negative_prompt_embeds=emb())
    finally:
        del pipe, model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def mask_timer(device):
    """Seconds spent in SAG's mask computation (AttentionCapture._compute), synchronised around each call: used
    on a separate, untimed run, since the syncs cost time of their own."""
    seen = {"seconds": 0.0, "calls": 0}
    original = AttentionCapture._compute
    is_cuda = torch.device(device).type == "cuda"

    def timed(self, *args, **kwargs):
        if is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if is_cuda:
                torch.cuda.synchronize()
            seen["seconds"] += time.perf_counter() - start
            seen["calls"] += 1

    AttentionCapture._compute = timed
    try:
        yield seen
    finally:
        AttentionCapture._compute = original


def measure(config: dict, device, dtype, size: dict, steps: int, text_tokens: int = 512) -> dict:
    """{variant: (seconds per step, peak bytes, memory kind)} and the mask's share of the SAG step."""
    results, mask_share = {}, None
    with built(config, device, dtype, text_tokens) as (pipe, kw):
        kw = dict(kw, **size, num_inference_steps=steps, output_type="latent")
        for variant, _ in VARIANTS:
            fn = (lambda: pipe(**kw, guidance_scale=1.0)) if variant == "no guidance" else \
                (lambda: pipe(**kw, guidance_scale=5.0))
            if "SAG" in variant:
                enable_sag(pipe, SAG_SCALE)
            try:
                seconds = time_fn(fn, device, warmup=1, min_time=0.0)
                peak, mem_kind = peak_memory(fn, torch.device(device))
                if "SAG" in variant:
                    with mask_timer(device) as masks:
                        fn()
                    assert masks["calls"] == steps, masks  # one mask per step (the unconditional call's)
                    mask_share = masks["seconds"] / steps / (seconds / steps)
            finally:
                disable_sag(pipe)
            results[variant] = (seconds / steps, peak, mem_kind)
    return {"steps": results, "mask_share": mask_share}


@pytest.mark.parametrize("model", list(MODELS))
def test_video_step(model: str):
    if not HAS_CUDA:
        for variant, baseline in VARIANTS:
            record_e2e(model, variant, None, steps=STEPS, baseline=baseline,
                       note="skipped: GPU only (a Wan-sized transformer at 480p x 81 frames in bf16)")
        pytest.skip("GPU only: Wan-sized transformers at 480p x 81 frames")
    out = measure(MODELS[model], "cuda", torch.bfloat16, VIDEO_480P, STEPS)
    cfg = out["steps"]["CFG (true, 2 calls)"][0]
    for variant, baseline in VARIANTS:
        step, peak, mem_kind = out["steps"][variant]
        note = f"{STEPS} steps, bf16, random weights"
        if "SAG" in variant:
            note += (f"; floor 1.5x CFG, measured {step / cfg:.2f}x; mask {100 * out['mask_share']:.1f}% of the "
                     "SAG step")
        record_e2e(model, variant, step, steps=STEPS, baseline=baseline, peak_bytes=peak, mem_kind=mem_kind,
                   note=note, mask_share=out["mask_share"] if "SAG" in variant else None)
        print(f"\n[bench_video] {model} / {variant}: {step * 1e3:.1f} ms/step")


def test_video_rows_code_path_on_a_tiny_config():
    """The GPU rows' code, on a tiny config on this machine's device (nothing recorded): every variant times,
    the SAG run computes one mask per step, and the mask's share is a fraction of the step."""
    tiny = dict(_WAN, attention_head_dim=8, num_attention_heads=2, ffn_dim=32, num_layers=2, text_dim=32,
                freq_dim=16, rope_max_seq_len=32)
    device = "cuda" if HAS_CUDA else "cpu"
    out = measure(tiny, device, torch.float32, dict(height=64, width=64, num_frames=5), steps=2, text_tokens=8)
    assert set(out["steps"]) == {v for v, _ in VARIANTS}
    assert all(step > 0 for step, _, _ in out["steps"].values())
    assert 0 < out["mask_share"] < 1
