"""End to end: the time of one sampling step with each kind of guidance, on the same UNet and the same steps.

Variants (same UNet, same DDIM scheduler, same latents, same number of steps, `output_type="latent"` so
that only the denoising loop runs; a step's time is the median pipeline call divided by the steps):
    no guidance                              one batch-1 forward per step
    CFG                                      one batch-2 forward per step (guidance_scale 7.5)
    diffusers SAG+CFG                        diffusers' deprecated StableDiffusionSAGPipeline (SD1/SD2 only)
    sag_fast SAG+CFG                         StableDiffusionPipeline + sag_fast.enable_sag (scale 0.75)
    sag_fast SAG+CFG, SAGSampler             sag_fast.SAGSampler: the same loop without a pipeline
    CFG, compiled unet                       the CFG row with the UNet's forward under torch.compile
    sag_fast SAG+CFG, compiled unet          enable_sag on that compiled UNet
    sag_fast SAG+CFG, SAGSampler CUDA graph  SAGSampler(cuda_graph=True) (GPU only)

SAG+CFG costs one batch-2 and one batch-1 forward per step, so (SAG+CFG step) / (CFG step) >= 1.5 where a
forward's time is proportional to its batch; (CFG + no guidance) / CFG is that floor as measured here.

Models: on a GPU an SD1.5-sized UNet at 512x512 (64x64 latents) and an SDXL-sized one at 1024x1024 (128x128
latents), fp16, random weights built from their configs (nothing is downloaded); on a CPU the tiny UNet of
sag_fast.diffusers.tiny at 32x32 latents (16x16 with SAG_FAST_BENCH_QUICK=1), fp32.
Memory: on a GPU the peak of torch.cuda.max_memory_allocated during one call minus what was allocated before
it (the weights), on a CPU the peak growth of the resident set during one call, sampled every millisecond.
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import QUICK, record_dispatch, record_e2e, time_fn

from sag_fast.diffusers import disable_sag, enable_sag
from sag_fast.sampler import SAGSampler

HAS_CUDA = torch.cuda.is_available()
# SAG_FAST_BENCH_FULL=1 also compiles the SDXL UNet on a GPU and compiles the tiny one on a CPU (minutes)
FULL = os.environ.get("SAG_FAST_BENCH_FULL") == "1"
# torch.compile's backend for the compiled rows ("eager" checks the plumbing in seconds)
COMPILE_BACKEND = os.environ.get("SAG_FAST_BENCH_COMPILE_BACKEND", "inductor")
CFG_SCALE = 7.5
SAG_SCALE = 0.75

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)  # 859.5M parameters, as runwayml/stable-diffusion-v1-5
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 micro-conditioning numbers * 256 + 1280 pooled text
)  # 2567.5M parameters, as stabilityai/stable-diffusion-xl-base-1.0
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)

VARIANTS = ("no guidance", "CFG", "diffusers SAG+CFG", "sag_fast SAG+CFG", "CFG, SAGSampler", "sag_fast SAG+CFG, SAGSampler",
            "CFG, compiled unet", "sag_fast SAG+CFG, compiled unet", "sag_fast SAG+CFG, SAGSampler CUDA graph")
# what each variant's step time is divided by in the table (SAG over CFG: the SAG overhead)
BASELINE = {"CFG": "no guidance", "diffusers SAG+CFG": "CFG", "sag_fast SAG+CFG": "CFG",
            # the sampler's own loop has less per-step overhead than a pipeline's: compare it with itself at scale 0
            "CFG, SAGSampler": "CFG", "sag_fast SAG+CFG, SAGSampler": "CFG, SAGSampler",
            "CFG, compiled unet": "CFG", "sag_fast SAG+CFG, compiled unet": "CFG, compiled unet",
            "sag_fast SAG+CFG, SAGSampler CUDA graph": "CFG, SAGSampler"}


@dataclass
class ModelSpec:
    name: str
    sdxl: bool
    latent_hw: int
    dtype: torch.dtype
    steps: int
    compile: bool  # whether the compiled rows run for this model in this run
    text_len: int = 77


def model_specs() -> list[ModelSpec]:
    if HAS_CUDA:
        specs = [ModelSpec("SD1.5-sized UNet, 512x512", False, 64, torch.float16, 5 if QUICK else 10, not QUICK)]
        if not QUICK:
            # compiling the 2.6B-parameter UNet takes minutes: only on request
            specs.append(ModelSpec("SDXL-sized UNet, 1024x1024", True, 128, torch.float16, 10, FULL))
        return specs
    hw = 16 if QUICK else 32
    return [ModelSpec(f"tiny UNet, {hw}x{hw} latents", False, hw, torch.float32, 2 if QUICK else 4,
                      FULL and not QUICK)]


# -------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    spec: ModelSpec
    device: torch.device
    unet: torch.nn.Module
    call_kwargs: dict
    origin: str
    compiled: bool = False


_CACHE: dict[str, Setup] = {}


def _build_unet(spec: ModelSpec, device: torch.device) -> tuple[torch.nn.Module, str]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if spec.name.startswith("tiny"):
        from sag_fast.diffusers.tiny import tiny_unet

        unet = tiny_unet(sample_size=spec.latent_hw).to(device)
        return (unet if spec.dtype == torch.float32 else unet.to(dtype=spec.dtype)), "sag_fast.diffusers.tiny"
    config = SDXL_UNET if spec.sdxl else SD15_UNET
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=spec.dtype).eval(), "random weights from the config"


def get_setup(spec: ModelSpec) -> Setup:
    if spec.name in _CACHE:
        return _CACHE[spec.name]
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    unet, origin = _build_unet(spec, device)
    text_dim = unet.config.cross_attention_dim
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, spec.dtype)

    hw = spec.latent_hw
    kwargs = dict(prompt_embeds=randn(1, spec.text_len, text_dim), negative_prompt_embeds=randn(1, spec.text_len, text_dim),
                  latents=randn(1, unet.config.in_channels, hw, hw), height=8 * hw, width=8 * hw,
                  num_inference_steps=spec.steps, output_type="latent")
    if spec.sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs.update(pooled_prompt_embeds=randn(1, pooled), negative_pooled_prompt_embeds=randn(1, pooled))
    setup = Setup(spec, device, unet, kwargs, origin)
    # one untimed loop absorbs one-time costs (lazy imports, kernel and allocator warm-up) that would
    # otherwise land on whichever variant happens to run first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_pipeline(setup)(guidance_scale=CFG_SCALE, **kwargs)
    _CACHE[spec.name] = setup
    return setup


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER)


def make_pipeline(setup: Setup, deprecated_sag: bool = False):
    """A pipeline around the shared UNet with no VAE and no text encoders: embeddings are passed in."""
    import diffusers

    common = dict(vae=None, text_encoder=None, tokenizer=None, unet=setup.unet, scheduler=_scheduler())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setup.spec.sdxl:
            pipe = diffusers.StableDiffusionXLPipeline(text_encoder_2=None, tokenizer_2=None, add_watermarker=False,
                                                       **common)
        elif deprecated_sag:
            from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
                StableDiffusionSAGPipeline,
            )

            pipe = StableDiffusionSAGPipeline(safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False, **common)
        else:
            pipe = diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------- the pieces of sag_fast
@contextlib.contextmanager
def sag_enabled(pipe):
    enable_sag(pipe, scale=SAG_SCALE)
    try:
        yield pipe
    finally:
        disable_sag(pipe)


def sampler_call(setup: Setup, cuda_graph: bool, sag_scale: float = SAG_SCALE):
    """SAGSampler doing the pipelines' work: CFG (7.5) + SAG (0.75) over the same latents, embeddings and
    DDIM steps. With cuda_graph=True the guided step is captured on the first step of each call and replayed
    on the others (the capture is part of the timed call)."""
    from sag_fast.guidance import SAGConfig

    kw = setup.call_kwargs
    sampler = SAGSampler(setup.unet, _scheduler(), SAGConfig(scale=sag_scale), guidance_scale=CFG_SCALE,
                              progress=False, cuda_graph=cuda_graph)
    cond = {"encoder_hidden_states": kw["prompt_embeds"]}
    uncond = {"encoder_hidden_states": kw["negative_prompt_embeds"]}
    if setup.spec.sdxl:
        size = float(kw["height"])
        # SDXL micro-conditioning: original size, crop top-left, target size
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=setup.device, dtype=setup.spec.dtype)
        cond["added_cond_kwargs"] = {"text_embeds": kw["pooled_prompt_embeds"], "time_ids": time_ids}
        uncond["added_cond_kwargs"] = {"text_embeds": kw["negative_pooled_prompt_embeds"], "time_ids": time_ids}
    return lambda: sampler(kw["latents"], cond=cond, uncond=uncond, num_inference_steps=kw["num_inference_steps"])


# ---------------------------------------------------------------------------------------- compile
def set_compiled(setup: Setup, compiled: bool) -> None:
    """Compiles the UNet's forward (an instance attribute over the class's): enable_sag's hook then wraps the
    compiled forward, so the model is compiled and SAG's per-step glue (coefficients, step bookkeeping) stays
    in Python around it, as with any diffusers hook. dynamic=False: batch 2 (CFG) and batch 1 (the degraded
    forward) each get a static graph rather than a third, dynamic one."""
    if compiled == setup.compiled:
        return
    torch._dynamo.reset()
    if compiled:
        setup.unet.forward = torch.compile(setup.unet.forward, dynamic=False, backend=COMPILE_BACKEND)
    else:
        del setup.unet.forward  # back to the class's forward
    setup.compiled = compiled


# ----------------------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _rss_sampler():
    """Peak growth of the resident set while the block runs, sampled every millisecond (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    result = {"peak": None}
    start = rss()
    peak = [start]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(peak[0], rss()) - start


def peak_memory(fn, device: torch.device) -> tuple[int | None, str]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - resident,
                f"CUDA max allocated - {resident / 2**20:.0f} MiB resident")
    if not os.path.exists("/proc/self/statm"):
        return None, "not measured (no /proc on this OS)"
    with _rss_sampler() as r:
        fn()
    return r["peak"], "RSS growth (1 ms samples)"


