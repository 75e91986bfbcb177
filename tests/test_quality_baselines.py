"""Issue 18's quality rows: the PAG-style baseline (identity self-attention), the class-conditional built-in model
(CFG and CFG + SAG through SAGSampler), rows at two sample counts, and the training script's new options."""
import fnmatch
import importlib.util
import json
import os

import pytest
import torch

from sag_fast import quality
from sag_fast.__main__ import main
from sag_fast.models import BUILTIN_COND_DIR, builtin_cond, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _attention(**kw):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=4, heads=2, dim_head=2, **kw).eval()


def test_identity_attention_gives_the_value_input():
    # hand example: value and output projections set to the identity, so "attention output = value" means the
    # layer returns its input unchanged, whatever the queries and keys would have attended to
    attn = _attention(bias=False)
    with torch.no_grad():
        attn.to_v.weight.copy_(torch.eye(4))
        attn.to_out[0].weight.copy_(torch.eye(4))
        attn.to_out[0].bias.zero_()
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0], [3.0, -2.0, 1.0, 0.0]]])
    out = quality.IdentityAttnProcessor()(attn, x)
    assert torch.equal(out, x)
    # and the usual processor does not: its attention mixes the three tokens
    assert not torch.allclose(attn(x), x, atol=1e-3)


def test_identity_attention_is_attention_restricted_to_the_diagonal():
    # UNet-style layer (group norm, residual, rescale, 4D input): the same as diffusers' own processor whose
    # attention mask allows each token only itself
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention(norm_num_groups=2, residual_connection=True, rescale_output_factor=2.0, bias=True)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.full((2, 9, 9), float("-inf"))
    mask[:, torch.arange(9), torch.arange(9)] = 0.0
    with torch.no_grad():
        ours = quality.IdentityAttnProcessor()(attn, x)
        diagonal = AttnProcessor2_0()(attn, x, attention_mask=mask)
        full = AttnProcessor2_0()(attn, x)
    torch.testing.assert_close(ours, diagonal, rtol=1e-5, atol=1e-6)
    assert (ours - full).abs().max() > 1e-3


def test_identity_attention_refuses_cross_attention():
    attn = _attention()
    with pytest.raises(ValueError, match="self-attention"):
        quality.IdentityAttnProcessor()(attn, torch.randn(1, 3, 4), encoder_hidden_states=torch.randn(1, 2, 4))


def test_pag_style_model_is_eps_plus_scale_times_the_perturbation():
    unet, _ = quality.load_builtin()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500, 300])
    with torch.no_grad():
        eps = unet(x, t).sample
        zero = quality.PAGStyleModel(unet, 0.0)
        assert torch.equal(zero(x, t), eps)
        pag = quality.PAGStyleModel(unet, 1.5)
        before = pag.attn.processor
        out = pag(x, t)
        assert pag.attn.processor is before  # the layer's own processor is back after the call
        pag.attn.set_processor(quality.IdentityAttnProcessor())
        perturbed = unet(x, t).sample
        pag.attn.set_processor(before)
    assert (perturbed - eps).abs().mean() > 1e-3  # the perturbation changes the prediction
    torch.testing.assert_close(out, eps + 1.5 * (eps - perturbed), rtol=1e-5, atol=1e-5)


def test_pag_style_model_names_a_bad_layer():
    unet, _ = quality.load_builtin()
    with pytest.raises(ValueError, match="layer"):
        quality.PAGStyleModel(unet, 1.0, layer="conv_in")


def test_conditional_model_loads_offline_and_uses_its_class():
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(BUILTIN_COND_DIR, subfolder="unet", local_files_only=True).float().eval()
    with open(os.path.join(BUILTIN_COND_DIR, "labels.json")) as f:
        labels = json.load(f)
    assert labels["classes"] == list(shapes.SHAPES) and labels["null_class"] == len(shapes.SHAPES)
    assert unet.config.num_class_embeds == len(shapes.SHAPES) + 1 and unet.config.sample_size == 32
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([400, 400])
    with torch.no_grad():
        circle = unet(x, t, class_labels=torch.tensor([0, 0])).sample
        null = unet(x, t, class_labels=torch.tensor([5, 5])).sample
    assert (circle - null).abs().mean() > 1e-4  # the class changes the prediction: the model is conditional
    # the package loader gives the same model
    unet2, _, labels2 = builtin_cond()
    assert labels2 == labels and unet2.config.num_class_embeds == unet.config.num_class_embeds


