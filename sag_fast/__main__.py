"""Command line: `python -m sag_fast sample ...` (the demo: with and without SAG, and SAG's mask),
`python -m sag_fast quality` (does SAG improve samples: FID/KID sweep) and `python -m sag_fast bench`."""
from __future__ import annotations

import argparse
import math
import inspect
import json
import os
import statistics
import sys
import time

# the names of sag_fast.diffusers.schedulers.SCHEDULERS, kept here so `--help` does not import diffusers
SCHEDULER_NAMES = ("ddim", "ddpm", "pndm", "deis", "unipc", "dpm", "dpm_karras", "dpm_single", "euler", "euler_a",
                   "heun", "lms", "kdpm2")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BUILTIN, TINY_SD = "builtin", "tiny-sd"
CELL = 128  # grid cells are upscaled (nearest) to at least this many pixels for viewing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sag-fast", description="Self-Attention Guidance for diffusers pipelines")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample with and without SAG (same seeds) and write images, a grid with SAG's "
                                      "mask, and timings")
    s.add_argument("--model", default=BUILTIN,
                   help=f"'{BUILTIN}' (default: the shipped model trained on shapes, 32x32), '{TINY_SD}' (a tiny "
                        "random Stable Diffusion, for tests), a local diffusers folder, or a model id already in "
                        "the local HF cache (never downloaded)")
    s.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="text pipelines only")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), default=None, help="default: the model's own")
    s.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (1.0 = no CFG; text pipelines)")
    s.add_argument("--sag-scale", type=float, default=0.75)
    s.add_argument("--blur-sigma", type=float, default=1.0)
    s.add_argument("--kernel-size", type=int, default=9, help="the Gaussian blur's size (odd)")
    s.add_argument("--threshold", type=float, default=1.0, help="attention-mass threshold (1.0: above average)")
    s.add_argument("--layer", default=None, help="self-attention module path or regex (default: the model's own)")
    s.add_argument("--seed", type=int, default=0, help="row i of the grid uses seed + i")
    s.add_argument("--height", type=int, default=None, help="with --width (both or neither); text pipelines only")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--batch", type=int, default=None, help=f"images (grid rows); default 8 for '{BUILTIN}', else 1")
    s.add_argument("--num-frames", type=int, default=None,
                   help="video pipelines only (Wan, AnimateDiff): frames per video (default: the pipeline's own); "
                        "writes animated WebPs (and MP4s where imageio can) without/with SAG and side by side")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    s.add_argument("--output-dir", default="outputs")
    s.add_argument("--context-parallel", default=None, metavar="ulysses=N|ring=N",
                   help="shard the transformer's sequence over N GPUs with diffusers' context parallelism; run under "
                        "`torchrun --nproc-per-node N` (rank 0 writes the outputs)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.add_argument("--cond-rows", type=int, default=None,
                   help=f"'{BUILTIN}' only: rows of the class-conditional built-in model (one shape class each, "
                        "CFG | CFG + SAG); default 5, 0: none")
    s.add_argument("--cond-guidance", type=float, default=3.0,
                   help="the CFG scale of the class-conditional rows (default 3)")
    q = sub.add_parser("quality", help="FID/KID of the built-in model's samples: no guidance, blur guidance, SAG "
                                       "settings (writes bench/results/<date>-quality.md and a plot)")
    from sag_fast.quality import add_arguments

    add_arguments(q)
    b = sub.add_parser("bench", help="run the benchmark suite and write bench/results/<date>-<device>.md")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to bench/run.py (e.g. --quick)")
    return p


