"""The specification of SAG in plain PyTorch. Every fast path in sag_fast is tested against this file.

Readable first, fast never; it imports torch only and nothing of sag_fast (the ops must not import it:
it is what they are tested against). See docs/design.md for the math:
    s  = c1*x + c2*o                       (the signal part alpha*x0_hat of the model input)
    x~ = x + M * (G_sigma * s - s)         (blur the attended regions, keep the noise)
    eps = eps_u + w*(eps_c - eps_u) + s_sag*(eps_u - eps(x~_u))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


# ----------------------------------------------------------------------------------------- mask
def attention_mass(probs: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """mass[b, j] = mean over heads of sum over queries of probs[b, head, i, j]  -> (B, Nk) float.

    probs: (B, heads, Nq, Nk), or (B*heads, Nq, Nk) as diffusers stores it (then `heads` is required).
    """
    if probs.dim() == 3:
        if heads is None:
            raise ValueError("attention_mass: `heads` is required when probs is (B*heads, Nq, Nk)")
        if probs.shape[0] % heads:
            raise ValueError(f"attention_mass: probs.shape[0]={probs.shape[0]} is not a multiple of heads={heads}")
        probs = probs.reshape(probs.shape[0] // heads, heads, *probs.shape[1:])
    elif probs.dim() != 4:
        raise ValueError(f"attention_mass: probs must be (B, heads, Nq, Nk) or (B*heads, Nq, Nk), got {tuple(probs.shape)}")
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    return probs.to(acc).mean(1).sum(1)


def masked_softmax(scores: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores + key_bias[b, None, None, j] (a per-key attention mask, -inf drops
    a key, as scaled_dot_product_attention's float attn_mask); a row with every key dropped is all zeros."""
    if key_bias is None:
        return torch.softmax(scores, dim=-1)
    logits = scores + key_bias.to(scores.dtype)[:, None, None, :]
    kept = torch.isfinite(logits).any(-1, keepdim=True)
    return torch.where(kept, torch.softmax(torch.where(kept, logits, 0.0), dim=-1), 0.0)


def attention_mass_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                           key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same mass from q (B, heads, Nq, d) and k (B, heads, Nk, d), softmax(q k^T * scale) over keys
    (plus key_bias (B, Nk), see masked_softmax)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention_mass_from_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, heads, N, d)")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = masked_softmax(q.to(acc) @ k.to(acc).transpose(-1, -2) * scale, key_bias)
    return attention_mass(probs)


def check_grid(grid_hw, nk: int, name: str = "grid_hw") -> tuple[int, ...]:
    """The key grid, (h, w) for an image or (f, h, w) for a video (frames, rows, columns), with product Nk."""
    dims = tuple(int(v) for v in grid_hw)
    if len(dims) not in (2, 3) or min(dims) <= 0 or math.prod(dims) != nk:
        raise ValueError(f"{name}={tuple(grid_hw)} does not match the number of keys Nk={nk} "
                         "(need h*w == Nk, or f*h*w == Nk for a video grid)")
    return dims


def mass_to_mask(mass: torch.Tensor, grid_hw, threshold: float = 1.0) -> torch.Tensor:
    """(B, Nk) mass -> (B, h, w) bool mask of the keys attended more than `threshold` (1.0 = the mean);
    (B, f, h, w) for a video grid (f, h, w), keys in frame-major order (frame, row, column)."""
    grid = check_grid(grid_hw, mass.shape[-1])
    return (mass > threshold).reshape(mass.shape[0], *grid)


# ----------------------------------------------------------------------------- joint attention
def check_image_span(image_span, n: int) -> tuple[int, int]:
    """(start, length) of the image tokens among the N tokens of a joint-attention layer."""
    start, length = (int(v) for v in image_span)
    if length < 1 or start < 0 or start + length > n:
        raise ValueError(f"image_span={tuple(image_span)} is out of range for N={n} tokens "
                         "(need 0 <= start, length >= 1, start + length <= N)")
    return start, length


def joint_attention_mass(probs: torch.Tensor, image_span) -> torch.Tensor:
    """Joint attention (image and text tokens in one softmax, SD3/Flux): (B, length) mass of the image keys.

    probs: (B, heads, N, N), each row the softmax over *all* N keys the layer attends to (text included).
    image_span = (start, length): the image tokens are start .. start+length-1 (text before them, as in
    Flux, or after, as in SD3). mass[b, j] = mean over heads of the sum over the image queries i of
    probs[b, head, i, j], for the image keys j only: text queries are not image regions, and text keys
    take their share of each row's mass without being part of the mask. Tokens after the span (Flux Kontext's
    context image: [text, image, context]) are keys like the text's.

    Added-KV attention (DeepFloyd IF, Kandinsky 2.2): probs (B, heads, length, N), the queries are the image
    tokens alone (their keys are [text, image]): the sum runs over every query.
    """
    if probs.dim() != 4 or (probs.shape[-1] != probs.shape[-2] and probs.shape[-2] != image_span[1]):
        raise ValueError(f"joint_attention_mass: probs must be (B, heads, N, N), or (B, heads, length, N) with image "
                         f"queries only, got {tuple(probs.shape)} for image_span={tuple(image_span)}")
    start, length = check_image_span(image_span, probs.shape[-1])
    image = slice(start, start + length)
    queries = image if probs.shape[-2] == probs.shape[-1] else slice(None)
    return attention_mass(probs[:, :, queries, image])


