"""Command line: `python -m sag_fast sample ...` (the main job) and `python -m sag_fast bench`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the names of sag_fast.diffusers.schedulers.SCHEDULERS, kept here so `--help` does not import diffusers
SCHEDULER_NAMES = ("ddim", "ddpm", "pndm", "deis", "unipc", "dpm", "dpm_karras", "dpm_single", "euler", "euler_a",
                   "heun", "lms", "kdpm2")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sag-fast", description="Self-Attention Guidance for diffusers pipelines")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample with and without SAG (same seed) and write images, a grid and timings")
    s.add_argument("--model", default=None,
                   help="a local diffusers folder or a model id already in the local HF cache (never downloaded); "
                        "default: the built-in tiny random model")
    s.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), default=None, help="default: the model's own")
    s.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (1.0 = no CFG)")
    s.add_argument("--sag-scale", type=float, default=0.75)
    s.add_argument("--blur-sigma", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--batch", type=int, default=1, help="images per prompt")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    s.add_argument("--output-dir", default="outputs")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b = sub.add_parser("bench", help="run the benchmark suite and write bench/results/<date>-<device>.md")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to bench/run.py (e.g. --quick)")
    return p


def _check_sample_args(a) -> None:
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    if a.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {a.batch}")
    if a.guidance_scale < 0 or a.sag_scale < 0:
        raise SystemExit("--guidance-scale and --sag-scale must be >= 0")
    if a.blur_sigma <= 0:
        raise SystemExit(f"--blur-sigma must be > 0, got {a.blur_sigma}")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and (v < 8 or v % 8):
            raise SystemExit(f"--{name} must be a positive multiple of 8, got {v}")


def _load_pipeline(model: str | None, device, dtype):
    import torch

    if model is None:
        from sag_fast.diffusers.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(seed=0).to(device)
        if dtype != torch.float32:  # built in fp32
            pipe = pipe.to(dtype=dtype)
        return pipe, "built-in tiny SD (random weights)"
    from diffusers import DiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: a local folder or the local HF cache only
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with what the user can do
        raise SystemExit(f"--model {model!r}: could not load it from a local folder or the local HF cache "
                         f"(nothing is downloaded): {exc}") from exc
    return pipe.to(device), model if os.path.isdir(model) else f"{model} (local HF cache)"


def _set_scheduler(pipe, name: str | None) -> None:
    if name is None:
        return
    from sag_fast.diffusers.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(name, config=pipe.scheduler.config)


def _run(pipe, a, generator_seed: int, device, sync):
    """One pipeline call; returns (images, seconds per step)."""
    import inspect

    import torch

    stamps: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        sync()
        stamps.append(time.perf_counter())
        return kwargs

    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(num_inference_steps=a.steps, generator=torch.Generator(device="cpu").manual_seed(generator_seed),
                  output_type="pil")
    if "prompt" in params:
        kwargs.update(prompt=a.prompt, negative_prompt=a.negative_prompt, guidance_scale=a.guidance_scale,
                      num_images_per_prompt=a.batch)
    if a.height is not None:
        kwargs["height"] = a.height
    if a.width is not None:
        kwargs["width"] = a.width
    if "callback_on_step_end" in params:
        kwargs["callback_on_step_end"] = on_step_end
    sync()
    start = time.perf_counter()
    images = pipe(**kwargs).images
    sync()
    edges = [start] + stamps
    per_step = [round(b - e, 6) for e, b in zip(edges, edges[1:])]
    return images, per_step, time.perf_counter() - start


def _grid(rows):
    """rows: [(without, with)] PIL images -> one image, a row per sample: without SAG | with SAG."""
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (2 * w, h * len(rows)))
    for i, (plain, guided) in enumerate(rows):
        grid.paste(plain, (0, i * h))
        grid.paste(guided, (w, i * h))
    return grid


def sample(a) -> int:
    _check_sample_args(a)
    import torch

    import sag_fast

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here")
    dtype = getattr(torch, DTYPES[a.dtype or ("fp16" if device.type == "cuda" else "fp32")])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    pipe, source = _load_pipeline(a.model, device, dtype)
    _set_scheduler(pipe, a.scheduler)
    pipe.set_progress_bar_config(disable=a.no_progress)
    os.makedirs(a.output_dir, exist_ok=True)

    print(f"model: {source} | scheduler: {type(pipe.scheduler).__name__} | device: {device} | dtype: {dtype}")
    plain, plain_steps, plain_total = _run(pipe, a, a.seed, device, sync)
    sag_fast.enable_sag(pipe, scale=a.sag_scale, blur_sigma=a.blur_sigma)
    try:
        guided, sag_steps, sag_total = _run(pipe, a, a.seed, device, sync)
    finally:
        sag_fast.disable_sag(pipe)

    files = []
    for i, (p_img, g_img) in enumerate(zip(plain, guided)):
        for tag, img in (("nosag", p_img), ("sag", g_img)):
            path = os.path.join(a.output_dir, f"sample{i}_{tag}.png")
            img.save(path)
            files.append(path)
    grid_path = os.path.join(a.output_dir, "grid.png")
    _grid(list(zip(plain, guided))).save(grid_path)
    report = {
        "settings": {k: v for k, v in vars(a).items() if k != "command"} | {
            "model": source, "scheduler": type(pipe.scheduler).__name__, "device": str(device), "dtype": str(dtype)},
        "timing": {
            "no_sag": {"total_s": round(plain_total, 4), "per_step_s": plain_steps},
            "sag": {"total_s": round(sag_total, 4), "per_step_s": sag_steps},
            "sag_overhead": round(sag_total / plain_total, 3) if plain_total > 0 else None,
        },
        "images": files,
        "grid": grid_path,
    }
    json_path = os.path.join(a.output_dir, "run.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"without SAG: {plain_total:.2f} s, with SAG: {sag_total:.2f} s "
          f"({report['timing']['sag_overhead']}x)")
    print(f"grid (left: without SAG, right: with SAG): {grid_path}")
    print(f"settings and per-step timings: {json_path}")
    return 0


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
    return {"sample": sample, "bench": bench}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