def _check_sample_args(a) -> None:
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    if a.num_frames is not None and a.num_frames < 1:
        raise SystemExit(f"--num-frames must be >= 1, got {a.num_frames}")
    if a.batch is not None and a.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {a.batch}")
    if a.guidance_scale < 0:
        raise SystemExit("--guidance-scale must be >= 0")
    # the SAG settings are checked by SAGConfig, the one place their rules are written; its message names the flag
    from sag_fast.guidance import SAGConfig
    try:
        SAGConfig(scale=a.sag_scale, blur_sigma=a.blur_sigma, kernel_size=a.kernel_size, threshold=a.threshold)
    except ValueError as exc:
        text = str(exc)
        for field, flag in (("scale", "--sag-scale"), ("blur_sigma", "--blur-sigma"), ("kernel_size", "--kernel-size"),
                            ("threshold", "--threshold")):
            text = text.replace(f"SAGConfig.{field} ", f"{flag} ")
        raise SystemExit(text) from None
    if a.cond_rows is not None and a.cond_rows < 0:
        raise SystemExit(f"--cond-rows must be >= 0, got {a.cond_rows}")
    if a.cond_rows and a.model != BUILTIN:
        raise SystemExit(f"--cond-rows: the class-conditional rows need --model {BUILTIN} (got --model {a.model!r})")
    if not math.isfinite(a.cond_guidance) or a.cond_guidance < 0:  # CFG scale, not a SAGConfig field
        raise SystemExit(f"--cond-guidance must be a finite number >= 0, got {a.cond_guidance}")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and (v < 8 or v % 8):
            raise SystemExit(f"--{name} must be a positive multiple of 8, got {v}")
    # diffusers silently ignores a lone height or width: the run would not be the size run.json records
    if (a.height is None) != (a.width is None):
        given, missing = ("height", "width") if a.width is None else ("width", "height")
        raise SystemExit(f"--{given} was given without --{missing}: give both (or neither, for the model's size)")
    a.context_parallel_spec = _context_parallel_spec(a.context_parallel)
    if a.context_parallel_spec is not None:
        if a.model in (BUILTIN, TINY_SD):
            raise SystemExit(f"--context-parallel: --model {a.model} is a UNet, which diffusers cannot shard; use a "
                             "Flux (or other transformer) pipeline folder")
        if a.cond_rows:
            raise SystemExit("--context-parallel and --cond-rows: the class-conditional rows use the built-in UNet")
        if a.device is not None:
            raise SystemExit("--context-parallel picks each rank's GPU from torchrun's LOCAL_RANK: leave out --device")
        if a.context_parallel_spec[0] == "ring" and a.dtype == "fp32":
            raise SystemExit("--context-parallel ring=N runs on the cuDNN attention backend (ring attention needs each "
                             "chunk's log-sum-exp, which the default backend does not give): use --dtype bf16 or fp16")


def _context_parallel_spec(value: str | None) -> tuple[str, int] | None:
    """--context-parallel ulysses=N | ring=N -> (kind, N), checked against torchrun's environment."""
    if value is None:
        return None
    kind, _, degree = value.partition("=")
    if kind not in ("ulysses", "ring") or not degree.isdigit() or int(degree) < 2:
        raise SystemExit(f"--context-parallel must be ulysses=N or ring=N with N >= 2, got {value!r}")
    world = os.environ.get("WORLD_SIZE")
    if world is None or "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"--context-parallel {value}: run under torchrun (e.g. `torchrun --nproc-per-node {degree} "
                         "-m sag_fast sample ...`), one process per GPU")
    if int(world) != int(degree):
        raise SystemExit(f"--context-parallel {value}: torchrun started {world} processes; the degree must be the "
                         f"number of processes (`torchrun --nproc-per-node {degree}`)")
    return kind, int(degree)


def _enable_context_parallel(pipe, spec: tuple[str, int], device) -> None:
    """The process group (NCCL) and `enable_parallelism` on the pipeline's transformer, before enable_sag."""
    import torch
    from diffusers import ContextParallelConfig

    kind, degree = spec
    model = getattr(pipe, "transformer", None)
    if model is None or getattr(model, "_cp_plan", None) is None:
        raise SystemExit(f"--context-parallel: {type(pipe).__name__}'s denoiser "
                         f"({type(getattr(pipe, 'transformer', getattr(pipe, 'unet', None))).__name__}) has no "
                         "context-parallel plan in diffusers (Flux, Wan and QwenImage transformers have one)")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", device_id=device)
    if kind == "ring":  # ring attention needs each key chunk's log-sum-exp: the native backend does not give it
        model.set_attention_backend("_native_cudnn")
    model.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": degree}))


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device {name!r} is not a device this CLI runs on: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise SystemExit(f"--device {name!r}: only cpu and cuda are supported")


