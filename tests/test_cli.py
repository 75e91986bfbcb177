"""The command line: `python -m sag_fast sample` (the demo on the built-in model, and tiny SD) and its refusals."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sag_fast.__main__ as cli
from sag_fast.__main__ import main
from sag_fast.models import BUILTIN_DIR


def _run(tmp_path, *args):
    out = tmp_path / "run"
    assert main(["sample", "--no-progress", "--output-dir", str(out), *args]) == 0
    return out, json.loads((out / "run.json").read_text())


def test_demo_grid_rows_are_seeds_columns_without_with_difference_and_mask(tmp_path):
    out, report = _run(tmp_path, "--steps", "4", "--batch", "2", "--seed", "3", "--cond-rows", "2")
    assert report["settings"]["batch"] == 2 and "built-in" in report["settings"]["model"]
    f = report["difference_factor"]
    assert report["grid_columns"] == ["without SAG", "with SAG", f"|difference| x{f}", "SAG mask at the middle step"]
    assert 1 <= f <= 64
    plain = Image.open(out / "sample1_nosag.png")
    guided = Image.open(out / "sample1_sag.png")
    assert plain.size == (32, 32)
    k = report["grid_upscale"]
    assert k == 4  # 32-pixel samples are shown at 128 pixels
    grid = np.asarray(Image.open(report["grid"]), dtype=np.int16)
    rows = report["grid_rows"]  # 2 unconditional rows, then 2 class-conditional ones, each block under its titles
    assert [r["block"] for r in rows] == [0, 0, 1, 1]
    assert grid.shape == (2 * cli.HEADER + 4 * 32 * k, 4 * 32 * k, 3)
    assert rows[0]["y"] == cli.HEADER and rows[2]["y"] == 2 * cli.HEADER + 2 * 32 * k
    row = grid[rows[1]["y"]:rows[1]["y"] + 32 * k]  # the second seed's row
    up = lambda im: np.asarray(im.resize((32 * k, 32 * k), Image.NEAREST), dtype=np.int16)  # noqa: E731
    assert np.array_equal(row[:, :32 * k], up(plain)) and np.array_equal(row[:, 32 * k:64 * k], up(guided))
    assert np.abs(up(plain) - up(guided)).max() > 0, "SAG changed nothing"
    # the difference column is |with - without| times the factor written in its title
    diff = np.clip(np.abs(up(guided) - up(plain)) * f, 0, 255)
    assert np.abs(row[:, 64 * k:96 * k] - diff).max() <= 1
    mask_cell = row[:, 96 * k:]
    assert not np.array_equal(mask_cell, up(guided)) and 0 < report["mask_fraction"] < 1
    # the class-conditional rows: CFG | CFG + SAG from the same noise, one class per row
    cond = report["conditional"]
    assert cond["classes"] == ["circle", "square"] and cond["columns"][0].startswith("class-cond., CFG 3")
    c_plain = Image.open(out / "cond1_square_cfg.png")
    c_guided = Image.open(out / "cond1_square_cfg_sag.png")
    c_row = grid[rows[3]["y"]:rows[3]["y"] + 32 * k]
    assert np.array_equal(c_row[:, 32 * k:64 * k], up(c_guided))
    assert np.abs(up(c_plain) - up(c_guided)).max() > 0 and 0 < cond["mask_fraction"] < 1
    # row i is seed + i: the same seed alone gives row 1's image
    # (up to a rounding step: CPU convolutions differ in the last bits between batch 1 and 2, which flips the
    # uint8 rounding of a pixel or so with the step-3400 weights)
    out2, _ = _run(tmp_path / "b", "--steps", "4", "--batch", "1", "--seed", "4", "--cond-rows", "0")
    alone = np.asarray(Image.open(out2 / "sample0_nosag.png"), dtype=np.int16)
    d = np.abs(alone - np.asarray(plain, dtype=np.int16))
    assert d.max() <= 1 and (d > 0).mean() < 0.01


def test_cond_rows_need_the_builtin_model(tmp_path):
    with pytest.raises(SystemExit, match="--cond-rows"):
        main(["sample", "--model", "tiny-sd", "--cond-rows", "2", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--cond-rows"):
        main(["sample", "--cond-rows", "-1", "--output-dir", str(tmp_path)])


def test_timing_is_warmed_up_medians_and_their_ratio(tmp_path, monkeypatch):
    calls = []
    original = cli._run

    def counting(pipe, a, steps, *rest, **kw):
        calls.append(steps)
        return original(pipe, a, steps, *rest, **kw)

    monkeypatch.setattr(cli, "_run", counting)
    _, report = _run(tmp_path, "--model", "tiny-sd", "--steps", "3")
    assert calls[:2] == [2, 2] and calls[2:] == [3, 3], "two untimed warm-up runs, then the timed ones"
    t = report["timing"]
    for run in ("no_sag", "sag"):
        steps = t[run]["per_step_s"]
        assert len(steps) == 3 and all(s > 0 for s in steps)
        assert t[run]["median_step_s"] == pytest.approx(float(np.median(steps)), abs=1e-6)
    assert t["sag_step_ratio"] == pytest.approx(t["sag"]["median_step_s"] / t["no_sag"]["median_step_s"], abs=2e-3)


def test_tiny_sd_model_still_available(tmp_path):
    out, report = _run(tmp_path, "--model", "tiny-sd", "--steps", "2")
    assert "tiny SD" in report["settings"]["model"]
    assert Image.open(out / "sample0_sag.png").size == (64, 64)
    assert len(report["grid_columns"]) == 4 and report["conditional"] is None  # no class-conditional rows


def test_sag_scale_zero_matches_the_unguided_image(tmp_path):
    out, _ = _run(tmp_path, "--steps", "2", "--batch", "1", "--sag-scale", "0", "--cond-rows", "0")
    assert np.array_equal(np.asarray(Image.open(out / "sample0_nosag.png")),
                          np.asarray(Image.open(out / "sample0_sag.png")))


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_pndm_runs_with_few_steps_and_one_model_call_per_step(tmp_path, steps):
    # PNDM with Runge-Kutta warm-up steps crashed at 2-3 steps and made 13 model calls for 4 steps
    _, report = _run(tmp_path, "--model", "tiny-sd", "--scheduler", "pndm", "--steps", str(steps))
    assert report["settings"]["scheduler"] == "PNDMScheduler"
    calls = len(report["timing"]["no_sag"]["per_step_s"])
    assert calls <= steps + 1, f"{calls} scheduler steps for --steps {steps}"


def test_size_too_small_for_the_blur_is_refused_before_sampling(tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before the size was checked")

    monkeypatch.setattr(cli, "_run", no_sampling)
    with pytest.raises(SystemExit) as err:
        main(["sample", "--model", "tiny-sd", "--height", "32", "--width", "32", "--no-progress",
              "--output-dir", str(tmp_path)])
    assert "--height" in str(err.value) and ">= 40" in str(err.value)


def test_model_folder_loads_without_the_torch_dtype_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(tmp_path, "--model", BUILTIN_DIR, "--steps", "1", "--batch", "1")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


@pytest.mark.parametrize("args, word", [
    (["--steps", "0"], "--steps"),
    (["--height", "60", "--width", "64"], "--height"),
    (["--height", "32"], "--width"),   # a lone size was silently ignored by diffusers
    (["--width", "48"], "--height"),
    (["--blur-sigma", "0"], "--blur-sigma"),
    (["--batch", "0"], "--batch"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--model", "/nonexistent/folder"], "--model"),
    (["--height", "64", "--width", "64"], "--height"),  # the built-in model has no height/width
    (["--kernel-size", "4"], "--kernel-size"),
    (["--threshold", "-1"], "--threshold"),
    (["--sag-scale", "nan"], "--sag-scale"),
])
def test_bad_arguments_name_the_option(tmp_path, args, word):
    with pytest.raises(SystemExit) as err:
        main(["sample", "--no-progress", "--output-dir", str(tmp_path), *args])
    assert word in str(err.value)


def test_missing_model_folder_message_is_ours(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["sample", "--model", "/nonexistent/folder", "--output-dir", str(tmp_path)])
    msg = str(err.value)
    assert "no such folder" in msg and "repo" not in msg.lower() and "huggingface" not in msg.lower()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as err:
        main(["sample", "--model", str(empty), "--output-dir", str(tmp_path)])
    assert "model_index.json" in str(err.value)


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "sag_fast", "--help"], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")})
    assert res.returncode == 0 and all(c in res.stdout for c in ("sample", "quality", "bench"))


def test_scheduler_names_are_the_table():
    from sag_fast.__main__ import SCHEDULER_NAMES
    from sag_fast.diffusers.schedulers import SCHEDULERS

    assert sorted(SCHEDULER_NAMES) == sorted(SCHEDULERS)


def test_scheduler_option_replaces_the_pipeline_scheduler(tmp_path):
    _, report = _run(tmp_path, "--model", "tiny-sd", "--steps", "2", "--scheduler", "euler_a")
    assert report["settings"]["scheduler"] == "EulerAncestralDiscreteScheduler"


def test_builtin_model_with_a_scheduler_whose_step_takes_no_generator(tmp_path):
    # DDPMPipeline passes generator= to every scheduler.step; LMS/PNDM do not take it
    _, report = _run(tmp_path, "--steps", "3", "--batch", "1", "--scheduler", "pndm", "--cond-rows", "0")
    assert report["settings"]["scheduler"] == "PNDMScheduler"


def test_sd3_folder_with_layer_threshold_kernel_size_and_a_negative_scale(tmp_path):
    """An SD3 pipeline folder (saved from the tiny one) through --model, with the SAG settings as options; a
    negative --sag-scale is accepted (one rule with the API: any finite scale)."""
    from sag_fast.diffusers.tiny import tiny_sd3_pipeline

    folder = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    out, report = _run(tmp_path, "--model", str(folder), "--steps", "2", "--height", "64", "--width", "64",
                       "--layer", "transformer_blocks.0.attn", "--threshold", "0.8", "--kernel-size", "5",
                       "--sag-scale", "-0.5", "--prompt", "a red square")
    settings = report["settings"]
    assert (settings["layer"], settings["threshold"], settings["kernel_size"], settings["sag_scale"]) == \
        ("transformer_blocks.0.attn", 0.8, 5, -0.5)
    plain = np.asarray(Image.open(out / "sample0_nosag.png"), dtype=np.int16)
    guided = np.asarray(Image.open(out / "sample0_sag.png"), dtype=np.int16)
    assert plain.shape == (64, 64, 3) and np.abs(plain - guided).max() > 0
    with pytest.raises(SystemExit, match="not an attention layer"):
        main(["sample", "--no-progress", "--output-dir", str(tmp_path / "x"), "--model", str(folder), "--steps", "1",
              "--layer", "pos_embed"])


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["distilled", "true_cfg"])
def test_flux_folder(tmp_path, negative):
    """A Flux pipeline folder (the tiny one, saved with its text encoders): guidance-distilled, or true CFG when a
    negative prompt is given (then --guidance-scale is the true-CFG scale)."""
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    folder = tmp_path / "flux"
    tiny_flux_pipeline(text_encoders=True).save_pretrained(folder)
    args = ["--model", str(folder), "--steps", "3", "--height", "64", "--width", "64", "--guidance-scale", "4"]
    out, report = _run(tmp_path, *args, *(["--negative-prompt", negative] if negative else []))
    plain = np.asarray(Image.open(out / "sample0_nosag.png"), dtype=np.int16)
    guided = np.asarray(Image.open(out / "sample0_sag.png"), dtype=np.int16)
    assert plain.shape == (64, 64, 3) and np.abs(plain - guided).max() > 0
    assert report["grid_columns"][-1] == "SAG mask at the middle step"


def test_wan_folder_writes_videos_without_with_and_side_by_side(tmp_path):
    """A Wan text-to-video folder (the tiny one, saved with a text encoder and VAE) with --num-frames: animated
    WebPs without SAG, with SAG and side by side (left without, right with), the grid of middle frames with the
    middle frame's mask; --num-frames on an image pipeline is refused."""
    from sag_fast.diffusers.tiny import tiny_wan_pipeline

    folder = tmp_path / "wan"
    tiny_wan_pipeline(text_encoders=True).save_pretrained(folder)
    out, report = _run(tmp_path, "--model", str(folder), "--num-frames", "5", "--steps", "2", "--height", "32",
                       "--width", "32", "--kernel-size", "3", "--negative-prompt", "blurry", "--guidance-scale", "5")

    def frames(name):
        with Image.open(out / name) as im:
            assert im.n_frames == 5
            return [np.asarray(im.seek(i) or im.convert("RGB"), dtype=np.int16) for i in range(im.n_frames)]

    plain, guided, both = frames("sample0_nosag.webp"), frames("sample0_sag.webp"), frames("sample0_side_by_side.webp")
    assert plain[0].shape == (32, 32, 3) and both[0].shape == (32, 64, 3)
    assert all(np.array_equal(b[:, :32], p) and np.array_equal(b[:, 32:], g) for p, g, b in zip(plain, guided, both))
    assert max(np.abs(p - g).max() for p, g in zip(plain, guided)) > 0, "SAG changed nothing"
    assert np.array_equal(np.asarray(Image.open(out / "sample0_sag.png").convert("RGB"), dtype=np.int16), guided[2])
    assert {os.path.basename(v) for v in report["videos"]} >= {"sample0_nosag.webp", "sample0_sag.webp",
                                                               "sample0_side_by_side.webp"}
    assert 0 < report["mask_fraction"] < 1 and report["grid_columns"][-1] == "SAG mask at the middle step"
    with pytest.raises(SystemExit, match="--num-frames: StableDiffusionPipeline is not a video pipeline"):
        main(["sample", "--no-progress", "--output-dir", str(tmp_path / "x"), "--model", "tiny-sd", "--steps", "1",
              "--num-frames", "4"])


def test_qwenimage_folder(tmp_path):
    """A QwenImage pipeline folder (the tiny one, saved with its Qwen2.5-VL text encoder and tokenizer), true CFG
    (a negative prompt; --guidance-scale is the true-CFG scale): packed latents and padded prompts through the CLI."""
    from sag_fast.diffusers.tiny import tiny_qwenimage_pipeline

    folder = tmp_path / "qwenimage"
    tiny_qwenimage_pipeline(text_encoder=True).save_pretrained(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is several times faster
    try:
        out, report = _run(tmp_path, "--model", str(folder), "--steps", "2", "--height", "32", "--width", "32",
                           "--guidance-scale", "4", "--negative-prompt", "blurry")
    finally:
        torch.set_num_threads(threads)
    plain = np.asarray(Image.open(out / "sample0_nosag.png"), dtype=np.int16)
    guided = np.asarray(Image.open(out / "sample0_sag.png"), dtype=np.int16)
    assert plain.shape == (32, 32, 3) and np.abs(plain - guided).max() > 0
    assert report["grid_columns"][-1] == "SAG mask at the middle step"