# ------------------------------------------------------------------------------------------- rows
def _cases():
    """Eager rows of every model first, the slow compiled / CUDA-graph rows last: a run stopped at its time
    limit still has the main table."""
    specs = model_specs()
    slow = ("compiled", "CUDA graph")
    order = [(s, v) for s in specs for v in VARIANTS if not any(w in v for w in slow)]
    order += [(s, v) for s in specs for v in VARIANTS if any(w in v for w in slow)]
    return [pytest.param(s, v, id=f"{s.name.split(',')[0]}-{v}") for s, v in order]


def _skip(spec: ModelSpec, variant: str, reason: str):
    print(f"\n[bench_e2e] {spec.name} / {variant}: skipped: {reason}")
    record_e2e(spec.name, variant, None, steps=spec.steps, note=f"skipped: {reason}")
    pytest.skip(reason)


def _variant_call(setup: Setup, variant: str):
    """(callable running one full denoising loop, cleanup) for the variant, or a skip reason string."""
    spec = setup.spec
    kw = dict(setup.call_kwargs)
    compiled = "compiled" in variant
    if compiled and not spec.compile:
        if QUICK:
            return "torch.compile is left out of a quick run"
        return ("compiling this UNet takes minutes here; SAG_FAST_BENCH_FULL=1 (bench/run.py --full) includes it")
    if "diffusers SAG" in variant and spec.sdxl:
        return "diffusers' SAG pipeline supports SD1/SD2 UNets only"
    if "SAGSampler" in variant:
        if "CUDA graph" in variant and not HAS_CUDA:
            return "CUDA graphs need a GPU"
        set_compiled(setup, False)
        scale = 0.0 if variant.startswith("CFG") else SAG_SCALE  # scale 0: one plain CFG forward per step
        return sampler_call(setup, cuda_graph="CUDA graph" in variant, sag_scale=scale), contextlib.nullcontext()
    set_compiled(setup, compiled)
    if variant == "no guidance":
        pipe = make_pipeline(setup)
        return (lambda: pipe(guidance_scale=1.0, **kw)), contextlib.nullcontext()
    if variant.startswith("CFG"):
        pipe = make_pipeline(setup)
        return (lambda: pipe(guidance_scale=CFG_SCALE, **kw)), contextlib.nullcontext()
    if variant == "diffusers SAG+CFG":
        pipe = make_pipeline(setup, deprecated_sag=True)
        return (lambda: pipe(guidance_scale=CFG_SCALE, sag_scale=SAG_SCALE, **kw)), contextlib.nullcontext()
    pipe = make_pipeline(setup)
    return (lambda: pipe(guidance_scale=CFG_SCALE, **kw)), sag_enabled(pipe)


