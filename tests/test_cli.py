"""The main job from the command line: `python -m sag_fast sample` on the built-in tiny model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sag_fast.__main__ import main


def test_sample_writes_images_grid_and_timings(tmp_path):
    out = tmp_path / "run"
    assert main(["sample", "--steps", "3", "--batch", "2", "--seed", "3", "--no-progress", "--output-dir", str(out)]) == 0
    report = json.loads((out / "run.json").read_text())
    assert report["settings"]["steps"] == 3 and report["settings"]["sag_scale"] == 0.75
    for run in ("no_sag", "sag"):
        steps = report["timing"][run]["per_step_s"]
        assert len(steps) == 3 and all(s > 0 for s in steps)
    assert len(report["images"]) == 4
    plain = np.asarray(Image.open(out / "sample0_nosag.png"), dtype=np.int16)
    guided = np.asarray(Image.open(out / "sample0_sag.png"), dtype=np.int16)
    grid = np.asarray(Image.open(report["grid"]), dtype=np.int16)
    h, w, _ = plain.shape
    assert grid.shape == (2 * h, 2 * w, 3)
    # left column: without SAG, right column: with SAG, same seed
    assert np.array_equal(grid[:h, :w], plain) and np.array_equal(grid[:h, w:], guided)
    assert np.abs(plain - guided).max() > 0, "SAG changed nothing"


def test_sag_scale_zero_matches_the_unguided_image(tmp_path):
    main(["sample", "--steps", "2", "--sag-scale", "0", "--no-progress", "--output-dir", str(tmp_path)])
    plain = np.asarray(Image.open(tmp_path / "sample0_nosag.png"))
    guided = np.asarray(Image.open(tmp_path / "sample0_sag.png"))
    assert np.array_equal(plain, guided)


@pytest.mark.parametrize("args, word", [
    (["--steps", "0"], "--steps"),
    (["--height", "60"], "--height"),
    (["--blur-sigma", "0"], "--blur-sigma"),
    (["--model", "/nonexistent/folder"], "--model"),
])
def test_bad_arguments_name_the_option(tmp_path, args, word):
    with pytest.raises(SystemExit) as err:
        main(["sample", "--no-progress", "--output-dir", str(tmp_path), *args])
    assert word in str(err.value)


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "sag_fast", "--help"], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")})
    assert res.returncode == 0 and "sample" in res.stdout and "bench" in res.stdout


def test_scheduler_names_are_the_table():
    from sag_fast.__main__ import SCHEDULER_NAMES
    from sag_fast.diffusers.schedulers import SCHEDULERS

    assert sorted(SCHEDULER_NAMES) == sorted(SCHEDULERS)


def test_scheduler_option_replaces_the_pipeline_scheduler(tmp_path):
    main(["sample", "--steps", "2", "--scheduler", "euler_a", "--no-progress", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["settings"]["scheduler"] == "EulerAncestralDiscreteScheduler"
