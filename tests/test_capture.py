"""sag_fast.capture.AttentionCapture: the captured mask equals the mask of the layer's explicitly materialised
softmax probabilities (reference.attention_mass on them), on diffusers UNets and DiT, nn.MultiheadAttention and
an SDPA module; the model is unchanged when unarmed and after remove(); bad layers raise."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor

from sag_fast import reference
from sag_fast.capture import AttentionCapture, resolve_layer
from tiny_models import tiny_unet, tiny_unet_cond

THRESHOLD = 1.0
MARGIN = 1e-4  # masses this close to the threshold may round either way in fp32: not compared


def tiny_dit():
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                 num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


class SDPAAttention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class TokenModel(nn.Module):
    """conv -> stride-2 conv (grid ceil(H/2) x ceil(W/2)) or pooling (floor) -> attention -> upsample -> conv."""

    def __init__(self, attn: str = "sdpa", batch_first: bool = True, pool: str = "conv", width=8, heads=2):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1) if pool == "conv" else \
            nn.AvgPool2d(2) if pool == "avg" else nn.AdaptiveAvgPool2d(3)
        self.batch_first = batch_first
        self.attn = SDPAAttention(width, heads) if attn == "sdpa" else \
            nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        self.seen_tokens = None

    def forward(self, x, t=None):
        h = self.inp(x)
        d = self.down(h)
        tok = d.flatten(2).transpose(1, 2)
        self.seen_tokens = tok
        if isinstance(self.attn, nn.MultiheadAttention):
            seq = tok if self.batch_first else tok.transpose(0, 1)
            a = self.attn(seq, seq, seq, need_weights=False)[0]
            a = a if self.batch_first else a.transpose(0, 1)
        else:
            a = self.attn(tok)
        a = a.transpose(1, 2).reshape(d.shape)
        return self.out(h + F.interpolate(a, size=x.shape[-2:], mode="nearest"))


# ------------------------------------------------------------------------------ reference masses
def diffusers_probs(model, attn, call):
    """Runs call() with the layer on diffusers' non-SDPA AttnProcessor and records the probabilities it
    materialises (attn.get_attention_scores), (B*heads, Nq, Nk)."""
    seen = []
    original_processor = attn.processor
    original = attn.get_attention_scores
    attn.set_processor(AttnProcessor())
    attn.get_attention_scores = lambda q, k, m=None: seen.append(original(q, k, m)) or seen[-1]
    try:
        with torch.no_grad():
            call()
    finally:
        del attn.get_attention_scores
        attn.set_processor(original_processor)
    assert len(seen) == 1
    return reference.attention_mass(seen[0], heads=attn.heads)


def token_model_mass(model, x):
    with torch.no_grad():
        model(x)
        tok = model.seen_tokens
        if isinstance(model.attn, nn.MultiheadAttention):
            seq = tok if model.batch_first else tok.transpose(0, 1)
            probs = model.attn(seq, seq, seq, need_weights=True, average_attn_weights=False)[1]
        else:
            b, n, c = tok.shape
            q, k, _ = model.attn.qkv(tok).view(b, n, 3, model.attn.heads, -1).permute(2, 0, 3, 1, 4)
            probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return reference.attention_mass(probs)


def assert_mask_matches(mask, mass, grid):
    """mask (B, h, w) == reference mass > threshold, ignoring masses within MARGIN of the threshold."""
    h, w = grid
    assert mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == (mass.shape[0], h, w)
    want = reference.mass_to_mask(mass, grid, THRESHOLD)
    decisive = ((mass - THRESHOLD).abs() > MARGIN).reshape(want.shape)
    assert decisive.float().mean() > 0.9
    assert torch.equal(mask[decisive], want[decisive])
    assert want.any() and not want.all()  # a real mask, not a trivial one


def captured(capture, call, rows=None):
    with torch.no_grad(), capture.capturing(rows):
        out = call()
    return out


# ---------------------------------------------------------------------------------- the models
@pytest.mark.parametrize("rows", [None, slice(0, 2), slice(2, 4)])
def test_unet2d_condition_mid_block(rows):
    model = tiny_unet_cond()
    x, emb = torch.randn(4, 4, 13, 9), torch.randn(4, 5, 8)
    call = lambda: model(x, 10, emb).sample  # noqa: E731
    capture = AttentionCapture(model)
    assert capture.layer_name == "mid_block.attentions.0.transformer_blocks.0.attn1"
    attn = capture.layer
    mass = diffusers_probs(model, attn, call)
    captured(capture, call, rows)
    assert_mask_matches(capture.mask, mass[rows or slice(None)], (7, 5))  # 13x9 -> ceil halving


def test_unet2d_condition_other_layer_and_heads():
    model = tiny_unet_cond()
    x, emb = torch.randn(2, 4, 11, 14), torch.randn(2, 3, 8)
    call = lambda: model(x, 10, emb).sample  # noqa: E731
    capture = AttentionCapture(model, layer=r"up_blocks\.0\.attentions\.1\..*attn1")
    assert capture.layer_name == "up_blocks.0.attentions.1.transformer_blocks.0.attn1"
    mass = diffusers_probs(model, capture.layer, call)
    captured(capture, call)
    assert_mask_matches(capture.mask, mass, (6, 7))


def test_unet2d_mid_block_spatial_attention():
    model = tiny_unet()
    x = torch.randn(4, 3, 12, 10)
    call = lambda: model(x, 7).sample  # noqa: E731
    capture = AttentionCapture(model)
    assert capture.layer_name == "mid_block.attentions.0"
    mass = diffusers_probs(model, capture.layer, call)
    captured(capture, call, slice(0, 2))
    assert_mask_matches(capture.mask, mass[:2], (6, 5))


def test_dit_middle_block():
    model = tiny_dit()
    x, t, y = torch.randn(4, 4, 10, 10), torch.tensor([3, 5, 7, 9]), torch.tensor([1, 2, 3, 4])
    call = lambda: model(x, t, class_labels=y).sample  # noqa: E731
    capture = AttentionCapture(model)
    assert capture.layer_name == "transformer_blocks.1.attn1"
    mass = diffusers_probs(model, capture.layer, call)
    captured(capture, call, slice(2, 4))
    assert_mask_matches(capture.mask, mass[2:], (5, 5))  # 10x10 latents, patch 2


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first):
    model = TokenModel("mha", batch_first=batch_first).eval()
    x = torch.randn(4, 3, 13, 9)
    capture = AttentionCapture(model, layer="attn")
    assert capture.kind == "multihead"
    mass = token_model_mass(model, x)
    captured(capture, lambda: model(x), slice(0, 2))
    assert_mask_matches(capture.mask, mass[:2], (7, 5))


@pytest.mark.parametrize("pool, hw, grid", [("conv", (13, 9), (7, 5)), ("avg", (13, 9), (6, 4)),
                                            ("conv", (16, 11), (8, 6))])
def test_sdpa_module(pool, hw, grid):
    model = TokenModel("sdpa", pool=pool).eval()
    x = torch.randn(4, 3, *hw)
    capture = AttentionCapture(model, layer="attn")
    assert capture.kind == "sdpa"
    mass = token_model_mass(model, x)
    captured(capture, lambda: model(x), slice(2, 4))
    assert_mask_matches(capture.mask, mass[2:], grid)


def test_grid_that_cannot_be_inferred_needs_grid_hw():
    model = TokenModel("sdpa", pool="adaptive").eval()  # 3x3 tokens from any input
    x = torch.randn(2, 3, 13, 9)
    capture = AttentionCapture(model, layer="attn")
    with pytest.raises(ValueError, match="grid_hw"):
        captured(capture, lambda: model(x))
    capture.remove()
    capture = AttentionCapture(model, layer="attn", grid_hw=(3, 3))
    mass = token_model_mass(model, x)
    captured(capture, lambda: model(x))
    assert_mask_matches(capture.mask, mass, (3, 3))
    with pytest.raises(ValueError, match="grid_hw"):
        AttentionCapture(model, layer="attn", grid_hw=(3, 0))


# --------------------------------------------------------------------------- the model unchanged
def _hook_state(model):
    return [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("make, call", [
    (tiny_unet_cond, lambda m, x: m(x, 10, torch.ones(x.shape[0], 5, 8)).sample),
    (tiny_unet, lambda m, x: m(x[:, :3], 7).sample),
    (tiny_dit, lambda m, x: m(x, torch.tensor([3] * x.shape[0]), class_labels=torch.tensor([1] * x.shape[0])).sample),
    (lambda: TokenModel("mha").eval(), lambda m, x: m(x[:, :3])),
    (lambda: TokenModel("sdpa").eval(), lambda m, x: m(x[:, :3])),
])
def test_outputs_bit_identical_unarmed_and_after_remove(make, call):
    model = make()
    x = torch.randn(2, 4, 8, 8)
    before = _hook_state(model)
    with torch.no_grad():
        plain = call(model, x)
        capture = AttentionCapture(model, layer=None if not isinstance(model, TokenModel) else "attn")
        assert torch.equal(call(model, x), plain)
        with capture.capturing():
            assert torch.equal(call(model, x), plain)  # capturing reads q, k; the output is the layer's own
        assert capture.mask is not None
        capture.remove()
        assert torch.equal(call(model, x), plain)
    assert _hook_state(model) == before
    with pytest.raises(RuntimeError, match="removed"):
        with capture.capturing():
            pass


def test_capture_only_on_the_armed_forward():
    model = tiny_unet_cond()
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    capture = AttentionCapture(model)
    with torch.no_grad():
        model(x, 10, emb)
        assert capture.mask is None
        captured(capture, lambda: model(x, 10, emb))
        first = capture.mask
        model(x + 1, 10, emb)  # unarmed: the mask stays
        assert capture.mask is first


# ------------------------------------------------------------------------------------------ errors
def test_layer_errors():
    model = tiny_unet_cond()
    with pytest.raises(ValueError, match="layer"):
        AttentionCapture(model, layer="mid_block.nope")
    with pytest.raises(ValueError, match="matches 0"):
        AttentionCapture(model, layer=r"^zzz\d")
    with pytest.raises(ValueError, match="matches [2-9]"):
        AttentionCapture(model, layer=r".*attn1")
    with pytest.raises(ValueError, match="not self-attention"):
        AttentionCapture(model, layer="mid_block.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(ValueError, match="layer"):
        AttentionCapture(TokenModel())  # no default for a plain module
    # a regex that matches a block and its children resolves to its one self-attention layer
    assert resolve_layer(model, r"mid_block\.attentions")[0] == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert resolve_layer(model, "mid_block")[0] == "mid_block"  # an exact path is taken as it is
    with pytest.raises(ValueError, match="not self-attention"):
        AttentionCapture(model, layer=r"mid_block\..*attn2")


def test_runtime_not_self_attention():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, ctx):
            return self.mha(x, ctx, ctx)[0]

    model = Cross()
    capture = AttentionCapture(model, layer="mha", grid_hw=(2, 2))
    with pytest.raises(ValueError, match="not self-attention"):
        captured(capture, lambda: model(torch.randn(1, 4, 8), torch.randn(1, 4, 8)))

    class CrossSDPA(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k)

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = CrossSDPA()

        def forward(self, q, k):
            return self.att(q, k)

    capture = AttentionCapture(Parent(), layer="att", grid_hw=(2, 2))
    with pytest.raises(ValueError, match="not self-attention"):
        captured(capture, lambda: capture.model(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)))
    assert not any(type(m).__name__ == "_AttentionProbe" for m in torch.overrides._get_current_function_mode_stack())


def test_layer_that_never_attends_raises():
    class NoAttentionAttn(nn.Module):  # named as attention, but never attends
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = NoAttentionAttn()

        def forward(self, x):
            return self.attn(x)

    model = Parent()
    capture = AttentionCapture(model, layer="attn", grid_hw=(1, 1))
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        captured(capture, lambda: model(torch.randn(1, 4)))
    with pytest.raises(ValueError, match="'attn.lin' is a Linear, not an attention layer"):
        AttentionCapture(model, layer="attn.lin")


def test_compiled_module_is_captured_through_its_wrapper():
    model = tiny_unet_cond()
    compiled = torch.compile(model, backend="eager")
    capture = AttentionCapture(compiled)
    assert capture.model is model and capture.layer_name == "mid_block.attentions.0.transformer_blocks.0.attn1"
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    mass = diffusers_probs(model, capture.layer, lambda: model(x, 10, emb).sample)
    captured(capture, lambda: compiled(x, 10, emb).sample)
    assert_mask_matches(capture.mask, mass, (4, 4))
    torch._dynamo.reset()


def test_eager_processor_softmax_is_captured():
    """diffusers' eager AttnProcessor materialises the probabilities: the capture reads them at the softmax."""
    model = tiny_unet_cond()
    x, emb = torch.randn(2, 4, 9, 11), torch.randn(2, 5, 8)
    attn = model.mid_block.attentions[0].transformer_blocks[0].attn1
    mass = diffusers_probs(model, attn, lambda: model(x, 10, emb).sample)
    attn.set_processor(AttnProcessor())
    capture = AttentionCapture(model)
    captured(capture, lambda: model(x, 10, emb).sample, slice(1, 2))
    assert_mask_matches(capture.mask, mass[1:], (5, 6))


