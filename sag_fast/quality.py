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

# name -> SAGConfig fields, plus two keys of the benchmark's own: "pag" (the PAG-style baseline's scale, see
# PAGStyleModel) and "cfg" (a row of the class-conditional model, sampled with classifier-free guidance at this
# scale; 1.0 is the conditional model unguided). scale 0 is the unguided baseline; mask="global" is the paper's
# blur guidance (Sec. 5.1).
SETTINGS = {  # in order of priority: a run cut short (each setting is written as it finishes) has the main ones
    "none": dict(scale=0.0),
    "SAG s=0.75": dict(scale=0.75),
    "blur s=0.75": dict(scale=0.75, mask="global"),
    "SAG s=1.5": dict(scale=1.5),
    "blur s=1.5": dict(scale=1.5, mask="global"),
    "PAG-style s=1.5": dict(scale=0.0, pag=1.5),
    "SAG s=3.0": dict(scale=3.0),
    "blur s=3.0": dict(scale=3.0, mask="global"),
    "PAG-style s=3.0": dict(scale=0.0, pag=3.0),
    "SAG s=0.3": dict(scale=0.3),
    "SAG s=0.75 steps 50-100%": dict(scale=0.75, start=0.5),
    "SAG s=0.75 thr=1.5": dict(scale=0.75, threshold=1.5),
    "cond": dict(scale=0.0, cfg=1.0),
    "cond CFG 1.5": dict(scale=0.0, cfg=1.5),
    "cond CFG 3": dict(scale=0.0, cfg=3.0),
    "cond CFG 1.5 + SAG 0.75": dict(scale=0.75, cfg=1.5),
    "cond CFG 1.5 + blur 0.75": dict(scale=0.75, mask="global", cfg=1.5),
}
# sampled at --n; every other row at --n-rest (its ΔFID is paired against the first --n-rest baseline samples)
MAIN_SETTINGS = ("none", "SAG s=0.75", "blur s=0.75", "SAG s=1.5", "blur s=1.5", "PAG-style s=1.5", "SAG s=3.0",
                 "blur s=3.0")
QUICK_SETTINGS = ("none", "SAG s=0.75")
EXTRA_KEYS = ("pag", "cfg")


def baseline_of(name: str) -> str:
    """The row a setting's ΔFID is paired against: `cond` for the class-conditional rows, else `none`."""
    return "cond" if "cfg" in SETTINGS[name] else "none"


class IdentityAttnProcessor:
    """A diffusers attention processor whose attention matrix is the identity: every token attends only to itself,
    so the attention output is the value (then the output projection, residual and rescale as in diffusers'
    AttnProcessor). The perturbation of the PAG-style baseline; a benchmark tool, not a sag_fast feature."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("IdentityAttnProcessor replaces self-attention only; this layer was given "
                             "encoder_hidden_states (cross-attention)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))  # identity attention: softmax(QK^T) = I
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PAGStyleModel(torch.nn.Module):
    """The PAG-style baseline (perturbed-attention guidance, Ahn et al. 2024) as a model: its output is
    eps + scale * (eps - eps_perturbed), where eps_perturbed comes from the same UNet with SAG's layer (`layer`,
    None: the model's default) running IdentityAttnProcessor. Two UNet forwards per call."""

    def __init__(self, unet: torch.nn.Module, scale: float, layer: str | None = None):
        super().__init__()
        from .capture import resolve_layer

        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"PAGStyleModel: scale must be a number, got {scale!r}")
        self.unet, self.scale = unet, float(scale)
        self.layer, self.attn = resolve_layer(unet, layer)
        if not callable(getattr(self.attn, "set_processor", None)):
            raise ValueError(f"PAGStyleModel: layer {self.layer!r} is a {type(self.attn).__name__}, not a diffusers "
                             "Attention (its processor cannot be replaced)")

    def forward(self, x, t, **kwargs):
        eps = self.unet(x, t, **kwargs).sample
        old = self.attn.processor
        self.attn.set_processor(IdentityAttnProcessor())
        try:
            perturbed = self.unet(x, t, **kwargs).sample
        finally:
            self.attn.set_processor(old)
        return eps + self.scale * (eps - perturbed)


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


