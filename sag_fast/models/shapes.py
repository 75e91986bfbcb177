"""Seeded synthetic images for the built-in model: coloured shapes over soft backgrounds, 32x32 RGB.

Why this data: SAG blurs the regions the model attends to most and pushes the sample away from that blurred
prediction, so its effect shows on sharp object boundaries and fine detail. Every image here has 1-2 solid objects
with anti-aliased edges (circle, square, triangle), thin structure (ring) and high-frequency texture (striped
disc) on a smooth gradient background: edges and detail against flat regions, like natural images at a tiny
scale. The generator is pure torch and seeded, so the same seed gives the same images offline, and the
held-out benchmark set (HOLDOUT_SEED) never overlaps the training stream (seeds from TRAIN_SEED upward).
"""
from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle", "ring", "stripes")
COLOURS = {
    "red": (0.90, 0.15, 0.15), "green": (0.15, 0.75, 0.25), "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15), "cyan": (0.15, 0.85, 0.90), "magenta": (0.85, 0.20, 0.80),
    "orange": (0.98, 0.55, 0.10), "white": (0.95, 0.95, 0.95),
}
TRAIN_SEED = 1_000_000
HOLDOUT_SEED = 7


def _objects(gen: torch.Generator, b: int, n: int, ss: int):
    """Coverage masks (b, n, ss, ss) in [0, 1] at supersampled size ss, plus shape and colour indices (b, n)."""
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    shape = torch.randint(len(SHAPES), (b, n), generator=gen)
    colour = torch.randint(len(COLOURS), (b, n), generator=gen)
    radius = (0.20 + 0.16 * u(b, n)) * ss               # 6.4 .. 11.5 px at 32x32
    cx = radius + (ss - 2 * radius) * u(b, n)             # the whole object inside the image
    cy = radius + (ss - 2 * radius) * u(b, n)
    angle = 2 * math.pi * u(b, n)
    coords = torch.arange(ss, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, 1, ss) - cx[..., None, None]
    y = coords.view(1, 1, ss, 1) - cy[..., None, None]
    c, s = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    ux, uy = c * x + s * y, -s * x + c * y                # object frame
    r = radius[..., None, None]
    d = torch.sqrt(x * x + y * y)
    circle = d < r
    square = torch.maximum(ux.abs(), uy.abs()) < 0.8 * r
    # equilateral triangle with circumradius r: inside the three edges whose normals are 120 degrees apart
    tri = torch.ones_like(circle)
    for k in range(3):
        a = angle[..., None, None] + 2 * math.pi * k / 3
        tri &= (torch.cos(a) * x + torch.sin(a) * y) < 0.5 * r
    ring = circle & (d > 0.62 * r)
    period = ss / 32 * 4.0                                 # 4-px stripes: detail near the Nyquist limit
    stripes = circle & (torch.remainder(ux, period) < period / 2)
    masks = torch.stack([circle, square, tri, ring, stripes], dim=2).float()  # (b, n, 5, ss, ss)
    mask = torch.gather(masks, 2, shape[..., None, None, None].expand(b, n, 1, ss, ss)).squeeze(2)
    return mask, shape, colour, radius


def generate(n: int, seed: int, size: int = 32, with_labels: bool = False, all_labels: bool = False):
    """n images (n, 3, size, size) in [-1, 1]; with_labels also returns the largest object's shape and colour,
    all_labels also its radius (fraction of the image side) and the number of objects minus one."""
    gen = torch.Generator().manual_seed(int(seed))
    ss = size * 2                                          # render at 2x, average down: anti-aliased edges
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # background: a linear gradient between two muted colours in a random direction
    c0, c1 = 0.15 + 0.45 * u(n, 3, 1, 1), 0.15 + 0.45 * u(n, 3, 1, 1)
    theta = 2 * math.pi * u(n, 1, 1, 1)
    coords = torch.linspace(-0.5, 0.5, ss)
    t = (torch.cos(theta) * coords.view(1, 1, 1, ss) + torch.sin(theta) * coords.view(1, 1, ss, 1)) + 0.5
    img = c0 + (c1 - c0) * t.clamp(0, 1)
    img = img.expand(n, 3, ss, ss).clone()
    mask, shape, colour, radius = _objects(gen, n, 2, ss)
    present = torch.ones(n, 2, dtype=torch.bool)
    present[:, 1] = u(n) < 0.5                             # half the images have a second object
    palette = torch.tensor(list(COLOURS.values()))
    for k in range(2):                                     # object 1 is drawn over object 0
        m = (mask[:, k] * present[:, k, None, None]).unsqueeze(1)
        img = img * (1 - m) + palette[colour[:, k]].view(n, 3, 1, 1) * m
    img = torch.nn.functional.avg_pool2d(img, 2)
    img = (img * 2 - 1).clamp(-1, 1)
    if not with_labels:
        return img
    # label: the larger object that is present (ties: the top one)
    area = radius * present
    big = (area[:, 1] >= area[:, 0]).long()
    idx = torch.arange(n)
    if not all_labels:
        return img, shape[idx, big], colour[idx, big]
    return img, shape[idx, big], colour[idx, big], radius[idx, big] / ss, present[:, 1].long()


def holdout(n: int, stream: int = 0, size: int = 32, chunk: int = 500) -> torch.Tensor:
    """The held-out benchmark images: seeds HOLDOUT_SEED * 1000 + 100 * stream + chunk index, never in a training
    stream (those start at 1_000_000); stream 1 is a second independent draw (the FID floor)."""
    if n > 100 * chunk:
        raise ValueError(f"holdout: at most {100 * chunk} images per stream, got n={n}")
    parts = [generate(min(chunk, n - i), HOLDOUT_SEED * 1000 + 100 * stream + i // chunk, size)
             for i in range(0, n, chunk)]
    return torch.cat(parts)


def holdout_labels(n: int, stream: int = 2, chunk: int = 500) -> torch.Tensor:
    """Class labels (the shape index of the largest object, as the class-conditional model was trained on) of n
    held-out images of `stream` (default 2: independent of the benchmark's real images, streams 0 and 1); the
    conditional quality rows sample with these labels, so their class mix is the data's."""
    if n > 100 * chunk:
        raise ValueError(f"holdout_labels: at most {100 * chunk} labels per stream, got n={n}")
    return torch.cat([generate(min(chunk, n - i), HOLDOUT_SEED * 1000 + 100 * stream + i // chunk, 8,
                               with_labels=True)[1] for i in range(0, n, chunk)])


def batch_for_step(step: int, batch: int, size: int = 32) -> torch.Tensor:
    """The training batch of a given step: a function of the step alone, so a resumed run sees the same data."""
    return generate(batch, TRAIN_SEED + step, size)
