"""End to end on the transformer / flow-matching families: one sampling step of an SD3-medium-sized and a
Flux.1-sized transformer at 1024x1024 (random weights built on the GPU from their configs, bf16, nothing
downloaded), with no guidance, with CFG, and with SAG (`sag_fast.enable_sag`), plus the peak memory.

The floors: batched CFG + SAG costs a batch-2 and a batch-1 forward per step (>= 1.5x CFG where a forward's time
is proportional to its batch); SAG on guidance-distilled Flux one batch-1 forward more (2x no guidance); Flux
true CFG + SAG three batch-1 calls per step (1.5x true CFG). The pipelines run with prompt embeddings of the
real shapes (SD3: 77 CLIP + 256 T5 tokens; Flux: 512 T5 tokens) and `output_type="latent"`, so only the
denoising loop is timed. On a CPU the rows are recorded as skipped (GPU only).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from bench_e2e import peak_memory
from conftest import QUICK, record_e2e, time_fn

from sag_fast.diffusers import disable_sag, enable_sag

HAS_CUDA = torch.cuda.is_available()
STEPS = 4 if QUICK else 8
SAG_SCALE = 0.75

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)  # ~2.0B
FLUX_1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))  # ~11.9B

MODELS = {"SD3-medium-sized, 1024x1024": "sd3", "Flux.1-sized, 1024x1024": "flux"}
VARIANTS = {
    "sd3": [("no guidance", None), ("CFG", None), ("sag_fast SAG+CFG", "CFG")],
    "flux": [("no guidance (distilled)", None), ("sag_fast SAG (distilled)", "no guidance (distilled)"),
             ("true CFG", None), ("sag_fast SAG+true CFG", "true CFG")],
}


@contextlib.contextmanager
def _built(kind: str):
    """The pipeline (no text encoders, no VAE: prompt embeddings in, latents out) and its call kwargs."""
    import diffusers

    device, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device).manual_seed(0)
    if kind == "sd3":
        with torch.device(device):
            model = diffusers.SD3Transformer2DModel(**SD3_MEDIUM).to(dtype)
        pipe = diffusers.StableDiffusion3Pipeline(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None)
        emb = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
        kw = dict(prompt_embeds=emb(1, 333, 4096), negative_prompt_embeds=emb(1, 333, 4096),
                  pooled_prompt_embeds=emb(1, 2048), negative_pooled_prompt_embeds=emb(1, 2048))
    else:
        with torch.device(device):
            model = diffusers.FluxTransformer2DModel(**FLUX_1).to(dtype)
        pipe = diffusers.FluxPipeline(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None)
        pipe.vae_scale_factor = 8  # what its VAE gives (no VAE is built here)
        emb = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
        kw = dict(prompt_embeds=emb(1, 512, 4096), pooled_prompt_embeds=emb(1, 768))
    pipe.set_progress_bar_config(disable=True)
    kw.update(height=1024, width=1024, num_inference_steps=STEPS, output_type="latent")
    try:
        yield pipe, kw, emb
    finally:
        del pipe, model
        torch.cuda.empty_cache()


def _call(kind: str, variant: str, pipe, kw, emb):
    if kind == "sd3":
        return lambda: pipe(guidance_scale=1.0 if variant == "no guidance" else 7.0, **kw)
    if "true CFG" in variant:
        neg = dict(negative_prompt_embeds=emb(1, 512, 4096), negative_pooled_prompt_embeds=emb(1, 768),
                   true_cfg_scale=4.0)
        return lambda: pipe(**kw, **neg)
    return lambda: pipe(**kw)


@pytest.mark.parametrize("model", list(MODELS))
def test_transformer_step(model: str):
    kind = MODELS[model]
    if not HAS_CUDA:
        for variant, baseline in VARIANTS[kind]:
            record_e2e(model, variant, None, steps=STEPS, baseline=baseline,
                       note="skipped: GPU only (an SD3/Flux-sized transformer at 1024x1024 in bf16)")
        pytest.skip("GPU only: SD3/Flux-sized transformers at 1024x1024")
    with _built(kind) as (pipe, kw, emb):
        for variant, baseline in VARIANTS[kind]:
            fn = _call(kind, variant, pipe, kw, emb)
            if "sag_fast" in variant:
                enable_sag(pipe, SAG_SCALE)
            try:
                seconds = time_fn(fn, "cuda", warmup=1)
                peak, mem_kind = peak_memory(fn, torch.device("cuda"))
            finally:
                disable_sag(pipe)
            record_e2e(model, variant, seconds / STEPS, steps=STEPS, baseline=baseline, peak_bytes=peak,
                       mem_kind=mem_kind, note=f"{STEPS} steps, bf16, random weights")
            print(f"\n[bench_transformers] {model} / {variant}: {seconds / STEPS * 1e3:.1f} ms/step")