@contextlib.contextmanager
def _cpu_path():
    """On a CPU the e2e rows time what a CPU user runs (the C++/PyTorch path of each op), not the Triton
    interpreter that the tests use: TRITON_INTERPRET is cleared while the loop runs."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("spec, variant", _cases())
def test_e2e_step(spec: ModelSpec, variant: str):
    setup = get_setup(spec)
    made = _variant_call(setup, variant)
    if isinstance(made, str):
        _skip(spec, variant, made)
    fn, context = made
    steps = spec.steps
    with warnings.catch_warnings(), (contextlib.nullcontext() if HAS_CUDA else _cpu_path()):
        warnings.simplefilter("ignore")
        with context:
            t0 = time.perf_counter()
            seconds = time_fn(fn, setup.device, warmup=2 if not QUICK else 1)
            peak, mem_kind = peak_memory(fn, setup.device)
            wall = time.perf_counter() - t0
    step = seconds / steps
    note = f"{steps} steps, {str(spec.dtype).replace('torch.', '')}"
    if variant == VARIANTS[0]:
        note += f"; UNet: {setup.origin}"
    if "compiled" in variant:
        note += f"; {wall:.0f} s with the compile" + ("" if COMPILE_BACKEND == "inductor" else f" ({COMPILE_BACKEND})")
    record_e2e(spec.name, variant, step, steps=steps, baseline=BASELINE.get(variant), peak_bytes=peak,
               mem_kind=mem_kind, note=note)
    print(f"\n[bench_e2e] {spec.name} / {variant}: {step * 1e3:.2f} ms/step"
          + (f", peak +{peak / 2**20:.0f} MiB" if peak is not None else ""))


# ------------------------------------------------------------------------------ ops per sampling step
def _ops_per_step(setup: Setup, pipe, **call) -> tuple[int, int]:
    """Ops (and host syncs) dispatched by one step: a 2-step run minus a 1-step run of the same pipeline."""
    from sag_fast._profiling import count_dispatched_ops, host_syncs

    kw = dict(setup.call_kwargs, **call)
    counts = []
    for steps in (1, 2):
        _, c = count_dispatched_ops(lambda: pipe(**dict(kw, num_inference_steps=steps)))
        counts.append(c)
    step = counts[1] - counts[0]  # Counter subtraction keeps positive counts: the ops of the extra step
    return sum(step.values()), sum(host_syncs(step).values())


def test_dispatched_ops_per_step():
    """The cost of a guided step in launches (each op is a kernel on a GPU), against diffusers' SAG step."""
    spec = model_specs()[0]
    if spec.sdxl:
        pytest.skip("counted on an SD-style UNet")
    setup = get_setup(spec)
    set_compiled(setup, False)
    with warnings.catch_warnings(), (contextlib.nullcontext() if HAS_CUDA else _cpu_path()):
        warnings.simplefilter("ignore")
        plain = make_pipeline(setup)
        ops, syncs = _ops_per_step(setup, plain, guidance_scale=CFG_SCALE)
        record_dispatch(spec.name, "CFG", ops, syncs)
        ops, syncs = _ops_per_step(setup, make_pipeline(setup, deprecated_sag=True), guidance_scale=CFG_SCALE,
                                   sag_scale=SAG_SCALE)
        record_dispatch(spec.name, "diffusers SAG+CFG", ops, syncs, baseline="CFG")
        with sag_enabled(plain):
            ops, syncs = _ops_per_step(setup, plain, guidance_scale=CFG_SCALE)
        record_dispatch(spec.name, "sag_fast enable_sag SAG+CFG", ops, syncs, baseline="CFG")