def load_builtin_cond():
    """(unet float32 eval, DDIM scheduler, null class index) of the class-conditional built-in model, offline."""
    from .models import builtin_cond

    unet, scheduler, labels = builtin_cond()
    return unet, scheduler, int(labels["null_class"])


def training_info(model_dir: str) -> dict | None:
    """The training.json scripts/train_builtin.py writes beside an exported model (step reached, loss), if any."""
    path = os.path.join(model_dir, "training.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def draw(unet, scheduler, config_fields: dict, n: int, steps: int, batch: int, seed: int,
         labels: torch.Tensor | None = None, null_class: int | None = None) -> tuple[torch.Tensor, float]:
    """n samples in [-1, 1] with SAGSampler + DDIM under `config_fields` (SAGConfig fields, plus "pag" and "cfg",
    see SETTINGS); batch i's noise depends on (seed, i) only, so every setting starts from the same noise, and the
    first m samples of a run of n >= m are those of a run of m when m is a multiple of `batch`. A "cfg" setting
    needs the class labels (n,) and the null class. Returns (images, UNet forwards per sample)."""
    from .guidance import SAGConfig
    from .sampler import SAGSampler

    fields = dict(config_fields)
    pag, cfg = fields.pop("pag", None), fields.pop("cfg", None)
    if cfg is not None and (labels is None or null_class is None or len(labels) < n):
        raise ValueError(f"draw: a cfg setting needs {n} class labels and the null class")
    model = unet if pag is None else PAGStyleModel(unet, pag, fields.get("layer"))
    counter = _ForwardCounter(unet)
    guidance = 1.0 if cfg is None else float(cfg)
    sampler = SAGSampler(model, scheduler, SAGConfig(**fields), guidance_scale=guidance, progress=False)
    out = []
    try:
        for k, i in enumerate(range(0, n, batch)):
            g = torch.Generator().manual_seed(seed * 100_003 + k)
            x_T = torch.randn(min(batch, n - i), unet.config.in_channels, unet.config.sample_size,
                              unet.config.sample_size, generator=g)
            cond = uncond = None
            if cfg is not None:
                y = labels[i:i + len(x_T)]
                cond = {"class_labels": y}
                if guidance != 1.0:
                    uncond = {"class_labels": torch.full_like(y, null_class)}
            out.append(sampler(x_T, cond=cond, uncond=uncond, num_inference_steps=steps, generator=g).clamp(-1, 1))
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
    n: int = 0
    baseline: str | None = None
    base_fid: float | None = None  # the baseline's FID on the same first n samples (the ΔFID's other term)
    edges: float = 0.0
    change: float = 0.0
    extra: dict = field(default_factory=dict)


