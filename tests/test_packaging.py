"""The dependency floor in setup.py is the version the test suite runs: requirements.txt pins the diffusers the
tests install, and setup.py's floor must be exactly that version (a higher pin without raising the floor would
claim support for versions nothing tests)."""
from __future__ import annotations

import pathlib
import re

import diffusers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_diffusers_floor_is_the_tested_version():
    pinned = re.search(r"^diffusers==([\w.]+)$", (ROOT / "requirements.txt").read_text(), re.M)
    floor = re.search(r'"diffusers>=([\w.]+)"', (ROOT / "setup.py").read_text())
    assert pinned and floor, "requirements.txt must pin diffusers==X and setup.py require diffusers>=X"
    assert floor.group(1) == pinned.group(1) == diffusers.__version__


def test_a_deprecation_triggered_by_sag_fast_fails():
    """pytest.ini turns a FutureWarning / DeprecationWarning attributed to a sag_fast module into an error (a
    deprecated diffusers or torch API in our code fails the suite); elsewhere it stays a warning."""
    import warnings

    import pytest

    for category in (FutureWarning, DeprecationWarning):
        with pytest.raises(category):
            warnings.warn_explicit("x is deprecated", category, "engine.py", 1, module="sag_fast.engine")
        with pytest.warns(category):
            warnings.warn_explicit("x is deprecated", category, "other.py", 1, module="somelib.other")