def test_conditional_model_is_small_and_in_package_data():
    import ast

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BUILTIN_COND_DIR) for f in fs)
    assert total <= 20 * 2 ** 20
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    patterns = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))["sag_fast.models"]
    base = os.path.join(ROOT, "sag_fast", "models")
    files = [os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(BUILTIN_COND_DIR) for f in fs]
    assert len(files) >= 4
    for f in files:
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f"{f} is not in setup.py's package_data"


def test_holdout_labels_are_the_largest_shape_of_the_images():
    _, shape, _ = shapes.generate(40, shapes.HOLDOUT_SEED * 1000 + 200, with_labels=True)
    assert torch.equal(shapes.holdout_labels(40), shape)  # the 8x8 render gives the 32x32 labels
    assert len(set(shapes.holdout_labels(300).tolist())) == len(shapes.SHAPES)


def test_small_run_with_every_kind_of_row(tmp_path):
    report = quality.run(n=16, steps=2, batch=8, settings=["PAG-style s=1.5", "cond CFG 1.5 + SAG 0.75"],
                         n_boot=3, n_real=128, n_rest=8, log=lambda *a: None)
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["none", "PAG-style s=1.5", "cond", "cond CFG 1.5 + SAG 0.75"]  # baselines added
    # N: main rows at n, the others at n_rest; costs counted on the UNet
    assert [rows[k]["n"] for k in rows] == [16, 16, 8, 8]
    assert rows["none"]["forwards"] == 2 and rows["PAG-style s=1.5"]["forwards"] == 4
    assert rows["cond"]["forwards"] == 2
    assert rows["cond CFG 1.5 + SAG 0.75"]["forwards"] == 6  # CFG's 2 ways + SAG's degraded unconditional way
    assert rows["PAG-style s=1.5"]["baseline"] == "none" and rows["cond CFG 1.5 + SAG 0.75"]["baseline"] == "cond"
    assert rows["cond"]["delta_ci"] is None and rows["cond CFG 1.5 + SAG 0.75"]["delta_ci"] is not None
    assert rows["PAG-style s=1.5"]["change"] > 0 and rows["cond CFG 1.5 + SAG 0.75"]["change"] > 0
    assert 0 <= rows["cond"]["extra"]["class_accuracy"] <= 1 and "class_accuracy" not in rows["none"]["extra"]
    noise = report["references"]["noise vs held-out data"]
    assert all(r["fid"] < noise for r in rows.values())
    md, png = tmp_path / "q.md", tmp_path / "q.png"
    quality.plot(report, str(png))
    quality.write_markdown(report, str(md), str(png), notes="interim")
    text = md.read_text()
    assert "| cond CFG 1.5 + SAG 0.75 | 8 | 6.0 |" in text and "vs cond" in text and "interim" in text
    assert png.stat().st_size > 10_000


def _fake_report(names, n=10, n_real=10):
    rows = [dict(name=k, fields=quality.SETTINGS[k], forwards=2.0, seconds=1.0, fid=5.0 + i, fid_ci=[4.0, 9.0],
                 kid=[0.1, 0.01], delta_ci=None if k in ("none", "cond") else [-1.0, 1.0], n=n,
                 baseline=quality.baseline_of(k), base_fid=None if k in ("none", "cond") else 5.0, edges=1.0,
                 change=0.5, extra={}) for i, k in enumerate(names)]
    return {"date": "2026-12-06", "n": n, "n_rest": n, "n_real": n_real, "steps": 20, "sampler": "DDIM (eta 0)",
            "bootstrap": 5, "seed": 0, "references": {"data vs held-out data": 1.0, "noise vs held-out data": 300.0},
            "models": {}, "data": {"edges": 6.0}, "feature_net": {"shape": 0.9, "colour": 0.9, "count": 0.9},
            "torch_threads": 1, "results": rows}


