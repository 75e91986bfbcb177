"""Quality benchmark: does SAG improve the built-in model's samples? (`python -m sag_fast quality`, `make quality`)

For each setting (no guidance, blur guidance, SAG at several scales/thresholds, SAG in a start/stop window) it
draws N samples with DDIM from the same seeded noise, embeds them with the feature network trained on the same
data (sag_fast.models.features) and scores them against held-out data: FID and KID from torchmetrics (given the
features, so the metrics are the library's), 95% bootstrap intervals for FID and for its difference to the
unguided setting (paired: same noise, same resampled indices), plus what SAG changes that FID may not show: the
pixel change against the unguided sample, edge energy, and how often the feature network recognises the shape.
The cost of a setting is counted, not assumed: model forwards per sample, from a hook on the UNet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import dataclass, field

import torch

# name -> SAGConfig fields. scale 0 is the unguided baseline; mask="global" is the paper's blur guidance (Sec. 5.1)
SETTINGS = {  # in order of priority: a run cut short (each setting is written as it finishes) has the main ones
    "none": dict(scale=0.0),
    "SAG s=0.75": dict(scale=0.75),
    "blur s=0.75": dict(scale=0.75, mask="global"),
    "SAG s=1.5": dict(scale=1.5),
    "SAG s=0.3": dict(scale=0.3),
    "SAG s=0.75 steps 50-100%": dict(scale=0.75, start=0.5),
    "SAG s=0.75 thr=1.5": dict(scale=0.75, threshold=1.5),
}
QUICK_SETTINGS = ("none", "SAG s=0.75")


class _GivenFeatures(torch.nn.Module):
    """Identity 'feature extractor' for torchmetrics: the features are computed once and passed in as images,
    so that bootstrap resamples re-use them instead of re-running the network."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D), computed by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets, computed by torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, len(real), len(fake))
    m = KernelInceptionDistance(feature=_GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def bootstrap_fid(real, fake, base=None, n_boot: int = 200, seed: int = 0) -> dict:
    """95% percentile intervals of FID(real, fake) and, given `base` (fake features of the baseline drawn from the
    same noise, row for row), of FID(real, fake) - FID(real, base) with the same resampled rows for both."""
    g = torch.Generator().manual_seed(seed)
    vals, diffs = [], []
    for _ in range(n_boot):
        ir = torch.randint(len(real), (len(real),), generator=g)
        jf = torch.randint(len(fake), (len(fake),), generator=g)
        v = fid(real[ir], fake[jf])
        vals.append(v)
        if base is not None:
            diffs.append(v - fid(real[ir], base[jf]))

    def ci(xs):
        xs = torch.tensor(xs)
        return [float(xs.quantile(0.025)), float(xs.quantile(0.975))]

    out = {"fid_ci": ci(vals)}
    if base is not None:
        out["delta_ci"] = ci(diffs)
    return out


def edge_energy(images: torch.Tensor) -> float:
    """Mean absolute finite difference of the images in [0, 255] units: how much edge and detail they carry."""
    x = (images.float() + 1) * 127.5
    return float(((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()) / 2)


@torch.no_grad()
def embed(net, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Features (N, D) of images in [-1, 1]."""
    return torch.cat([net(images[i:i + batch]) for i in range(0, len(images), batch)])


class _ForwardCounter:
    """Counts the batch rows the UNet is run on: model forwards per sample, as they happen."""

    def __init__(self, unet):
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample")
        self.rows += x.shape[0]

    def remove(self):
        self.handle.remove()


def load_builtin(model_dir: str | None = None):
    """(unet float32 eval, DDIM scheduler) of the built-in model, offline."""
    from diffusers import DDIMScheduler, UNet2DModel

    from .models import BUILTIN_DIR

    path = model_dir or BUILTIN_DIR
    unet = UNet2DModel.from_pretrained(path, subfolder="unet", dtype=torch.float32, local_files_only=True).eval()
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return unet, scheduler


@torch.no_grad()
def draw(unet, scheduler, config_fields: dict, n: int, steps: int, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    """n samples in [-1, 1] with SAGSampler + DDIM under `config_fields`; batch i's noise depends on (seed, i) only,
    so every setting starts from the same noise. Returns (images, forwards per sample)."""
    from .guidance import SAGConfig
    from .sampler import SAGSampler

    counter = _ForwardCounter(unet)
    sampler = SAGSampler(unet, scheduler, SAGConfig(**config_fields), progress=False)
    out = []
    try:
        for k, i in enumerate(range(0, n, batch)):
            g = torch.Generator().manual_seed(seed * 100_003 + k)
            x_T = torch.randn(min(batch, n - i), unet.config.in_channels, unet.config.sample_size,
                              unet.config.sample_size, generator=g)
            out.append(sampler(x_T, num_inference_steps=steps, generator=g).clamp(-1, 1))
    finally:
        sampler.remove()
        counter.remove()
    return torch.cat(out), counter.rows / n


@dataclass
class Result:
    name: str
    fields: dict
    forwards: float
    seconds: float
    fid: float
    fid_ci: list
    kid: tuple
    delta_ci: list | None = None
    edges: float = 0.0
    change: float = 0.0
    extra: dict = field(default_factory=dict)


def run(n: int = 2000, steps: int = 20, batch: int = 250, settings=None, n_boot: int = 200, seed: int = 0,
        model_dir: str | None = None, n_real: int | None = None, log=print, on_result=None) -> dict:
    """Samples and scores every setting; returns a JSON-able report (see `write_markdown`). on_result(report)
    is called after each setting with the report so far."""
    from .models import shapes
    from .models.features import feature_metrics, load_feature_net

    settings = list(SETTINGS) if settings is None else list(settings)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    if "none" not in settings:
        settings = ["none"] + settings  # the baseline every difference is taken against
    n_real = n_real or n
    net = load_feature_net()
    real = shapes.holdout(n_real)
    raw = embed(net, real)
    # features standardised per dimension by the held-out data's statistics: FID and KID in units of the data's
    # own spread (the network's raw activations have arbitrary scales, which made KID's cubic kernel explode)
    mu, sd = raw.mean(0), raw.std(0).clamp_min(1e-6)

    def features(images):
        return (embed(net, images) - mu) / sd

    real_f = (raw - mu) / sd
    # references that bound the scale: a second independent draw of the data (the floor) and pure noise
    other_f = features(shapes.holdout(n_real, stream=1))
    noise_f = features(torch.randn(n_real, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1))
    refs = {"data vs held-out data": fid(real_f, other_f), "noise vs held-out data": fid(real_f, noise_f)}
    log(f"reference FIDs: {refs}")
    unet, scheduler = load_builtin(model_dir)
    results, base_img, base_f = [], None, None
    report = {
        "date": datetime.date.today().isoformat(), "n": n, "n_real": n_real, "steps": steps, "sampler": "DDIM (eta 0)",
        "bootstrap": n_boot, "seed": seed, "references": refs,
        "data": {"edges": edge_energy(real)},
        "feature_net": feature_metrics(), "torch_threads": torch.get_num_threads(), "results": [],
    }
    for name in settings:
        t0 = time.perf_counter()
        images, forwards = draw(unet, scheduler, SETTINGS[name], n, steps, batch, seed)
        seconds = time.perf_counter() - t0
        feats = features(images)
        if name == "none":
            base_img, base_f = images, feats
            report["sample_grid"] = images[:64]  # for the note's picture; dropped from the JSON
        boot = bootstrap_fid(real_f, feats, None if name == "none" else base_f, n_boot, seed)
        r = Result(name, SETTINGS[name], forwards, seconds, fid(real_f, feats), boot["fid_ci"], kid(real_f, feats),
                   boot.get("delta_ci"), edge_energy(images),
                   float((images - base_img).abs().mean() * 127.5))
        results.append(r)
        report["results"] = [x.__dict__ for x in results]
        if name != "none":
            report.setdefault("guided_grids", {})[name] = images[:64]
        log(f"{name}: FID {r.fid:.2f} [{r.fid_ci[0]:.2f}, {r.fid_ci[1]:.2f}] forwards/sample {forwards:.1f} "
            f"({seconds:.0f} s)")
        if on_result is not None:
            on_result(report)
    return report


def write_markdown(report: dict, path: str, plot: str | None = None, samples: str | None = None) -> None:
    rows = report["results"]
    lines = [
        f"# Quality of the built-in model with and without SAG ({report['date']})", "",
        f"{report['n']} samples per setting, {report['sampler']} {report['steps']} steps, every setting from the same "
        f"seeded noise; scored against {report['n_real']} held-out images in the feature space of the shapes "
        f"feature network (held-out accuracy: shape {report['feature_net']['shape']:.3f}, colour "
        f"{report['feature_net']['colour']:.3f}, object count {report['feature_net']['count']:.3f}). FID and KID "
        f"by torchmetrics; [95% bootstrap interval, {report['bootstrap']} resamples]. ΔFID is paired against "
        "`none` (same noise, same resampled rows): an interval below 0 means better than no guidance.", "",
        "| setting | forwards / sample | FID | ΔFID vs none | KID (± sd over subsets) | edge energy | "
        "mean \\|Δpixel\\| vs none | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "—" if r["delta_ci"] is None else (
            f"{r['fid'] - rows[0]['fid']:+.2f} [{r['delta_ci'][0]:+.2f}, {r['delta_ci'][1]:+.2f}]")
        lines.append(
            f"| {r['name']} | {r['forwards']:.1f} | {r['fid']:.2f} [{r['fid_ci'][0]:.2f}, {r['fid_ci'][1]:.2f}] | "
            f"{delta} | {r['kid'][0]:.3f} ± {r['kid'][1]:.3f} | "
            f"{r['edges']:.2f} | {r['change']:.2f} | {r['seconds']:.0f} |")
    refs = report["references"]
    lines += [
        "", f"References: FID of a second held-out draw of the data {refs['data vs held-out data']:.2f} (the floor at "
        f"this N), of clamped Gaussian noise {refs['noise vs held-out data']:.1f}. Edge energy (mean |finite difference| "
        f"between neighbouring pixels, 0-255 units) of the held-out data: {report['data']['edges']:.2f}. Features are "
        "standardised per dimension by the held-out data's mean and standard deviation.", "",
        f"Settings: SAGConfig fields per row: " + "; ".join(f"`{r['name']}`: {r['fields']}" for r in rows) + ".",
        f"Torch threads: {report['torch_threads']}.",
    ]
    if plot:
        lines += ["", f"![FID against scale and cost]({os.path.basename(plot)})"]
    if samples:
        lines += ["", f"The first 32 samples of each setting, from the same noise: ![samples]({os.path.basename(samples)})"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))

    def err(r):
        return [[r["fid"] - r["fid_ci"][0]], [r["fid_ci"][1] - r["fid"]]]

    sag = sorted([r for r in rows if r["fields"].get("mask", "attention") == "attention"
                  and r["fields"].get("threshold", 1.0) == 1.0 and r["fields"].get("start", 0.0) == 0.0
                  and r["fields"].get("stop", 1.0) == 1.0], key=lambda r: r["fields"]["scale"])
    ax1.plot([r["fields"]["scale"] for r in sag], [r["fid"] for r in sag], "-", color="C0")
    for r in rows:
        s = r["fields"]["scale"]
        style = ("s", "C1") if r["fields"].get("mask") == "global" else ("o", "C0") if r in sag else ("^", "C2")
        ax1.errorbar([s], [r["fid"]], yerr=err(r), fmt=style[0], color=style[1], capsize=3)
        ax1.annotate(r["name"], (s, r["fid"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax2.errorbar([r["forwards"]], [r["fid"]], yerr=err(r), fmt=style[0], color=style[1], capsize=3)
        ax2.annotate(r["name"], (r["forwards"], r["fid"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    floor = report["references"]["data vs held-out data"]
    for ax in (ax1, ax2):
        ax.axhline(floor, color="gray", ls=":", lw=1, label="data vs held-out data")
        ax.set_ylabel("FID (shapes feature net), 95% CI")
        ax.grid(alpha=0.3)
    ax1.set_xlabel("guidance scale (o SAG thr 1, ■ blur, ▲ SAG variants)")
    ax2.set_xlabel("model forwards per sample")
    ax1.legend(fontsize=8)
    fig.suptitle(f"built-in model, DDIM {report['steps']} steps, N={report['n']} per setting")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_samples(report: dict, path: str, per_row: int = 16, rows: int = 2) -> None:
    """The first samples of each setting (same noise in every block), 2x upscaled: what the numbers measure."""
    import numpy as np
    from PIL import Image, ImageDraw

    blocks = [("none", report["sample_grid"])] + list(report.get("guided_grids", {}).items())
    n = per_row * rows
    tiles = []
    for name, imgs in blocks:
        x = ((imgs[:n].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        h, w = x.shape[1:3]
        block = x.reshape(rows, per_row, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, per_row * w, 3)
        label = np.zeros((12, block.shape[1], 3), np.uint8)
        tiles += [label, block]
        img = Image.fromarray(label)
        ImageDraw.Draw(img).text((2, 0), name, fill=(255, 255, 255))
        tiles[-2] = np.asarray(img)
    grid = Image.fromarray(np.concatenate(tiles))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--n", type=int, default=2000, help="samples per setting (default 2000)")
    q.add_argument("--steps", type=int, default=20, help="DDIM steps")
    q.add_argument("--batch", type=int, default=250)
    q.add_argument("--settings", default=None, help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    q.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--quick", action="store_true", help="a small run for tests: 128 samples, 4 steps, 2 settings")
    q.add_argument("--output", default=None, help="markdown report (default bench/results/<date>-quality.md; "
                                                   "--quick: <output-dir>/quality.md)")
    q.add_argument("--output-dir", default="outputs")


def main(a) -> int:
    for name in ("n", "steps", "batch", "bootstrap"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.n < 2:
        raise SystemExit(f"--n must be >= 2 (FID needs a covariance), got {a.n}")
    if a.threads is not None:
        if a.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    settings = None if a.settings is None else [s.strip() for s in a.settings.split(",") if s.strip()]
    n, steps, boot = a.n, a.steps, a.bootstrap
    if a.quick:
        n, steps, boot = 128, 4, 20
        settings = settings or list(QUICK_SETTINGS)
    if settings is not None:
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown:
            raise SystemExit(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    date = datetime.date.today().isoformat()
    out = a.output or (os.path.join(a.output_dir, "quality.md") if a.quick
                       else os.path.join("bench", "results", f"{date}-quality.md"))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    png = os.path.splitext(out)[0] + ".png"

    def write(report):
        plot(report, png)
        samples = None if a.quick else os.path.splitext(out)[0] + "-samples.png"
        write_markdown(report, out, png, samples)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({k: v for k, v in report.items() if k not in ("sample_grid", "guided_grids")}, f, indent=1)
        if samples:
            save_samples(report, samples)

    run(n=n, steps=steps, batch=a.batch, settings=settings, n_boot=boot, seed=a.seed,
        n_real=max(n, 512) if a.quick else None, on_result=write)
    print(f"wrote {out}, {png}")
    return 0
