"""SAGConfig: the settings of Self-Attention Guidance, and `make_config`, the one place they are built from
keyword settings. The guided step itself is sag_fast.engine."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .ops._dispatch import check_finite, check_kernel_size, check_nonnegative, check_positive
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
        self.scale = check_finite(self.scale, "SAGConfig.scale")
        self.blur_sigma = check_positive(self.blur_sigma, "SAGConfig.blur_sigma")
        check_kernel_size(self.kernel_size, "SAGConfig.kernel_size")
        self.threshold = check_nonnegative(self.threshold, "SAGConfig.threshold")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"SAGConfig.layer must be None or a non-empty module path / regex, got {self.layer!r}")
        if self.mask not in MASK_MODES:
            raise ValueError(f"SAGConfig.mask must be one of {MASK_MODES}, got {self.mask!r}")
        self.start, self.stop = check_finite(self.start, "SAGConfig.start"), check_finite(self.stop, "SAGConfig.stop")
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