def test_merge_joins_split_runs_and_refuses_different_benchmarks(tmp_path):
    a = _fake_report(["none", "SAG s=0.75"])
    b = _fake_report(["none", "cond", "cond CFG 1.5"])
    b["results"][0]["fid"] = 99.0  # a duplicate keeps the first report's row
    merged = quality.merge_reports([a, b])
    assert [r["name"] for r in merged["results"]] == ["none", "SAG s=0.75", "cond", "cond CFG 1.5"]
    assert merged["results"][0]["fid"] == 5.0
    with pytest.raises(ValueError, match="n_real"):
        quality.merge_reports([a, _fake_report(["cond"], n_real=20)])
    paths = []
    for i, r in enumerate((a, b)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "m.md"
    assert main(["quality", "--merge", *map(str, paths), "--output", str(out), "--notes", "merged"]) == 0
    assert "| cond CFG 1.5 |" in out.read_text() and out.with_suffix(".png").exists()
    with pytest.raises(SystemExit, match="--merge"):
        main(["quality", "--merge", str(tmp_path / "missing.json"), "--output", str(out)])


def test_draw_refuses_a_cfg_setting_without_labels():
    unet, scheduler = quality.load_builtin()
    with pytest.raises(ValueError, match="class labels"):
        quality.draw(unet, scheduler, quality.SETTINGS["cond CFG 1.5"], 4, 1, 4, 0)


@pytest.mark.parametrize("args, word", [
    (["--n", "500", "--n-rest", "600"], "--n-rest"),
    (["--n", "500", "--n-rest", "100", "--batch", "250"], "--n-rest"),
    (["--model-dir", "/nonexistent"], "--model-dir"),
])
def test_bad_n_rest_names_the_option(tmp_path, args, word):
    with pytest.raises(SystemExit) as err:
        main(["quality", "--output", str(tmp_path / "q.md"), *args])
    assert word in str(err.value)


def _train_main():
    spec = importlib.util.spec_from_file_location("train_builtin", os.path.join(ROOT, "scripts", "train_builtin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args, word", [
    (["--init-step", "5"], "--init-step needs --init"),
    (["--classes", "9"], "--classes"),
    (["--classes", "5", "--p-uncond", "1.0"], "--p-uncond"),
])
def test_training_script_names_bad_options(tmp_path, capsys, args, word):
    with pytest.raises(SystemExit):
        _train_main()(["--work", str(tmp_path), *args])
    assert word in capsys.readouterr().err


def test_conditional_fine_tune_starts_from_the_unconditional_model(tmp_path):
    # one step of --classes from the shipped unconditional model: the class embedding starts at zero, so after
    # one warm-up step every class still predicts (nearly) what the unconditional model does; the export loads
    # with UNet2DModel.from_pretrained and records the step reached
    from diffusers import UNet2DModel

    from sag_fast.models import BUILTIN_DIR

    out = tmp_path / "cond"
    _train_main()(["--work", str(tmp_path / "work"), "--init", BUILTIN_DIR, "--init-step", "2009", "--steps", "2010",
                   "--batch", "2", "--classes", "5", "--out", str(out)])
    info = json.loads((out / "training.json").read_text())
    assert info["step"] == 2010 and info["classes"] == 5 and info["init_step"] == 2009
    rows = (tmp_path / "work" / "loss.csv").read_text().splitlines()
    assert rows[1].startswith("2009,") and len(rows) == 2  # the run continued the training stream at step 2009
    cond = UNet2DModel.from_pretrained(str(out), subfolder="unet", local_files_only=True).float().eval()
    base = UNet2DModel.from_pretrained(BUILTIN_DIR, subfolder="unet", local_files_only=True).float().eval()
    assert cond.class_embedding.weight.abs().max() < 1e-3
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([600])
    with torch.no_grad():
        ref = base(x, t).sample
        for y in (0, 5):
            torch.testing.assert_close(cond(x, t, class_labels=torch.tensor([y])).sample, ref, atol=2e-2, rtol=0)


def test_sample_sheet_of_a_run_without_the_unconditional_rows(tmp_path):
    # a run of conditional rows only has no "none" block (this crashed the first split run)
    report = {"guided_grids": {"cond": torch.zeros(32, 3, 32, 32), "cond CFG 1.5": torch.ones(32, 3, 32, 32)}}
    quality.save_samples(report, str(tmp_path / "s.png"))
    from PIL import Image

    img = Image.open(tmp_path / "s.png")
    assert img.size == (2 * 16 * 32, 2 * 2 * (12 + 2 * 32))  # two blocks of 2 x 16 samples, 2x upscaled