def _load_pipeline(model: str, device, dtype):
    if model == BUILTIN:
        from sag_fast.models import builtin_pipeline

        pipe = builtin_pipeline(dtype=dtype).to(device)
        return pipe, "built-in (unconditional, trained on seeded shapes, 32x32)"
    if model == TINY_SD:
        from sag_fast.diffusers.tiny import tiny_sd_pipeline

        return tiny_sd_pipeline(seed=0, device=device, dtype=dtype), "tiny SD (random weights)"
    looks_like_path = os.path.isabs(model) or model.startswith(".") or os.sep in model.rstrip(os.sep) \
        and model.count("/") != 1
    if os.path.exists(model) or looks_like_path:
        if not os.path.isdir(model):
            raise SystemExit(f"--model {model!r}: no such folder")
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise SystemExit(f"--model {model!r}: not a diffusers pipeline folder (no model_index.json in it)")
    from diffusers import DiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: a local folder or the local HF cache only
    try:
        # dtype=, not torch_dtype= (deprecated in diffusers, and it warns)
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=True, **_absent(model))
    except Exception as exc:  # noqa: BLE001 - re-raised with what the user can do
        if os.path.isdir(model):
            raise SystemExit(f"--model {model!r}: could not load this diffusers folder: {exc}") from exc
        raise SystemExit(f"--model {model!r}: not a local folder, and not in the local HF cache (nothing is "
                         f"downloaded; pass a folder, '{BUILTIN}' or '{TINY_SD}')") from None
    return pipe.to(device), model if os.path.isdir(model) else f"{model} (local HF cache)"


def _absent(model: str) -> dict:
    """Components a saved folder lists as [null, null] (e.g. SD3 saved without T5): diffusers' loader only
    accepts them when they are passed as None explicitly."""
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        entries = json.load(f)
    return {k: None for k, v in entries.items() if isinstance(v, list) and v == [None, None]}


def _set_scheduler(pipe, name: str | None) -> None:
    if name is None:
        return
    from sag_fast.diffusers.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(name, config=pipe.scheduler.config)


