"""sag_fast.guidance: SAGConfig, slice_batch and the guided step against a hand-written reference computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sag_fast import reference
from sag_fast._profiling import count_dispatched_ops, host_syncs
from sag_fast.capture import AttentionCapture
from sag_fast.engine import sag_guided_forward, slice_batch
from sag_fast.guidance import SAGConfig


# ------------------------------------------------------------------------------------ toy model
class ToyAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (what AttentionCapture patches)."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)

    def qk(self, tokens):
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, tokens):
        q, k, v = self.qk(tokens)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(tokens.shape)

    def probs(self, tokens):
        """The softmax probabilities, materialised explicitly (the test's independent path)."""
        q, k, _ = self.qk(tokens)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


class ToyModel(nn.Module):
    """x (B, C, H, W), t (0-dim or (B,)), optional cond (B, 4) and extra={"y": (B, 4)} -> (B, C_out, H, W)."""

    def __init__(self, c_in=3, c_out=3, width=8, heads=2):
        super().__init__()
        self.inp = nn.Conv2d(c_in, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)  # the attention grid is ceil(H/2) x ceil(W/2)
        self.t_emb = nn.Linear(1, width)
        self.cond = nn.Linear(4, width)
        self.attn = ToyAttention(width, heads)
        self.out = nn.Conv2d(width, c_out, 3, padding=1)

    def tokens(self, x, t, cond=None, extra=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
        h = self.inp(x) + self.t_emb(t / 1000)[:, :, None, None]
        if cond is not None:
            h = h + self.cond(cond)[:, :, None, None]
        if extra is not None:
            h = h + self.cond(extra["y"])[:, :, None, None]
        d = self.down(h)
        return h, d.flatten(2).transpose(1, 2), d.shape[-2:]

    def forward(self, x, t, cond=None, extra=None):
        h, tok, (gh, gw) = self.tokens(x, t, cond, extra)
        a = self.attn(tok).transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return self.out(h + F.interpolate(a, size=x.shape[-2:], mode="nearest"))


def reference_guided(model, x, t, kw, cfg: SAGConfig, c1, c2, ways, uncond_index):
    """Plain forward, the unconditional way's degraded input from explicit probabilities, second forward.
    Returns (plain output, degraded output, rows)."""
    total = x.shape[0]
    b = total // ways
    rows = slice(uncond_index * b, (uncond_index + 1) * b)
    out = model(x, t, **kw)
    kw_rows = {"cond": kw["cond"][rows], "extra": {"y": kw["extra"]["y"][rows]}}  # by hand, not slice_batch
    t_rows = t[rows] if t.dim() else t
    mask = None
    if cfg.mask == "attention":
        _, tok, grid = model.tokens(x[rows], t_rows, **kw_rows)
        mask = reference.attention_mask(model.attn.probs(tok), tuple(grid), x.shape[-2:], cfg.threshold)
    c = x.shape[1]
    c1r = c1[rows] if c1.dim() else c1
    c2r = c2[rows] if c2.dim() else c2
    x_deg = reference.degrade(x[rows], out[rows, :c], mask, c1r, c2r, cfg.kernel_size, cfg.blur_sigma)
    return out, model(x_deg, t_rows, **kw_rows), rows


# --------------------------------------------------------------------------------------- config
def test_config_defaults_and_window():
    cfg = SAGConfig()
    assert (cfg.scale, cfg.blur_sigma, cfg.kernel_size, cfg.threshold, cfg.mask) == (0.75, 1.0, 9, 1.0, "attention")
    cfg = SAGConfig(start=0.25, stop=0.5)
    assert [cfg.active_at(p) for p in (0.0, 0.25, 0.49, 0.5, 0.9)] == [False, True, True, False, False]
    assert not SAGConfig(scale=0.0).active_at(0.0)


@pytest.mark.parametrize("field, value", [
    ("scale", float("nan")), ("scale", "1"), ("blur_sigma", 0.0), ("blur_sigma", -1.0), ("kernel_size", 4),
    ("kernel_size", 0), ("kernel_size", 3.0), ("threshold", -0.1), ("layer", ""), ("layer", 3), ("mask", "local"),
    ("start", -0.1), ("stop", 1.5), ("start", True),
])
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        SAGConfig(**{field: value})


def test_config_rejects_start_after_stop():
    with pytest.raises(ValueError, match="start"):
        SAGConfig(start=0.6, stop=0.4)


# ---------------------------------------------------------------------------------- slice_batch
def test_slice_batch_values():
    """Hand-written expectations: rows 3..5 of arange tensors are the numbers 3, 4, 5."""
    kw = {"a": torch.arange(6.0)[:, None], "nested": {"b": torch.arange(12).view(6, 2)}, "t": torch.tensor(9)}
    out = slice_batch(kw, slice(3, 6), 6)
    assert out["a"].tolist() == [[3.0], [4.0], [5.0]]
    assert out["nested"]["b"].tolist() == [[6, 7], [8, 9], [10, 11]]
    assert out["t"].tolist() == 9
    assert slice_batch(kw, slice(0, 2), 6)["a"].tolist() == [[0.0], [1.0]]


def test_slice_batch_nested():
    b = 3
    kw = {
        "encoder_hidden_states": torch.randn(2 * b, 5, 4),
        "added_cond_kwargs": {"text_embeds": torch.randn(2 * b, 7), "time_ids": torch.randn(2 * b, 6)},
        "timestep": torch.tensor(7),
        "pair": (torch.randn(2 * b, 2), torch.randn(4, 2)),
        "listed": [torch.randn(2 * b)],
        "cross_attention_kwargs": {"scale": torch.randn(2 * b)},
        "flag": True,
        "none": None,
    }
    out = slice_batch(kw, slice(b, 2 * b), 2 * b)
    assert torch.equal(out["encoder_hidden_states"], kw["encoder_hidden_states"][b:])
    assert torch.equal(out["added_cond_kwargs"]["text_embeds"], kw["added_cond_kwargs"]["text_embeds"][b:])
    assert torch.equal(out["added_cond_kwargs"]["time_ids"], kw["added_cond_kwargs"]["time_ids"][b:])
    assert out["timestep"] is kw["timestep"]
    assert isinstance(out["pair"], tuple) and torch.equal(out["pair"][0], kw["pair"][0][b:])
    assert out["pair"][1] is kw["pair"][1]  # first dim 4 != 6: not the batch
    assert isinstance(out["listed"], list) and torch.equal(out["listed"][0], kw["listed"][0][b:])
    assert out["cross_attention_kwargs"] is kw["cross_attention_kwargs"]
    assert out["flag"] is True and out["none"] is None
    assert set(out) == set(kw)


# ---------------------------------------------------------------------------------- guided step
def _setup(ways, c_out=3, h=13, w=9, b=2, batched_t=True, dtype=torch.float64):
    model = ToyModel(c_out=c_out).to(dtype).eval()
    x = torch.randn(ways * b, 3, h, w, dtype=dtype)
    t = torch.randint(0, 1000, (ways * b,)) if batched_t else torch.tensor(421)
    kw = {"cond": torch.randn(ways * b, 4, dtype=dtype), "extra": {"y": torch.randn(ways * b, 4, dtype=dtype)}}
    c1 = torch.rand(ways * b, dtype=dtype) + 0.5
    c2 = -torch.rand(ways * b, dtype=dtype)
    return model, x, t, kw, c1, c2


@pytest.mark.parametrize("ways, uncond_index", [(1, 0), (2, 0), (2, 1)])
@pytest.mark.parametrize("mask", ["attention", "global"])
def test_guided_forward_matches_reference(ways, uncond_index, mask):
    model, x, t, kw, c1, c2 = _setup(ways)
    cfg = SAGConfig(scale=0.8, kernel_size=5, blur_sigma=1.3, threshold=1.0, mask=mask)
    capture = AttentionCapture(model, layer="attn")
    with torch.no_grad():
        plain, degraded, rows = reference_guided(model, x, t, kw, cfg, c1, c2, ways, uncond_index)
        got = sag_guided_forward(model, x, t, kw, config=cfg, capture=capture, c1=c1, c2=c2, ways=ways,
                                 uncond_index=uncond_index)
    if ways == 1:
        expected = reference.guidance_combine(plain, degraded, 0.0, cfg.scale)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    else:
        # the caller's CFG on the shifted ways == the reference CFG+SAG combination
        b = x.shape[0] // 2
        cond_rows = slice(0, b) if uncond_index == 1 else slice(b, 2 * b)
        w = 3.5
        got_cfg = got[rows] + w * (got[cond_rows] - got[rows])
        expected = reference.guidance_combine(torch.cat([plain[rows], plain[cond_rows]]), degraded, w, cfg.scale)
        torch.testing.assert_close(got_cfg, expected, rtol=1e-9, atol=1e-9)
    assert not torch.equal(got, plain)  # the guidance did something


def test_guided_forward_learned_variance_and_scalar_timestep():
    """2C outputs: the first C channels are degraded and guided, the variance is kept; 0-dim t and c1/c2."""
    model, x, t, kw, _, _ = _setup(2, c_out=6, batched_t=False)
    c1, c2 = torch.tensor(0.9, dtype=x.dtype), torch.tensor(-0.4, dtype=x.dtype)
    cfg = SAGConfig(scale=1.2, kernel_size=3)
    capture = AttentionCapture(model, layer="attn")
    with torch.no_grad():
        plain, degraded, rows = reference_guided(model, x, t, kw, cfg, c1, c2, 2, 0)
        got = sag_guided_forward(model, x, t, kw, config=cfg, capture=capture, c1=c1, c2=c2, ways=2,
                                 guided_channels=3)
    shift = cfg.scale * (plain[rows, :3] - degraded[:, :3])
    torch.testing.assert_close(got[:, :3], plain[:, :3] + shift.repeat(2, 1, 1, 1), rtol=1e-9, atol=1e-9)
    assert torch.equal(got[:, 3:], plain[:, 3:])


def test_scale_zero_is_the_plain_forward():
    model, x, t, kw, c1, c2 = _setup(2, dtype=torch.float32)
    calls = []
    capture = AttentionCapture(model, layer="attn")

    def forward(*a, **k):
        calls.append(1)
        return model(*a, **k)

    with torch.no_grad():
        plain = model(x, t, **kw)
        got = sag_guided_forward(forward, x, t, kw, config=SAGConfig(scale=0.0), capture=capture, c1=c1, c2=c2, ways=2)
    assert torch.equal(got, plain) and len(calls) == 1


def test_guided_forward_bad_input():
    model, x, t, kw, c1, c2 = _setup(2)
    capture = AttentionCapture(model, layer="attn")
    with pytest.raises(ValueError, match="ways"):
        sag_guided_forward(model, x[:3], t[:3], {}, config=SAGConfig(), capture=capture, c1=c1, c2=c2, ways=2)
    with pytest.raises(ValueError, match="uncond_index"):
        sag_guided_forward(model, x, t, kw, config=SAGConfig(), capture=capture, c1=c1, c2=c2, ways=2, uncond_index=2)
    with pytest.raises(ValueError, match="capture"):
        sag_guided_forward(model, x, t, kw, config=SAGConfig(), capture=None, c1=c1, c2=c2, ways=2)
    with pytest.raises(TypeError, match="config"):
        sag_guided_forward(model, x, t, kw, config={"scale": 1.0}, capture=capture, c1=c1, c2=c2, ways=2)


def test_guided_step_dispatches_no_host_sync():
    model, x, t, kw, c1, c2 = _setup(2, dtype=torch.float32)
    capture = AttentionCapture(model, layer="attn")
    cfg = SAGConfig(kernel_size=5)
    with torch.no_grad():
        _, counts = count_dispatched_ops(lambda: sag_guided_forward(model, x, t, kw, config=cfg, capture=capture,
                                                                    c1=c1, c2=c2, ways=2))
        _, plain_counts = count_dispatched_ops(lambda: model(x, t, **kw))
    total, plain = sum(counts.values()), sum(plain_counts.values())
    overhead = counts.copy()
    overhead.subtract({k: 2 * v for k, v in plain_counts.items()})
    overhead = {k: v for k, v in sorted(overhead.items(), key=lambda kv: -kv[1]) if v}
    print(f"\nguided step: {total} ops dispatched (one plain forward: {plain}; SAG overhead "
          f"{total - 2 * plain} ops beyond two forwards: {overhead})")
    assert host_syncs(counts) == {}
    assert total > 2 * plain  # the counter sees both forwards and the SAG work


def test_count_dispatched_ops_sees_a_host_sync():
    """The sync check can fail: .item() shows up as aten._local_scalar_dense."""
    _, counts = count_dispatched_ops(lambda: torch.ones(3).sum().item())
    assert "aten._local_scalar_dense" in host_syncs(counts)


@pytest.mark.parametrize("uncond_index", [0, 1, 2])
def test_guidance_shift_any_uncond_way(uncond_index):
    """sag_fast.guidance.guidance_shift_ is the fused op (no fallback: without the extension this fails) and
    shifts every way by s*(u - d) on the guided channels, u being way `uncond_index`; non-contiguous pred;
    the expectation is written out by hand."""
    import sag_fast.guidance as guidance
    import sag_fast.ops.guidance as ops_guidance
    assert guidance.guidance_shift_ is ops_guidance.guidance_shift_
    b, g = 2, 3
    pred = torch.randn(3 * b, 7, 5, 11, dtype=torch.float64).transpose(2, 3)
    degraded = torch.randn(b, 5, 11, 5, dtype=torch.float64)
    u = pred[uncond_index * b:(uncond_index + 1) * b, :g]
    expected = pred.clone()
    expected[:, :g] += (0.6 * (u - degraded[:, :g])).repeat(3, 1, 1, 1)
    _, counts = count_dispatched_ops(lambda: guidance.guidance_shift_(pred, degraded, 0.6, g, uncond_index))
    assert counts == {"sag_fast.guidance_shift_": 1}
    torch.testing.assert_close(pred, expected, rtol=1e-12, atol=1e-12)


def test_degrade_is_the_fused_op():
    """sag_fast.guidance.degrade dispatches exactly the op sag_fast::degrade (no swappable seam)."""
    import sag_fast.guidance as guidance
    x, o = torch.randn(2, 3, 9, 10), torch.randn(2, 3, 9, 10)
    c1, c2 = torch.tensor(1.0), torch.tensor([-0.5, -0.2])
    y, counts = count_dispatched_ops(lambda: guidance.degrade(x, o, None, c1, c2, 5, 1.0))
    assert counts == {"sag_fast.degrade": 1}
    torch.testing.assert_close(y.double(), reference.degrade(x.double(), o.double(), None, c1.double(), c2.double(),
                                                             5, 1.0), rtol=1e-5, atol=1e-5)
