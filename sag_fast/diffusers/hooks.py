"""enable_sag / disable_sag / sag_config: Self-Attention Guidance on an existing diffusers pipeline, in place.

The work is done by `session.SAGSession` (see there): the batch contract, the attention capture and the guided
step on the denoiser. The pipeline's own CFG, guidance_rescale and scheduler step run afterwards unchanged,
so SAG composes with them (CFG+SAG, or SAG alone).
"""
from __future__ import annotations

from ..guidance import SAGConfig, make_config
from .session import STATE_ATTR, SAGCopyMixin, install, uninstall


def enable_sag(pipe, scale: float | None = None, *, config: SAGConfig | None = None, layout=None, **fields):
    """Turn `pipe` into a SAG pipeline in place and return it.

    pipe: a diffusers pipeline with a `unet` or `transformer` (plain or `torch.compile`d; see the README's table
    of supported pipelines). scale: the SAG scale (default 0.75, or config's; 0: unguided, bit for bit; any
    finite number). Other settings are SAGConfig fields (blur_sigma, kernel_size, threshold, layer, mask, start,
    stop), or pass config=SAGConfig(...). layout: a `sag_fast.SAGLayout` declaring the batch layout of a
    pipeline sag_fast does not know (which rows are unconditional, which inputs are per-row).

    Calling enable_sag again replaces the settings. Everything that can be refused is refused here, with the
    cause and the way out: no denoiser, an unsupported scheduler or pipeline, a layer that is not self-attention
    or whose attention SAG cannot read, video or packed latents, a denoiser shared with another SAG pipeline.
    """
    if isinstance(pipe, SAGCopyMixin) and not hasattr(type(pipe), "_sag_base_class"):
        raise TypeError(f"pipe is already a {type(pipe).__name__} (SAG on every call); set its sag_scale per call "
                        "instead of enable_sag, or use the base diffusers pipeline")
    install(pipe, make_config(scale, config, fields), layout)
    return pipe


def disable_sag(pipe):
    """Undo enable_sag: the denoiser and the pipeline's class are exactly as before. A pipeline without SAG
    enabled is returned unchanged (a no-op, not an error). Returns pipe."""
    uninstall(pipe)
    return pipe


def sag_config(pipe) -> SAGConfig | None:
    """The SAGConfig enabled on `pipe`, or None."""
    session = vars(pipe).get(STATE_ATTR)
    return None if session is None else session.config


def last_mask(pipe):
    """The attention mask SAG used at its last guided model call on `pipe`: a bool (B, h, w) tensor over the
    layer's token grid (True: degraded), for the unconditional rows; None before any, or with mask="global"."""
    session = vars(pipe).get(STATE_ATTR)
    capture = None if session is None else session.capture
    return None if capture is None else capture.mask
