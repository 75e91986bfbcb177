"""The built-in model ships inside the package as a diffusers folder and loads offline."""
import ast
import fnmatch
import os

import pytest
import torch

from sag_fast.models import BUILTIN_DIR, builtin_pipeline, shapes
from sag_fast.models.features import FEATURES_DIR, feature_metrics, load_feature_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("cls_name", ["DDPMPipeline", "DDIMPipeline"])
def test_loads_offline_through_diffusers(cls_name):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(BUILTIN_DIR, local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DModel" and pipe.unet.config.sample_size == 32
    # self-attention at two resolutions or more (16x16 and 8x8)
    attn = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "Attention"]
    assert {n.split(".")[0] + n.split(".")[1] for n in attn if "blocks" in n} >= {"down_blocks1", "down_blocks2"}
    assert any(n.startswith("mid_block") for n in attn)


def test_size_under_20_mb():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BUILTIN_DIR) for f in fs)
    assert total <= 20 * 2 ** 20


def test_package_data_ships_the_model_and_the_feature_net():
    # the files must match setup.py's package_data, or an installed wheel has no model
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    patterns = data["sag_fast.models"]
    base = os.path.join(ROOT, "sag_fast", "models")
    files = [os.path.relpath(os.path.join(d, f), base) for top in (BUILTIN_DIR, FEATURES_DIR)
             for d, _, fs in os.walk(top) for f in fs]
    assert len(files) >= 6
    for f in files:
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f"{f} is not in setup.py's package_data"


def test_samples_are_near_the_data_in_feature_space():
    """The model is trained: its samples are far closer to held-out data (FID in the feature network's space)
    than noise is, and carry no more edge energy than a fraction of noise's."""
    from diffusers import DDIMPipeline

    from sag_fast import quality

    pipe = builtin_pipeline(cls=DDIMPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=64, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images * 2 - 1
    net = load_feature_net()
    real = quality.embed(net, shapes.holdout(512))
    mu, sd = real.mean(0), real.std(0)
    feats = lambda x: (quality.embed(net, x) - mu) / sd  # noqa: E731
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = (real - mu) / sd
    assert quality.fid(ref, feats(images)) < 0.5 * quality.fid(ref, feats(noise))
    assert quality.edge_energy(images) < 0.3 * quality.edge_energy(noise)


def test_feature_net_accuracy_is_recorded_and_holds():
    m = feature_metrics()
    assert m["shape"] >= 0.8 and m["colour"] >= 0.8
    x, shape, colour = shapes.generate(256, 123_456, with_labels=True)
    with torch.no_grad():
        out = load_feature_net().predict(x)
    assert (out["shape"].argmax(1) == shape).float().mean() >= m["shape"] - 0.08


def test_data_generator_is_seeded_and_holdout_is_disjoint():
    a, b = shapes.generate(8, 5), shapes.generate(8, 5)
    assert torch.equal(a, b) and not torch.equal(a, shapes.generate(8, 6))
    assert a.shape == (8, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    # held-out seeds (HOLDOUT_SEED * 1000 + ...) stay below the training stream's first seed
    assert shapes.HOLDOUT_SEED * 1000 + 100 * 2 < shapes.TRAIN_SEED
    assert not torch.equal(shapes.holdout(8), shapes.holdout(8, stream=1))