def run(n: int = 2000, steps: int = 20, batch: int = 250, settings=None, n_boot: int = 200, seed: int = 0,
        model_dir: str | None = None, n_real: int | None = None, log=print, on_result=None,
        n_rest: int | None = None) -> dict:
    """Samples and scores every setting; returns a JSON-able report (see `write_markdown`). The MAIN_SETTINGS
    get n samples, the others n_rest (default n). on_result(report) is called after each setting with the
    report so far."""
    from .models import BUILTIN_COND_DIR, BUILTIN_DIR, shapes
    from .models.features import feature_metrics, load_feature_net

    settings = list(SETTINGS) if settings is None else list(settings)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    n_rest = n if n_rest is None else n_rest
    if not 2 <= n_rest <= n:
        raise ValueError(f"--n-rest must be in [2, --n={n}], got {n_rest}")
    if n_rest < n and n_rest % batch:
        raise ValueError(f"--n-rest={n_rest} must be a multiple of --batch={batch} (so its samples are the first "
                         "of the baseline's, from the same noise)")
    for base in ("cond", "none"):  # the baselines every difference is taken against, before their rows
        rows = [s for s in settings if baseline_of(s) == base]
        if rows and base not in settings:
            settings.insert(settings.index(rows[0]), base)
    n_of = {name: n if name in MAIN_SETTINGS or name == "none" else n_rest for name in settings}
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
    cond_model = None
    models = {"builtin": {"dir": os.path.relpath(model_dir or BUILTIN_DIR),
                          "training": training_info(model_dir or BUILTIN_DIR)}}
    if any("cfg" in SETTINGS[s] for s in settings):
        cond_model = load_builtin_cond()
        models["builtin_cond"] = {"dir": os.path.relpath(BUILTIN_COND_DIR), "training": training_info(BUILTIN_COND_DIR),
                                  "null_class": cond_model[2]}
    labels = shapes.holdout_labels(max(n_of.values()))  # the conditional rows' classes: the data's mix
    results, bases = [], {}
    report = {
        "date": datetime.date.today().isoformat(), "n": n, "n_rest": n_rest, "n_real": n_real, "steps": steps,
        "sampler": "DDIM (eta 0)", "bootstrap": n_boot, "seed": seed, "references": refs, "models": models,
        "data": {"edges": edge_energy(real)},
        "feature_net": feature_metrics(), "torch_threads": torch.get_num_threads(), "results": [],
    }
    for name in settings:
        fields, m = SETTINGS[name], n_of[name]
        base = baseline_of(name)
        t0 = time.perf_counter()
        if "cfg" in fields:
            images, forwards = draw(cond_model[0], cond_model[1], fields, m, steps, batch, seed, labels, cond_model[2])
        else:
            images, forwards = draw(unet, scheduler, fields, m, steps, batch, seed)
        seconds = time.perf_counter() - t0
        feats = features(images)
        if name == base:
            bases[name] = (images, feats)
        base_img, base_f = bases[base]
        base_img, base_f = base_img[:m], base_f[:m]
        if name == "none":
            report["sample_grid"] = images[:64]  # for the note's picture; dropped from the JSON
        else:
            report.setdefault("guided_grids", {})[name] = images[:64]
        paired = name != base
        boot = bootstrap_fid(real_f, feats, base_f if paired else None, n_boot, seed)
        r = Result(name, fields, forwards, seconds, fid(real_f, feats), boot["fid_ci"], kid(real_f, feats),
                   boot.get("delta_ci"), m, base, fid(real_f, base_f) if paired else None, edge_energy(images),
                   float((images - base_img).abs().mean() * 127.5))
        if "cfg" in fields:  # does the sample show the class it was asked for? (the feature net's shape head)
            with torch.no_grad():
                pred = torch.cat([net.predict(images[i:i + 500])["shape"].argmax(1) for i in range(0, m, 500)])
            r.extra["class_accuracy"] = float((pred == labels[:m]).float().mean())
        results.append(r)
        report["results"] = [x.__dict__ for x in results]
        log(f"{name}: FID {r.fid:.2f} [{r.fid_ci[0]:.2f}, {r.fid_ci[1]:.2f}] N={m} forwards/sample {forwards:.1f} "
            f"({seconds:.0f} s)")
        if on_result is not None:
            on_result(report)
    return report


def _model_note(report: dict) -> str:
    parts = []
    for key, m in report.get("models", {}).items():
        t = m.get("training") or {}
        step = f"EMA weights at training step {t['step']}" if "step" in t else "training step not recorded"
        parts.append(f"`{key}` ({m['dir']}, {step})")
    return "; ".join(parts)


def _accuracy(row: dict) -> str:
    acc = row.get("extra", {}).get("class_accuracy")
    return "—" if acc is None else f"{100 * acc:.0f}%"


