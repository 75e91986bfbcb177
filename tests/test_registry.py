"""sag_fast.diffusers.registry: one record per model family, and the only place that names one."""
from __future__ import annotations

import pathlib
import re

import diffusers
import pytest

from sag_fast.diffusers import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_tables_are_the_registrys():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- registry-tables:start[^>]*-->\n(.*?)\n<!-- registry-tables:end -->", readme, re.S)
    assert block is not None, "README.md lost its registry-tables markers"
    assert block.group(1) == registry.markdown_tables(), \
        "README tables differ from the registry: paste sag_fast.diffusers.registry.markdown_tables() between the markers"


@pytest.mark.parametrize("family", registry.FAMILIES, ids=lambda f: f.name)
def test_each_record_names_real_diffusers_classes(family):
    for name in family.pipelines + family.denoisers:
        assert hasattr(diffusers, name), f"{family.name}: diffusers has no {name}"
    assert family.refusal is not None or family.source, f"{family.name}: say where the layout was read"


def test_a_pipeline_has_one_record():
    seen = [p for f in registry.FAMILIES for p in f.pipelines]
    assert len(seen) == len(set(seen))


def test_no_other_integration_module_names_a_family():
    """Adding a family is one record: the engine, session, contract, guider and capture name no pipeline or
    denoiser class of a family (the drop-in pipelines and the tiny test models are the exceptions by purpose)."""
    names = {n for f in registry.FAMILIES for n in f.pipelines + f.denoisers}
    for path in ("sag_fast/engine.py", "sag_fast/capture.py", "sag_fast/diffusers/session.py",
                 "sag_fast/diffusers/contract.py", "sag_fast/diffusers/guider.py", "sag_fast/diffusers/hooks.py"):
        text = (ROOT / path).read_text()
        named = sorted(n for n in names if re.search(rf"\b{n}\b", text))
        assert not named, f"{path} names {named}: that fact belongs in the family's registry record"


def test_bad_record_is_refused():
    with pytest.raises(ValueError, match="cfg must be"):
        registry.Family(name="x", pipelines=("P",), denoisers=("D",), cfg="sideways")
    with pytest.raises(ValueError, match="names its denoiser"):
        registry.Family(name="x", pipelines=("P",))


def test_top_level_names():
    import sag_fast
    from sag_fast.diffusers import hooks

    assert sag_fast.sag_config is hooks.sag_config and sag_fast.last_mask is hooks.last_mask
