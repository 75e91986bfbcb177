"""SAG under diffusers' context parallelism (CP): what the sharded mask adds to a step's communication, on paper, and
a Flux.1-sized transformer sampled with Ulysses and ring CP on >= 2 GPUs (skipped, and recorded as skipped, with
fewer).

On paper (from the models' configs, bf16 activations): per forward, every CP attention layer moves its q, k, v and
output through an all-to-all (Ulysses: each rank sends 4 x (S/N) x H x D x 2 bytes x (N-1)/N) or all-gathers the
keys and values (ring: each rank receives 2 x (N-1) x (S/N) x H x D x 2 bytes). SAG's mask adds one all-reduce of
one fp32 per image token per guided step (a ring all-reduce sends 2 (N-1)/N x 4 x I bytes per rank), whatever the
layer count. Flux.1 at 2048x2048: I = 128 x 128 = 16,384 image tokens + 512 text tokens, 24 x 128 = 3072, 57
attention layers (19 double-stream + 38 single-stream). Wan 2.1 14B at 1280x720 x 81 frames: 21 x 45 x 80 = 75,600
video tokens, 40 x 128 = 5120, 40 self-attention layers (its cross-attention is not sharded).
"""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
from conftest import QUICK, record_e2e

MODELS_ON_PAPER = {  # name: (tokens in the attention, image tokens, heads x head dim, CP attention layers)
    "Flux.1 2048x2048": (128 * 128 + 512, 128 * 128, 24 * 128, 19 + 38),
    "Wan 2.1 14B 1280x720x81": (21 * 45 * 80, 21 * 45 * 80, 40 * 128, 40),
}


def cp_traffic(tokens: int, image: int, width: int, layers: int, degree: int, kind: str, dtype_bytes: int = 2):
    """(bytes one rank sends per forward for the attention's own CP traffic, bytes it sends for SAG's all-reduce)."""
    local = tokens / degree * width * dtype_bytes
    per_layer = 4 * local * (degree - 1) / degree if kind == "ulysses" else 2 * local * (degree - 1)
    return per_layer * layers, 2 * (degree - 1) / degree * 4 * image


def test_cp_traffic_on_paper():
    for model, (tokens, image, width, layers) in MODELS_ON_PAPER.items():
        for degree in (2, 8):
            for kind in ("ulysses", "ring"):
                attention, sag = cp_traffic(tokens, image, width, layers, degree, kind)
                assert sag < 1e-4 * attention
                record_e2e(f"{model}, CP on paper", f"{kind}={degree}", None, on_paper=True,
                           note=f"per rank: attention {attention / 1e9:.2f} GB per forward; SAG's mask all-reduce "
                                f"{sag / 1e3:.1f} kB per step ({sag / attention:.1e} of one forward)")


# ------------------------------------------------------------------------------------------ >= 2 GPUs
FLUX_1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))
STEPS = 4 if QUICK else 8
MODEL = "Flux.1-sized, 1024x1024, context parallel"


def _rank(rank: int, world: int, rendezvous: str, outdir: str, kind: str) -> None:
    import diffusers

    from sag_fast import disable_sag, enable_sag

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    torch.distributed.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                         device_id=device)
    torch.manual_seed(0)  # the same random weights on every rank
    with torch.device(device):
        model = diffusers.FluxTransformer2DModel(**FLUX_1).to(torch.bfloat16)
    if kind == "ring":  # ring attention needs each chunk's log-sum-exp: the cuDNN backend gives it
        model.set_attention_backend("_native_cudnn")
    model.enable_parallelism(config=diffusers.ContextParallelConfig(**{f"{kind}_degree": world}))
    pipe = diffusers.FluxPipeline(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.vae_scale_factor = 8
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device).manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=g),
              pooled_prompt_embeds=torch.randn(1, 768, device=device, dtype=torch.bfloat16, generator=g),
              height=1024, width=1024, num_inference_steps=STEPS, output_type="latent")
    times = {}
    for variant, scale in (("no guidance (distilled)", None), ("sag_fast SAG (distilled)", 0.75)):
        if scale is not None:
            enable_sag(pipe, scale)
        pipe(**kw)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2):
            pipe(**kw)
        torch.cuda.synchronize()
        times[variant] = (time.perf_counter() - start) / 2 / STEPS
        disable_sag(pipe)
    if rank == 0:
        torch.save(times, os.path.join(outdir, "times.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_flux_context_parallel_step(kind):
    world = 2
    variants = [("no guidance (distilled)", None), ("sag_fast SAG (distilled)", "no guidance (distilled)")]
    if torch.cuda.device_count() < world:
        for variant, baseline in variants:
            record_e2e(MODEL, f"{kind}={world}, {variant}", None, steps=STEPS, baseline=baseline and
                       f"{kind}={world}, {baseline}", note=f"skipped: needs {world} GPUs "
                       f"({torch.cuda.device_count()} here)")
        pytest.skip(f"needs {world} GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_rank, args=(world, os.path.join(tmp, "rendezvous"), tmp, kind),
                                              nprocs=world, join=True, start_method="spawn")
        times = torch.load(os.path.join(tmp, "times.pt"))
    for variant, baseline in variants:
        record_e2e(MODEL, f"{kind}={world}, {variant}", times[variant], steps=STEPS,
                   baseline=baseline and f"{kind}={world}, {baseline}", note=f"{STEPS} steps, bf16, random weights")