def _check_size(pipe, a) -> None:
    """Refuse a size SAG cannot run at before anything is sampled: the blur reflect-pads the latent by
    kernel_size // 2, which needs more latent pixels than that on each side."""
    from sag_fast.guidance import SAGConfig

    kernel = getattr(a, "kernel_size", SAGConfig().kernel_size)
    text = _is_text_pipeline(pipe)
    if a.num_frames is not None and not _is_video_pipeline(pipe):
        raise SystemExit(f"--num-frames: {type(pipe).__name__} is not a video pipeline (Wan, AnimateDiff)")
    if not text and a.height is not None:
        raise SystemExit("--height/--width: this pipeline samples at its model's own size "
                         f"({getattr(pipe.unet.config, 'sample_size', '?')}); they apply to text pipelines only")
    if a.height is None:
        return
    factor = getattr(pipe, "vae_scale_factor", 8)
    minimum = (kernel // 2 + 1) * factor
    for name in ("height", "width"):
        v = getattr(a, name)
        if v // factor <= kernel // 2:
            raise SystemExit(f"--{name} {v}: the latent is {v // factor} pixels, SAG's {kernel}x{kernel} blur needs "
                             f"more than {kernel // 2}: use --{name} >= {minimum}")


def _is_text_pipeline(pipe) -> bool:
    import inspect

    return "prompt" in inspect.signature(pipe.__call__).parameters


def _is_video_pipeline(pipe) -> bool:
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def _videos(frames) -> list:
    """A video pipeline's `.frames` (a (B, F, H, W, 3) array in [0, 1], or B lists of PIL frames) as B lists of
    PIL images."""
    import numpy as np
    from PIL import Image

    if hasattr(frames, "shape"):
        array = np.asarray(frames.float().cpu() if hasattr(frames, "cpu") else frames, dtype=np.float32)
        array = (array.clip(0, 1) * 255).round().astype(np.uint8)
        return [[Image.fromarray(f) for f in video] for video in array]
    return [list(video) for video in frames]


def _save_video(frames, path_stem: str, fps: int = 8) -> list[str]:
    """An animated WebP through PIL (lossless, looping), and an MP4 where imageio (with an ffmpeg backend) is
    importable; returns the paths written."""
    paths = [path_stem + ".webp"]
    frames[0].save(paths[0], save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0,
                   lossless=True)
    try:
        import imageio.v3 as iio
        import numpy as np

        iio.imwrite(path_stem + ".mp4", np.stack([np.asarray(f.convert("RGB")) for f in frames]), fps=fps)
        paths.append(path_stem + ".mp4")
    except Exception:  # noqa: BLE001 - no imageio or no ffmpeg plugin: the WebP is the video
        pass
    return paths


def _side_by_side(left: list, right: list) -> list:
    """Frame by frame: without SAG on the left, with SAG on the right."""
    from PIL import Image

    out = []
    for a, b in zip(left, right):
        frame = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
        frame.paste(a.convert("RGB"), (0, 0))
        frame.paste(b.convert("RGB"), (a.width, 0))
        out.append(frame)
    return out


def _timed_step(scheduler, sync, stamps: list, on_step=None):
    """Wraps scheduler.step on this instance: a timestamp after each step (every pipeline calls it once per step,
    unlike callback_on_step_end), `on_step(index)` after it, and `generator=` dropped for schedulers whose step
    does not take one (DDPMPipeline always passes it)."""
    import inspect

    original = scheduler.step
    takes_generator = "generator" in inspect.signature(original).parameters

    def step(*args, **kwargs):
        if not takes_generator:
            kwargs.pop("generator", None)
        out = original(*args, **kwargs)
        sync()
        stamps.append(time.perf_counter())
        if on_step is not None:
            on_step(len(stamps))
        return out

    scheduler.step = step
    return lambda: vars(scheduler).pop("step", None)


def _run(pipe, a, steps: int, sync, on_step=None):
    """One pipeline call; returns (images, or videos as lists of frames, seconds per step, total seconds)."""
    import torch

    generator = [torch.Generator(device="cpu").manual_seed(a.seed + i) for i in range(a.batch)]
    kwargs = dict(num_inference_steps=steps, generator=generator, output_type="pil")
    video = _is_video_pipeline(pipe)
    if video and a.num_frames is not None:
        kwargs["num_frames"] = a.num_frames
    if _is_text_pipeline(pipe):
        per_prompt = "num_videos_per_prompt" if video else "num_images_per_prompt"
        kwargs.update(prompt=a.prompt, negative_prompt=a.negative_prompt, **{per_prompt: a.batch})
        if "true_cfg_scale" in inspect.signature(pipe.__call__).parameters:  # Flux: guidance_scale is distilled
            if a.negative_prompt is not None:
                kwargs["true_cfg_scale"] = a.guidance_scale  # true CFG, two calls per step
        else:
            kwargs["guidance_scale"] = a.guidance_scale
        if a.height is not None:
            kwargs.update(height=a.height, width=a.width)
    else:
        kwargs["batch_size"] = a.batch
    stamps: list[float] = []
    restore = _timed_step(pipe.scheduler, sync, stamps, on_step)
    try:
        sync()
        start = time.perf_counter()
        result = pipe(**kwargs)
        images = _videos(result.frames) if video else result.images
        sync()
        total = time.perf_counter() - start
    finally:
        restore()
    edges = [start] + stamps
    return images, [round(b - e, 6) for e, b in zip(edges, edges[1:])], total


def _mask_overlay(image, mask):
    """The image darkened, with SAG's mask (bool (h, w), upsampled nearest) in red over it."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = img * 0.35
    out[m] = img[m] * 0.45 + np.array([255.0, 40.0, 40.0]) * 0.55
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _difference(plain, guided, k: int):
    """|guided - plain| per channel, times k (black: unchanged), as an image."""
    import numpy as np
    from PIL import Image

    d = np.abs(np.asarray(guided.convert("RGB"), np.float32) - np.asarray(plain.convert("RGB"), np.float32))
    return Image.fromarray((d * k).clip(0, 255).astype(np.uint8))


def _difference_factor(pairs) -> int:
    """The amplification that puts the 99th percentile of the non-zero pixel changes near full scale: one
    factor for a whole block of rows (written on the grid), between 1 and 64."""
    import numpy as np

    d = np.concatenate([np.abs(np.asarray(g.convert("RGB"), np.float32) - np.asarray(p.convert("RGB"), np.float32))
                        .ravel() for p, g in pairs])
    d = d[d > 0]
    if d.size == 0:
        return 1
    return int(np.clip(round(200.0 / max(float(np.percentile(d, 99)), 1.0)), 1, 64))


HEADER = 14  # pixels of the grid's column titles above each block of rows


def _grid(blocks):
    """blocks: [(column titles, rows, row labels or None)], a row a list of images (one per column) -> one image:
    each block's titles on a dark strip, then its rows, every cell upscaled (nearest) to at least CELL pixels.
    Returns (grid, upscale, layout): layout lists each row's top y and block index."""
    from PIL import Image, ImageDraw

    w, h = blocks[0][1][0][0].size
    k = max(1, CELL // max(w, h))
    cols = max(len(r) for _, rows, _ in blocks for r in rows)
    height = sum(HEADER + h * k * len(rows) for _, rows, _ in blocks)
    grid = Image.new("RGB", (cols * w * k, height), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    y, layout = 0, []
    for b, (titles, rows, labels) in enumerate(blocks):
        for j, title in enumerate(titles):
            title = title.replace("SAG mask at the middle step", "SAG mask (middle step)")  # fits a 128-px cell
            draw.text((j * w * k + 3, y + 1), title, fill=(235, 235, 235))
        y += HEADER
        for i, cells in enumerate(rows):
            for j, img in enumerate(cells):
                grid.paste(img.convert("RGB").resize((w * k, h * k), Image.NEAREST), (j * w * k, y))
            if labels:
                draw.text((3, y + 2), labels[i], fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
            layout.append({"y": y, "block": b})
            y += h * k
    return grid, k, layout


def _conditional_rows(a, device, dtype, sync):
    """The class-conditional built-in model, one row per class (cycling), through SAGSampler: CFG alone and CFG +
    SAG from the same noise; returns (class names, without, with, masks at the middle step or None)."""
    import torch
    from PIL import Image

    from sag_fast.guidance import SAGConfig
    from sag_fast.models import builtin_cond
    from sag_fast.sampler import SAGSampler

    unet, scheduler, labels = builtin_cond(device=device, dtype=dtype)
    names = labels["classes"]
    y = torch.arange(a.cond_rows, device=device) % len(names)
    cond, uncond = {"class_labels": y}, {"class_labels": torch.full_like(y, labels["null_class"])}
    size = unet.config.sample_size
    noise = torch.cat([torch.randn(1, unet.config.in_channels, size, size,
                                   generator=torch.Generator().manual_seed(a.seed + 1000 + i))
                       for i in range(a.cond_rows)]).to(device, dtype)

    def run(scale):
        sampler = SAGSampler(unet, scheduler, SAGConfig(**(_sag_settings(a) | {"scale": scale})),
                             guidance_scale=a.cond_guidance, progress=False)
        masks, stamps = [], []

        def on_step(done):
            if done == max(1, len(scheduler.timesteps) // 2) and sampler.capture is not None \
                    and sampler.capture.mask is not None:
                masks.append(sampler.capture.mask[: a.cond_rows].detach().cpu().numpy())

        restore = _timed_step(scheduler, sync, stamps, on_step)
        try:
            x = sampler(noise, cond=cond, uncond=uncond, num_inference_steps=a.steps)
        finally:
            restore()
            sampler.remove()
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(img) for img in x], (masks[0] if masks else None)

    plain, _ = run(0.0)
    guided, mask = run(a.sag_scale)
    return [names[int(c)] for c in y], plain, guided, mask


def _sag_settings(a) -> dict:
    return dict(scale=a.sag_scale, blur_sigma=a.blur_sigma, kernel_size=a.kernel_size, threshold=a.threshold,
                layer=a.layer)


def _median(xs):
    return round(statistics.median(xs), 6) if xs else None


def sample(a) -> int:
    _check_sample_args(a)
    import torch

    import sag_fast
    from sag_fast.diffusers import last_mask

    spec = a.context_parallel_spec
    if spec is not None:
        if not torch.cuda.is_available():
            raise SystemExit("--context-parallel needs one CUDA GPU per process (diffusers' context parallelism)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = _device(a.device)
    dtype = getattr(torch, DTYPES[a.dtype or ("fp16" if device.type == "cuda" else "fp32")])
    if a.batch is None:
        a.batch = 8 if a.model == BUILTIN else 1
    if a.cond_rows is None:
        a.cond_rows = 5 if a.model == BUILTIN else 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    pipe, source = _load_pipeline(a.model, device, dtype)
    _set_scheduler(pipe, a.scheduler)
    _check_size(pipe, a)
    if spec is not None:  # before enable_sag: SAG reads the sharded attention (every rank runs every call below)
        _enable_context_parallel(pipe, spec, device)
        source += f" | context parallel {a.context_parallel} (rank {torch.distributed.get_rank()})"
    try:  # everything SAG refuses (model, layer, scheduler) is refused here, before any sampling
        sag_fast.enable_sag(pipe, **_sag_settings(a))
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"SAG cannot run with these settings: {exc}") from None
    sag_fast.disable_sag(pipe)
    pipe.set_progress_bar_config(disable=a.no_progress)
    os.makedirs(a.output_dir, exist_ok=True)

    print(f"model: {source} | scheduler: {type(pipe.scheduler).__name__} | device: {device} | dtype: {dtype}")
    # warm-up, untimed: the first call of each kind pays one-off costs (allocations, kernel selection, SAG's hook
    # installation) that would otherwise make whichever run goes first look slow
    warm = min(a.steps, 2)
    _run(pipe, a, warm, sync)
    sag_fast.enable_sag(pipe, **_sag_settings(a))
    try:
        _run(pipe, a, warm, sync)
    finally:
        sag_fast.disable_sag(pipe)

    plain, plain_steps, plain_total = _run(pipe, a, a.steps, sync)
    n_steps = len(pipe.scheduler.timesteps)
    masks: list = []

    def on_step(done: int):
        # SAG's own mask as it was at the middle step: the enabled session's capture holds the last one computed
        if done == max(1, n_steps // 2):
            mask = last_mask(pipe)
            if mask is not None:
                masks.append(mask[: a.batch].detach().cpu().numpy())

    sag_fast.enable_sag(pipe, **_sag_settings(a))
    try:
        guided, sag_steps, sag_total = _run(pipe, a, a.steps, sync, on_step)
    finally:
        sag_fast.disable_sag(pipe)
    mask = masks[0] if masks else None
    if spec is not None and torch.distributed.get_rank() != 0:
        torch.distributed.destroy_process_group()
        return 0  # every rank ran the sharded calls; rank 0 writes the outputs
    if mask is None:
        print("no mask column: SAG computed no attention mask at the middle step (sag scale 0?)")

    files, videos = [], []
    if _is_video_pipeline(pipe):
        # the videos: without, with, side by side; the grid shows each video's middle frame (and its mask)
        for i, (p_video, g_video) in enumerate(zip(plain, guided)):
            for tag, frames in (("nosag", p_video), ("sag", g_video), ("side_by_side", _side_by_side(p_video,
                                                                                                      g_video))):
                videos += _save_video(frames, os.path.join(a.output_dir, f"sample{i}_{tag}"))
        n_frames = len(plain[0])
        middle = n_frames // 2
        plain, guided = [v[middle] for v in plain], [v[middle] for v in guided]
        if mask is not None and mask.ndim == 4:  # (B, f, h, w): the latent frame the middle frame falls in
            mask = mask[:, middle * mask.shape[1] // n_frames]
    for i, (p_img, g_img) in enumerate(zip(plain, guided)):
        for tag, img in (("nosag", p_img), ("sag", g_img)):
            path = os.path.join(a.output_dir, f"sample{i}_{tag}.png")
            img.save(path)
            files.append(path)
    factor = _difference_factor(list(zip(plain, guided)))
    columns = ["without SAG", "with SAG", f"|difference| x{factor}"] + (
        ["SAG mask at the middle step"] if mask is not None else [])

    def rows_of(p_imgs, g_imgs, masks, k):
        return [[p_img, g_img, _difference(p_img, g_img, k)] + ([_mask_overlay(g_img, masks[i])] if masks is not None
                                                                else []) for i, (p_img, g_img) in
                enumerate(zip(p_imgs, g_imgs))]

    blocks = [(columns, rows_of(plain, guided, mask, factor), None)]
    cond = None
    if a.cond_rows:
        names, c_plain, c_guided, c_mask = _conditional_rows(a, device, dtype, sync)
        c_factor = _difference_factor(list(zip(c_plain, c_guided)))
        g = f"{a.cond_guidance:g}"
        c_columns = [f"class-cond., CFG {g}", f"CFG {g} + SAG", f"|difference| x{c_factor}"] + (
            ["SAG mask (middle step)"] if c_mask is not None else [])
        blocks.append((c_columns, rows_of(c_plain, c_guided, c_mask, c_factor), names))
        for i, (p_img, g_img) in enumerate(zip(c_plain, c_guided)):
            for tag, img in (("cfg", p_img), ("cfg_sag", g_img)):
                path = os.path.join(a.output_dir, f"cond{i}_{names[i]}_{tag}.png")
                img.save(path)
                files.append(path)
        cond = {"classes": names, "guidance_scale": a.cond_guidance, "columns": c_columns,
                "difference_factor": c_factor, "scheduler": "DDIMScheduler (the model's own)",
                "mask_fraction": None if c_mask is None else round(float(c_mask.mean()), 4)}
    grid_path = os.path.join(a.output_dir, "grid.png")
    grid, upscale, layout = _grid(blocks)
    grid.save(grid_path)
    plain_med, sag_med = _median(plain_steps), _median(sag_steps)
    report = {
        "settings": {k: v for k, v in vars(a).items() if k != "command"} | {
            "model": source, "scheduler": type(pipe.scheduler).__name__, "device": str(device), "dtype": str(dtype)},
        "timing": {
            "warmup_steps": warm,
            "no_sag": {"total_s": round(plain_total, 4), "median_step_s": plain_med, "per_step_s": plain_steps},
            "sag": {"total_s": round(sag_total, 4), "median_step_s": sag_med, "per_step_s": sag_steps},
            "sag_step_ratio": round(sag_med / plain_med, 3) if plain_med else None,
        },
        "images": files,
        "videos": videos,
        "grid": grid_path,
        "grid_columns": columns,
        "grid_upscale": upscale,
        "grid_rows": layout,
        "difference_factor": factor,
        "mask_fraction": None if mask is None else round(float(mask.mean()), 4),
        "conditional": cond,
    }
    json_path = os.path.join(a.output_dir, "run.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"median step after warm-up: without SAG {plain_med * 1e3:.1f} ms, with SAG {sag_med * 1e3:.1f} ms "
          f"({report['timing']['sag_step_ratio']}x)")
    print(f"grid ({' | '.join(report['grid_columns'])}, one row per seed"
          + (f"; then {a.cond_rows} class-conditional rows: {' | '.join(cond['columns'])}" if cond else "")
          + f"): {grid_path}")
    if videos:
        print(f"videos (without SAG, with SAG, side by side): {', '.join(v for v in videos if 'side' in v)}")
    print(f"settings and per-step timings: {json_path}")
    if spec is not None:
        torch.distributed.destroy_process_group()
    return 0


def quality(a) -> int:
    from sag_fast.quality import main as quality_main

    return quality_main(a)


def bench(a) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", "run.py")):
        raise SystemExit("bench: the benchmark suite lives in the source checkout (bench/run.py), not found next to "
                         f"this package at {root}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("sag_fast_bench_run", os.path.join(root, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(a.args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to bench/run.py (argparse can't pass --options on)
        return bench(argparse.Namespace(args=argv[1:]))
    a = _parser().parse_args(argv)
    return {"sample": sample, "quality": quality, "bench": bench}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