def write_markdown(report: dict, path: str, plot: str | None = None, samples: str | None = None,
                   title: str | None = None, notes: str | None = None) -> None:
    rows = report["results"]
    ns = sorted({r.get("n", report["n"]) for r in rows})
    lines = [
        f"# {title or 'Quality of the built-in models with and without SAG'} ({report['date']})", "",
        f"N = {' / '.join(map(str, ns[::-1]))} samples per setting (column N), {report['sampler']} {report['steps']} "
        f"steps, every setting from the same seeded noise (a row of N samples uses the first N noises); scored "
        f"against {report['n_real']} held-out images in the feature space of the shapes feature network (held-out "
        f"accuracy: shape {report['feature_net']['shape']:.3f}, colour {report['feature_net']['colour']:.3f}, object "
        f"count {report['feature_net']['count']:.3f}). Models: {_model_note(report)}. FID and KID by torchmetrics; "
        f"[95% bootstrap interval, {report['bootstrap']} resamples]. ΔFID is paired against the row's baseline "
        "(`none` for the unconditional model, `cond` -- the class-conditional model without guidance -- for the "
        "CFG rows): same noise, same first N samples, same resampled rows; an interval below 0 means better than the "
        "baseline. FID grows as N shrinks, so compare FIDs only at equal N; ΔFID is paired at the row's N.", "",
        "| setting | N | forwards / sample | ms / sample | FID | ΔFID vs baseline | KID (± sd over subsets) | "
        "edge energy | mean \\|Δpixel\\| vs baseline | class accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r.get("n", report["n"])
        delta = "—" if r["delta_ci"] is None else (
            f"{r['fid'] - r['base_fid']:+.2f} [{r['delta_ci'][0]:+.2f}, {r['delta_ci'][1]:+.2f}] "
            f"vs {r['baseline']}")
        lines.append(
            f"| {r['name']} | {n} | {r['forwards']:.1f} | {1e3 * r['seconds'] / n:.0f} | "
            f"{r['fid']:.2f} [{r['fid_ci'][0]:.2f}, {r['fid_ci'][1]:.2f}] | {delta} | "
            f"{r['kid'][0]:.3f} ± {r['kid'][1]:.3f} | {r['edges']:.2f} | {r['change']:.2f} | "
            f"{_accuracy(r)} |")
    refs = report["references"]
    lines += [
        "", f"References: FID of a second held-out draw of the data {refs['data vs held-out data']:.2f} (the floor at "
        f"N={report['n_real']}), of clamped Gaussian noise {refs['noise vs held-out data']:.1f}. Edge energy (mean "
        f"|finite difference| between neighbouring pixels, 0-255 units) of the held-out data: "
        f"{report['data']['edges']:.2f}. Features are standardised per dimension by the held-out data's mean and "
        "standard deviation. Class accuracy (conditional rows): how often the feature network's shape head "
        "recognises the class the sample was drawn for. Cost: UNet forwards per sample counted by a hook on the UNet (a CFG step is 2, SAG adds "
        "the degraded rows, the PAG-style baseline runs the UNet twice per step); ms / sample is the wall time of the "
        f"sampling loop with {report['torch_threads']} torch thread(s) on a shared CPU (other jobs ran alongside: "
        "compare forwards, not ms). KID's ± is the spread over subsets of min(1000, N) samples: 0 when N <= 1000 "
        "(every subset is the whole set).", "",
        "Rows: `SAG`: SAGConfig(scale=s); `blur`: mask=\"global\" (the paper's blur guidance, Sec. 5.1); "
        "`PAG-style`: eps + s (eps - eps'), eps' from the same UNet with SAG's layer's self-attention replaced by the "
        "identity (attention output = value), a benchmark baseline only; `steps 50-100%`: SAG on the second half of "
        "the steps (the window variant); `cond ...`: the class-conditional model (classes: the largest shape, drawn "
        "with the held-out data's mix; CFG's unconditional way is the null class; SAG and blur act on that way).",
        "", "Settings: " + "; ".join(f"`{r['name']}`: {r['fields']}" for r in rows) + ".",
    ]
    if notes:
        lines += ["", notes]
    if plot:
        lines += ["", f"![FID against scale and cost]({os.path.basename(plot)})"]
    if samples:
        lines += ["", f"The first 32 samples of each setting, from the same noise: ![samples]({os.path.basename(samples)})"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _family(r: dict) -> str:
    f = r["fields"]
    if "cfg" in f:
        return "cond"
    if "pag" in f:
        return "PAG-style"
    if f["scale"] == 0:
        return "none"
    if f.get("mask") == "global":
        return "blur" if f.get("start", 0.0) == 0.0 and f.get("stop", 1.0) == 1.0 else "variant"
    plain = f.get("threshold", 1.0) == 1.0 and f.get("start", 0.0) == 0.0 and f.get("stop", 1.0) == 1.0
    return "SAG" if plain else "variant"


def _scale(r: dict) -> float:
    return r["fields"].get("pag", r["fields"]["scale"])


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = {"SAG": ("o", "C0"), "blur": ("s", "C1"), "PAG-style": ("D", "C3"), "variant": ("^", "C2"),
              "none": ("*", "k"), "cond": ("v", "C4")}

    def err(lo_hi, centre):  # a bootstrap percentile interval need not contain the point estimate (FID's bias)
        return [[max(0.0, centre - lo_hi[0])], [max(0.0, lo_hi[1] - centre)]]

    main_n = report["n"]
    # FID is biased upwards at small N: panel 1 compares FIDs at the main N only; the paired ΔFID (panels 2, 3)
    # is comparable across N
    uncond = [r for r in rows if _family(r) != "cond"]
    none = next((r for r in rows if r["name"] == "none"), None)
    for fam in ("SAG", "blur", "PAG-style"):
        line = sorted([r for r in uncond if _family(r) == fam], key=_scale)
        if none is not None:
            line = [none] + line  # scale 0 is the unguided baseline for every family
        if len(line) > 1:
            xs = [_scale(r) for r in line]
            same_n = [r for r in line if r.get("n", main_n) == main_n]
            if len(same_n) > 1:
                ax1.plot([_scale(r) for r in same_n], [r["fid"] for r in same_n], "-", color=styles[fam][1],
                         label=fam, alpha=0.7)
            deltas = [0.0 if r is none else r["fid"] - r["base_fid"] for r in line]
            ax3.plot(xs, deltas, "-", color=styles[fam][1], label=fam, alpha=0.7)
    for r in rows:
        fam, n = _family(r), r.get("n", main_n)
        mk, col = styles[fam]
        label = f"{r['name']} (N={n})" if n != main_n else r["name"]
        d = 0.0 if r["delta_ci"] is None else r["fid"] - r["base_fid"]
        if fam != "cond" and n == main_n:
            ax1.errorbar([_scale(r)], [r["fid"]], yerr=err(r["fid_ci"], r["fid"]), fmt=mk, color=col, capsize=3)
            ax1.annotate(label, (_scale(r), r["fid"]), fontsize=6, xytext=(4, 4), textcoords="offset points")
        if fam != "cond" and r["delta_ci"] is not None:
            ax3.errorbar([_scale(r)], [d], yerr=err(r["delta_ci"], d), fmt=mk, color=col, capsize=3)
        if r["delta_ci"] is not None:
            ax2.errorbar([r["forwards"]], [d], yerr=err(r["delta_ci"], d), fmt=mk, color=col, capsize=3)
        else:
            ax2.plot([r["forwards"]], [d], mk, color=col)
        ax2.annotate(label, (r["forwards"], d), fontsize=6, xytext=(4, 4), textcoords="offset points")
    floor = report["references"]["data vs held-out data"]
    ax1.axhline(floor, color="gray", ls=":", lw=1, label="data vs held-out data")
    ax1.set_ylabel(f"FID at N={main_n} (shapes feature net), 95% CI")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    for ax in (ax2, ax3):
        ax.axhline(0, color="k", lw=0.8)
    ax1.set_xlabel("guidance scale (unconditional model; ▲ SAG variants)")
    ax2.set_xlabel("UNet forwards per sample (▼ class-conditional rows, vs cond)")
    ax2.set_ylabel("ΔFID vs the row's baseline (paired, 95% CI)")
    ax3.set_xlabel("guidance scale")
    ax3.set_ylabel("ΔFID vs none (paired, 95% CI; < 0 is better)")
    for ax in (ax1, ax3):
        if ax.get_legend_handles_labels()[0]:  # a run without these families has no line to name
            ax.legend(fontsize=8)
    fig.suptitle(f"built-in models, DDIM {report['steps']} steps, N={report['n']} per main setting")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_samples(report: dict, path: str, per_row: int = 16, rows: int = 2) -> None:
    """The first samples of each setting (same noise in every block), 2x upscaled: what the numbers measure."""
    import numpy as np
    from PIL import Image, ImageDraw

    blocks = ([("none", report["sample_grid"])] if "sample_grid" in report else []) + list(
        report.get("guided_grids", {}).items())  # a run without the unconditional rows has no "none" block
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


def merge_reports(reports: list) -> dict:
    """One report from runs of the same benchmark split across processes (e.g. the unconditional and the
    conditional rows run side by side): they must share the real set, steps and seed (so their FIDs compare);
    a setting in several keeps its first run's row (same noise and model: the same numbers)."""
    if not reports:
        raise ValueError("merge: no reports")
    first = reports[0]
    for r in reports[1:]:
        for key in ("n_real", "steps", "seed", "sampler"):
            if r[key] != first[key]:
                raise ValueError(f"merge: the reports differ in {key} ({first[key]!r} vs {r[key]!r}); only runs of "
                                 "the same benchmark merge")
    out = {k: v for k, v in first.items() if k not in ("sample_grid", "guided_grids")}
    out["results"], seen = [], set()
    out["models"] = {}
    for r in reports:
        out["models"].update(r.get("models", {}))
        for row in r["results"]:
            if row["name"] not in seen:
                seen.add(row["name"])
                out["results"].append(row)
    out["n"] = max(r["n"] for r in reports)
    out["n_rest"] = min(r.get("n_rest", r["n"]) for r in reports)
    return out


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--n", type=int, default=2000, help="samples per main setting (default 2000)")
    q.add_argument("--n-rest", type=int, default=None, help="samples per other setting (default: --n; a multiple of "
                   f"--batch). Main settings: {', '.join(MAIN_SETTINGS)}")
    q.add_argument("--model-dir", default=None, help="the unconditional model's diffusers folder (default: the "
                   "built-in one in the package)")
    q.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge the JSON reports of runs of "
                   "the same benchmark (e.g. split across processes) into --output (markdown, JSON and plot); "
                   "samples nothing")
    q.add_argument("--title", default=None, help="the markdown report's title")
    q.add_argument("--notes", default=None, help="a paragraph appended to the markdown report")
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
    if a.merge:
        if not a.output:
            raise SystemExit("--merge needs --output (the merged markdown report)")
        reports = []
        for path in a.merge:
            try:
                with open(path) as f:
                    reports.append(json.load(f))
            except (OSError, ValueError) as exc:
                raise SystemExit(f"--merge: cannot read {path}: {exc}") from None
        try:
            merged = merge_reports(reports)
        except ValueError as exc:
            raise SystemExit(f"--merge: {exc}") from None
        png = os.path.splitext(a.output)[0] + ".png"
        plot(merged, png)
        write_markdown(merged, a.output, png, None, a.title, a.notes)
        with open(os.path.splitext(a.output)[0] + ".json", "w") as f:
            json.dump(merged, f, indent=1)
        print(f"wrote {a.output}, {png}")
        return 0
    if a.model_dir is not None and not os.path.isfile(os.path.join(a.model_dir, "unet", "config.json")):
        raise SystemExit(f"--model-dir {a.model_dir!r}: not a diffusers model folder (no unet/config.json in it)")
    if a.n_rest is not None and not 2 <= a.n_rest <= a.n:
        raise SystemExit(f"--n-rest must be in [2, --n={a.n}], got {a.n_rest}")
    if a.n_rest is not None and a.n_rest < a.n and a.n_rest % a.batch:
        raise SystemExit(f"--n-rest={a.n_rest} must be a multiple of --batch={a.batch}")
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
        write_markdown(report, out, png, samples, a.title, a.notes)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({k: v for k, v in report.items() if k not in ("sample_grid", "guided_grids")}, f, indent=1)
        if samples:
            save_samples(report, samples)

    n_rest = None if a.quick or a.n_rest is None else a.n_rest
    run(n=n, steps=steps, batch=a.batch, settings=settings, n_boot=boot, seed=a.seed,
        n_real=max(n, 512) if a.quick else None, on_result=write, n_rest=n_rest, model_dir=a.model_dir)
    print(f"wrote {out}, {png}")
    return 0
