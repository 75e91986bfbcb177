"""SAGConfig and the model-agnostic guided step: two forwards, one degrade, one in-place combine.

`sag_guided_forward` knows nothing about the model: it is handed a `forward(x, t, **kwargs)`, an
`AttentionCapture` (sag_fast.capture) and the signal coefficients (c1, c2) of the step
(sag_fast.schedule). Everything stays on the device: no `.item()`, no `bool(tensor)`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


from .ops.degrade import degrade  # noqa: F401  (sag_fast.guidance.degrade: the fused op, as before)
from .ops.guidance import guidance_shift_  # noqa: F401  (the fused in-place shift, as before)

MASK_MODES = ("attention", "global")


@dataclass
class SAGConfig:
    """Settings of Self-Attention Guidance.

    scale: the SAG scale s (0 turns SAG off: one forward per step). blur_sigma, kernel_size: the Gaussian
    blur. threshold: the attention-mass threshold (1.0 = the mean). layer: module path or regex of the
    self-attention layer (None = the model's default). mask: "attention" (SAG) or "global" (blur guidance,
    paper Sec. 5.1). start/stop: SAG runs on steps whose progress (step index / number of steps) is in
    [start, stop).
    """

    scale: float = 0.75
    blur_sigma: float = 1.0
    kernel_size: int = 9
    threshold: float = 1.0
    layer: str | None = None
    mask: str = "attention"
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        def real(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SAGConfig.{name} must be a finite number, got {value!r}")
            return float(value)

        self.scale = real("scale")
        self.blur_sigma = real("blur_sigma")
        if self.blur_sigma <= 0:
            raise ValueError(f"SAGConfig.blur_sigma must be > 0, got {self.blur_sigma!r}")
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"SAGConfig.kernel_size must be a positive odd int, got {k!r}")
        self.threshold = real("threshold")
        if self.threshold < 0:
            raise ValueError(f"SAGConfig.threshold must be >= 0 (1.0 = the mean attention mass), got {self.threshold!r}")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"SAGConfig.layer must be None or a non-empty module path / regex, got {self.layer!r}")
        if self.mask not in MASK_MODES:
            raise ValueError(f"SAGConfig.mask must be one of {MASK_MODES}, got {self.mask!r}")
        self.start, self.stop = real("start"), real("stop")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"SAGConfig.start must be in [0, 1], got {self.start!r}")
        if not 0.0 <= self.stop <= 1.0:
            raise ValueError(f"SAGConfig.stop must be in [0, 1], got {self.stop!r}")
        if self.start > self.stop:
            raise ValueError(f"SAGConfig.start={self.start} must be <= SAGConfig.stop={self.stop}")

    def active_at(self, progress: float) -> bool:
        """Whether a step at `progress` (0 = first step, fraction of the trajectory) is guided."""
        return self.scale != 0.0 and self.start <= progress < self.stop


def make_config(scale: float | None = None, config: SAGConfig | None = None, fields: dict | None = None,
                where: str = "enable_sag") -> SAGConfig:
    """SAGConfig from an optional base config, a scale (None: the base's, else 0.75) and field overrides;
    `where` names the caller in the errors. Any finite scale is allowed: 0 is unguided (bit for bit), a
    negative scale guides away from the blur (a research setting, kept as in the paper's formula)."""
    if config is not None and not isinstance(config, SAGConfig):
        raise TypeError(f"{where}: config must be a sag_fast.SAGConfig, got {type(config).__name__}")
    fields = dict(fields or {})
    names = {f.name for f in dataclasses.fields(SAGConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise TypeError(f"{where} got unknown setting(s) {unknown}; the SAGConfig fields are {sorted(names)}")
    if "scale" in fields and scale is not None:
        raise TypeError(f"{where}: scale given twice")
    if scale is not None:
        fields["scale"] = scale
    return dataclasses.replace(config if config is not None else SAGConfig(), **fields)


def slice_batch(kwargs: dict, rows: slice, batch: int, keep=("cross_attention_kwargs",)) -> dict:
    """Every tensor in kwargs (recursing into dicts, lists and tuples) whose first dim == batch is sliced
    to `rows`; the rest (0-dim timesteps, scalars, None, keys in `keep`) passes unchanged."""

    def cut(value):
        if isinstance(value, torch.Tensor):
            return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            cut_items = [cut(v) for v in value]
            return type(value)(*cut_items) if hasattr(value, "_fields") else type(value)(cut_items)
        return value

    return {k: (v if k in keep else cut(v)) for k, v in kwargs.items()}


def _rows_of(c, rows: slice, total: int):
    """c1/c2 given for the whole (ways*B,) batch are cut to the degraded rows; scalars pass."""
    if isinstance(c, torch.Tensor) and c.dim() == 1 and c.shape[0] == total:
        return c[rows]
    return c


def sag_guided_forward(forward: Callable[..., torch.Tensor], x: torch.Tensor, t, model_kwargs: dict | None = None, *,
                       config: SAGConfig, capture: Any = None, c1, c2, ways: int = 1, uncond_index: int = 0,
                       guided_channels: int | None = -1, latent_channels: int | None = None,
                       degraded_kwargs: Callable[..., dict] | None = None,
                       on_shift: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One guided model evaluation (docs/design.md). forward(x, t, **kwargs) -> (ways*B, C', H, W).

    x: (ways*B, C, H, W) the model input; way `uncond_index` is degraded and guides every way. Returns the
    first forward's output with +scale*(u - d) added in place; the caller's CFG afterwards gives CFG+SAG.
    latent_channels: the leading input channels that are x_t (None: all); the others (an inpainting mask,
    image latents concatenated on channels) reach the extra forward unchanged. guided_channels: output
    channels shifted: -1 (all), a count, or None: all when the model outputs C channels, the first C when
    it outputs 2C (a learned variance). degraded_kwargs(model_kwargs, rows, total, x_degraded, t_rows):
    the model arguments of the extra forward (default: `slice_batch`, every tensor with the batch as first
    dim cut to the rows; integrations pass their batch contract instead).
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    if not isinstance(config, SAGConfig):
        raise TypeError(f"config must be a SAGConfig, got {type(config).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (ways*B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(ways, int) or ways < 1 or x.shape[0] % ways:
        raise ValueError(f"ways={ways!r} must be a positive int dividing the batch x.shape[0]={x.shape[0]}")
    if not isinstance(uncond_index, int) or not 0 <= uncond_index < ways:
        raise ValueError(f"uncond_index={uncond_index!r} must be in [0, ways={ways})")
    channels = x.shape[1] if latent_channels is None else latent_channels
    if isinstance(channels, bool) or not isinstance(channels, int) or not 0 < channels <= x.shape[1]:
        raise ValueError(f"latent_channels={latent_channels!r} must be in [1, {x.shape[1]}] (the input's channels)")
    if config.mask == "attention" and capture is None:
        raise ValueError("capture is required when config.mask == 'attention' (or use mask='global')")
    if config.scale == 0.0:  # SAG off: exactly the plain forward, bit for bit
        return forward(x, t, **model_kwargs)

    total = x.shape[0]
    b = total // ways
    rows = slice(uncond_index * b, (uncond_index + 1) * b)
    if config.mask == "attention":
        with capture.capturing(rows, input_hw=(int(x.shape[-2]), int(x.shape[-1]))):
            out = forward(x, t, **model_kwargs)
        mask = capture.mask
    else:
        out = forward(x, t, **model_kwargs)
        mask = None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != total or out.shape[1] < channels \
            or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"the model output {tuple(getattr(out, 'shape', ()))} must be (ways*B={total}, C' >= "
                         f"{channels}, {x.shape[2]}, {x.shape[3]}) for x {tuple(x.shape)}")
    if guided_channels is None:
        if out.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"guided_channels=None: the model outputs {out.shape[1]} channels for {channels} latent "
                             "channels (expected C or 2C); pass guided_channels explicitly")
        guided_channels = -1 if out.shape[1] == channels else channels
    x_rows = x[rows]
    x_deg = degrade(x_rows[:, :channels], out[rows, :channels], mask, _rows_of(c1, rows, total),
                    _rows_of(c2, rows, total), config.kernel_size, config.blur_sigma)
    if channels < x.shape[1]:  # conditioning channels ride along unchanged
        x_deg = torch.cat([x_deg, x_rows[:, channels:]], dim=1)
    t_rows = t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == total else t
    if degraded_kwargs is None:
        kwargs_rows = slice_batch(model_kwargs, rows, total)
    else:
        kwargs_rows = degraded_kwargs(model_kwargs, rows, total, x_deg, t_rows)
    degraded = forward(x_deg, t_rows, **kwargs_rows)
    if on_shift is not None:
        g = out.shape[1] if guided_channels == -1 else guided_channels
        on_shift(config.scale * (out[rows, :g].float() - degraded[:, :g].float()))
    return guidance_shift_(out, degraded, config.scale, guided_channels, uncond_index)