def joint_attention_mass_from_qk(q: torch.Tensor, k: torch.Tensor, image_span,
                                 scale: float | None = None, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """joint_attention_mass of softmax(q k^T * scale) over all keys; q, k (B, heads, N, d), materialised
    (q (B, heads, length, d): image queries only, added-KV). key_bias (B, N): a per-key attention mask
    (masked_softmax), e.g. -inf on padded text tokens (QwenImage, Chroma)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"joint_attention_mass_from_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must both be "
                         "(B, heads, N, d)")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = masked_softmax(q.to(acc) @ k.to(acc).transpose(-1, -2) * scale, key_bias)
    return joint_attention_mass(probs, image_span)


def joint_mass_to_mask(mass: torch.Tensor, grid_hw, threshold: float = 1.0) -> torch.Tensor:
    """(B, length) image-key mass -> (B, h, w) bool: mass > threshold * (mean mass of the image keys).

    Relative, so that threshold 1.0 keeps meaning "above the average image token" whatever share of each
    row the text keys take (docs/design.md, "The mask for joint attention"). Without text keys the mean is
    1 (in exact arithmetic: every row sums to 1), and this is mass_to_mask's rule.
    """
    grid = check_grid(grid_hw, mass.shape[-1])
    return (mass > threshold * mass.mean(-1, keepdim=True)).reshape(mass.shape[0], *grid)


def upsample_mask(mask: torch.Tensor, out_hw) -> torch.Tensor:
    """Nearest upsampling of a (B, h, w) mask to (B, H, W), or of a video's (B, f, h, w) to (B, F, H, W), with
    F.interpolate's index rule on each axis (src = min(floor(dst * fp32(in/out)), in-1), in fp32 arithmetic;
    not the exact integer quotient)."""
    size = tuple(int(v) for v in out_hw)
    if mask.dim() != len(size) + 1 or len(size) not in (2, 3):
        raise ValueError(f"upsample_mask: mask {tuple(mask.shape)} must be (B, h, w) for out (H, W) or "
                         f"(B, f, h, w) for out (F, H, W), got out {size}")
    out = F.interpolate(mask[:, None].to(torch.float32), size=size, mode="nearest")
    return out[:, 0] != 0  # nonzero = blur, as the fused kernel reads it


def attention_mask(probs: torch.Tensor, grid_hw, out_hw, threshold: float = 1.0, heads: int | None = None) -> torch.Tensor:
    """The SAG mask at the latent resolution: (B, H, W) bool; (B, F, H, W) for a grid (f, h, w), out (F, H, W)."""
    return upsample_mask(mass_to_mask(attention_mass(probs, heads), grid_hw, threshold), out_hw)


# --------------------------------------------------------------------------------- coefficients
def signal_coefficients(alpha, sigma, prediction_type: str):
    """(c1, c2) with s = c1*x + c2*o = alpha*x0_hat, for x = alpha*x0 + sigma*eps (see docs/design.md)."""
    alpha = torch.as_tensor(alpha)
    sigma = torch.as_tensor(sigma, dtype=alpha.dtype if alpha.is_floating_point() else None)
    if prediction_type == "epsilon":
        return torch.ones_like(alpha), -sigma
    if prediction_type == "v_prediction":
        return alpha * alpha, -alpha * sigma
    if prediction_type == "sample":
        return torch.zeros_like(alpha), alpha.clone()
    if prediction_type == "flow":
        return alpha.clone(), -alpha * sigma
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


# ----------------------------------------------------------------------------------------- blur
def check_blur(kernel_size: int, sigma: float, height: int, width: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    pad = kernel_size // 2
    if pad >= height or pad >= width:
        raise ValueError(
            f"kernel_size={kernel_size} needs an image larger than {pad} in each dimension for reflect "
            f"padding, got height={height}, width={width}"
        )


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """exp(-x^2 / (2 sigma^2)) on x = -(k-1)/2 ... (k-1)/2, normalised to sum 1 (diffusers' gaussian_blur_2d)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding, per channel; a video (B, C, F, H, W)
    is blurred per frame (spatially; frames do not mix)."""
    if x.dim() == 5:
        b, c, f, h, w = x.shape
        return gaussian_blur(x.reshape(b, c * f, h, w), kernel_size, sigma).reshape(b, c, f, h, w)
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur: x must be (B, C, H, W) or (B, C, F, H, W), got {tuple(x.shape)}")
    check_blur(kernel_size, sigma, x.shape[-2], x.shape[-1])
    pad = kernel_size // 2
    k = gaussian_kernel1d(kernel_size, sigma, dtype=x.dtype, device=x.device)
    c = x.shape[1]
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


# -------------------------------------------------------------------------------------- degrade
def _per_sample(c, batch: int, name: str, like: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    if c.dim() == 0:
        c = c.expand(batch)
    if c.dim() != 1 or c.shape[0] != batch:
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(c.shape)}")
    return c.view(batch, *([1] * (like.dim() - 1)))


def degrade(x, model_output, mask, c1, c2, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """x~ = x + M * (G*s - s), s = c1*x + c2*model_output.

    x, model_output: (B, C, H, W), or a video (B, C, F, H, W), blurred per frame. mask: (B, h, w) at any
    resolution (nearest-upsampled to H, W), for a video (B, f, h, w) (nearest-upsampled to F, H, W on each
    axis), or None for blur guidance (M = 1). c1, c2: scalars or (B,). Computed in fp32 (fp64 for fp64 x).
    """
    if x.dim() not in (4, 5) or model_output.shape != x.shape:
        raise ValueError(f"degrade: x {tuple(x.shape)} and model_output {tuple(model_output.shape)} must be the same "
                         "(B, C, H, W) or (B, C, F, H, W)")
    b = x.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, of = x.to(acc), model_output.to(acc)
    s = _per_sample(c1, b, "c1", xf) * xf + _per_sample(c2, b, "c2", xf) * of
    delta = gaussian_blur(s, kernel_size, sigma) - s
    if mask is not None:
        if mask.dim() != x.dim() - 1 or mask.shape[0] != b:
            want = "(B, h, w)" if x.dim() == 4 else "(B, f, h, w)"
            raise ValueError(f"degrade: mask must be {want} with B={b} for x {tuple(x.shape)}, got {tuple(mask.shape)}")
        delta = delta * upsample_mask(mask, x.shape[2:])[:, None].to(acc)
    return (xf + delta).to(x.dtype)


# ------------------------------------------------------------------------------------- guidance
def _guided(c: int, guided_channels: int) -> int:
    g = c if guided_channels == -1 else guided_channels
    if not 1 <= g <= c:
        raise ValueError(f"guided_channels={guided_channels} must be -1 (all) or in 1..{c}")
    return g


def guidance_combine(pred: torch.Tensor, degraded: torch.Tensor, cfg_scale: float, sag_scale: float,
                     guided_channels: int = -1) -> torch.Tensor:
    """The guided prediction (B, C, ...).

    pred: (B, C, ...) one way (SAG alone): out = p + s*(p - d);
          (2B, C, ...) two ways, unconditional first: out = u + w*(c - u) + s*(u - d).
    degraded: (B, C', ...), the model output on the degraded input; C' >= guided_channels.
    Channels past guided_channels (a learned variance) are copied from the conditional way.
    """
    b = degraded.shape[0]
    if pred.shape[0] not in (b, 2 * b) or pred.shape[2:] != degraded.shape[2:]:
        raise ValueError(f"guidance_combine: pred {tuple(pred.shape)} must be (B or 2B, C, ...) for degraded {tuple(degraded.shape)}")
    g = _guided(pred.shape[1], guided_channels)
    if g > degraded.shape[1]:
        raise ValueError(f"guided_channels={g} exceeds the channels of degraded ({degraded.shape[1]})")
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p, d = pred.to(acc), degraded[:, :g].to(acc)
    if pred.shape[0] == b:
        out = p.clone()
        out[:, :g] = p[:, :g] + sag_scale * (p[:, :g] - d)
    else:
        u, cond = p[:b], p[b:]
        out = cond.clone()
        out[:, :g] = u[:, :g] + cfg_scale * (cond[:, :g] - u[:, :g]) + sag_scale * (u[:, :g] - d)
    return out.to(pred.dtype)


def guidance_shift(pred: torch.Tensor, degraded: torch.Tensor, sag_scale: float, guided_channels: int = -1,
                   uncond_index: int = 0) -> torch.Tensor:
    """Out of place twin of sag_fast::guidance_shift_: every way of pred (k*B, C, ...) gets
    + sag_scale*(uncond - degraded) on its first guided channels, uncond being way number `uncond_index`
    (0 where the unconditional half comes first as in diffusers' SD/SDXL, 1 for DiT's cond-first batch)."""
    b = degraded.shape[0]
    if b == 0 or pred.shape[0] % b or pred.shape[2:] != degraded.shape[2:]:
        raise ValueError(f"guidance_shift: pred {tuple(pred.shape)} must be (k*B, C, ...) for degraded {tuple(degraded.shape)}")
    ways = pred.shape[0] // b
    if not 0 <= uncond_index < ways:
        raise ValueError(f"guidance_shift: uncond_index={uncond_index} must be in 0..{ways - 1} (pred holds {ways} ways)")
    g = _guided(pred.shape[1], guided_channels)
    if g > degraded.shape[1]:
        raise ValueError(f"guided_channels={g} exceeds the channels of degraded ({degraded.shape[1]})")
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p = pred.to(acc)
    u = p[uncond_index * b:(uncond_index + 1) * b, :g]
    delta = sag_scale * (u - degraded[:, :g].to(acc))
    out = p.clone()
    for k in range(ways):
        out[k * b:(k + 1) * b, :g] += delta
    return out.to(pred.dtype)