# ------------------------------------------------------------------ attention masks over the keys
def _tiny_chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                    axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
                                    approximator_layers=1).eval()


def test_joint_capture_drops_masked_text_keys():
    """Chroma-style padded text: the layer attends with a (B, 1, N, N) float mask (the outer product of the token
    mask), which SDPA adds to the scores. The capture's mask is the float64 joint mass with that mask's row
    for the image queries as a per-key bias; without it the mask would differ."""
    from sag_fast import reference

    model = _tiny_chroma()
    b, n_img, n_txt = 2, 16, 10
    torch.manual_seed(3)  # inputs where dropping the padded keys flips mask bits (it moves masses by up to 6%)
    x, txt = torch.randn(b, n_img, 4), torch.randn(b, n_txt, 16) * 3
    img_ids = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], -1).float()
    # Chroma multiplies its float token mask into a (B, 1, N, N) outer product that SDPA adds to the scores;
    # -30 on the padded tokens makes the image queries' bias -30 there: the padded text keys are dropped
    token_mask = torch.ones(b, n_txt + n_img)
    token_mask[0, 3:n_txt] = -30.0
    token_mask[1, 6:n_txt] = -30.0
    seen = []

    class Record(TorchFunctionMode):  # outside the capture's own mode: sees the calls it passes on
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                q, k = (args[0], args[1]) if len(args) > 1 else (kwargs["query"], kwargs["key"])
                seen.append((q.clone(), k.clone(), kwargs.get("attn_mask"), kwargs.get("scale")))
            return func(*args, **kwargs)

    capture = AttentionCapture(model, "transformer_blocks.0.attn", grid_hw=(4, 4), joint="text_first", probe=False)
    capture.image_tokens = n_img
    with torch.no_grad(), Record(), capture.capturing():
        model(x, txt, torch.tensor([0.5, 0.5]), img_ids, torch.zeros(n_txt, 3), attention_mask=token_mask)
    q, k, attn_mask, scale = seen[0]  # transformer_blocks.0 runs first
    assert attn_mask is not None and attn_mask.shape[-2] > 1, "the layer should attend with a per-query mask"
    bias = attn_mask.expand(b, 1, n_txt + n_img, n_txt + n_img)[:, 0, n_txt].double()
    qd, kd = q.double(), k.double()
    span = (n_txt, n_img)
    mass = reference.joint_attention_mass_from_qk(qd, kd, span, scale, bias)
    with_mask = reference.joint_mass_to_mask(mass, (4, 4))
    without = reference.joint_mass_to_mask(reference.joint_attention_mass_from_qk(qd, kd, span, scale), (4, 4))
    far = ((mass / mass.mean(-1, keepdim=True) - 1).abs() > 1e-4).view(b, 4, 4)  # fp32 may flip the rest
    assert (with_mask != without)[far].any(), "the text mask should change the SAG mask: the test would not see it"
    assert torch.equal(capture.mask[far], with_mask[far])
    capture.remove()


def test_capture_refuses_a_mask_that_is_not_per_key():
    """A mask that differs between the image queries (here: one image query may not see one key) is not a
    per-key mask: the SAG mass would ignore it, so the capture refuses it, naming the layer."""
    model = _tiny_chroma()
    capture = AttentionCapture(model, "transformer_blocks.0.attn", grid_hw=(4, 4), joint="text_first", probe=False)
    capture.image_tokens = 16
    q = torch.randn(1, 2, 20, 8)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[0, 0, 7, 2] = False
    with pytest.raises(RuntimeError, match="differs between its image\\s+queries"):
        capture._from_sdpa(q, q.clone(), attn_mask=mask)
    capture.remove()
