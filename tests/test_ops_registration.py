"""How the ops are registered and imported: every `sag_fast::` op has a fake after `import sag_fast` alone, the
ops layer imports only torch, triton, the extension and itself, and the package has no import cycle."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import sag_fast

PKG = pathlib.Path(sag_fast.__file__).parent

_FAKE_CALLS = r"""
import torch
import sag_fast  # nothing else from sag_fast
from torch._subclasses.fake_tensor import FakeTensorMode

ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sag_fast::"))
print("ops", ",".join(ops))
with FakeTensorMode():
    e = lambda *s, dtype=torch.float16: torch.empty(*s, dtype=dtype, device="cuda")
    x = e(2, 4, 16, 24)
    calls = {
        "degrade": lambda: torch.ops.sag_fast.degrade(x, e(2, 4, 16, 24), e(2, 4, 6, dtype=torch.bool),
                                                      e(2, dtype=torch.float32), e(2, dtype=torch.float32), 9, 1.0),
        "guidance_combine": lambda: torch.ops.sag_fast.guidance_combine(e(4, 4, 16, 24), e(2, 4, 16, 24), 5.0, 0.5),
        "guidance_shift_": lambda: torch.ops.sag_fast.guidance_shift_(e(4, 4, 16, 24), e(2, 4, 16, 24), 0.5) or x,
        "mask_from_probs": lambda: torch.ops.sag_fast.mask_from_probs(e(2, 3, 20, 12), 3, 4, 1.0, 3),
        "mask_from_qk": lambda: torch.ops.sag_fast.mask_from_qk(e(2, 3, 20, 16), e(2, 3, 12, 16), 3, 4, 1.0, 0.25),
    }
    assert set(calls) == set(ops), (sorted(calls), ops)
    for name in ops:
        out = calls[name]()
        print(name, tuple(out.shape), out.device)
"""


@pytest.mark.skipif(not sag_fast.extension_available(), reason="sag_fast._C is not built")
def test_every_op_has_a_fake_after_import_sag_fast_alone():
    """In a fresh process that imports only `sag_fast`, every op of the namespace runs under FakeTensor with
    CUDA tensors (what torch.compile traces with); a new op without a case here fails the test."""
    out = subprocess.run([sys.executable, "-c", _FAKE_CALLS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["ops"] == "degrade,guidance_combine,guidance_shift_,mask_from_probs,mask_from_qk"
    assert lines["degrade"] == "(2, 4, 16, 24) cuda:0"
    assert lines["guidance_combine"] == "(2, 4, 16, 24) cuda:0"
    assert lines["mask_from_probs"] == "(2, 3, 4) cuda:0"
    assert lines["mask_from_qk"] == "(2, 3, 4) cuda:0"


def _module_imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules a file imports at module level or inside functions."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` imports module x
    return names


def _package_modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def test_ops_import_only_torch_triton_the_extension_and_ops():
    mods = _package_modules()
    for name, path in mods.items():
        if not name.startswith("sag_fast.ops"):
            continue
        for imported in _module_imports(path):
            top = imported.split(".")[0]
            if top == "sag_fast":
                assert imported.startswith(("sag_fast.ops", "sag_fast._lib")) or imported == "sag_fast", \
                    f"{name} imports {imported}"
            else:
                assert top not in ("diffusers", "transformers"), f"{name} imports {imported}"


def test_no_import_cycle_between_modules():
    """The graph of sag_fast's modules (an edge for each import of a sibling module, ignoring a package's
    own __init__ that every submodule import runs) has no cycle."""
    mods = _package_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imported in _module_imports(path):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                deps.add(imported)
        graph[name] = deps
    # packages import their submodules (sag_fast -> sag_fast.ops.degrade); a submodule's import of a sibling
    # goes through the package's __init__ only for loading, which is not an edge of its own
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
