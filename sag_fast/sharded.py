"""SAG's attention mass read where diffusers' context parallelism (CP) shards the attention.

Under `model.enable_parallelism(config=ContextParallelConfig(...))` no rank holds the layer's whole attention:

- Ulysses (degree N): each rank holds its 1/N of the sequence with every head; an all-to-all inside the attention
  gives each rank the whole sequence for H/N heads. Rank r's (query, key) pair is global in tokens, partial in heads.
- Ring (degree N): each rank keeps its queries and visits every rank's key chunk (diffusers all-gathers the keys
  and runs its backend's forward op once per chunk, in the order r, r+1, ...). Rank r's pairs are global in keys
  and heads, partial in queries.

SAG's mass of key j is a sum over queries and heads of softmax(q k^T)[i, j], so each rank computes the part of it
that it holds (its heads, or its queries; every row normalised by its log-sum-exp over all keys, which every rank
has for the rows it owns) and one all-reduce of one float per image token adds the parts: exactly the
single-process mass. Nothing of size N^2 (or N x heads x d) travels.

The pairs are read at the one place every CP backend goes through: `attention_dispatch.
_templated_context_parallel_attention(query, key, ..., forward_op=...)`. While a capture is armed (thread-local)
the wrapper hands the template a forward op that records each (query, key chunk) it is given and runs the
backend's own op unchanged; after the template returns, the parts are computed, reduced and thresholded. Outside
an armed SAG forward the wrapper only calls through.

Joint attention (image and text tokens in one softmax): the CP plan splits the image and the text streams
separately, so rank r's sequence is [text_r, image_r] (text first, Flux, QwenImage) or [image_r, text_r]; the
gathered sequence Ulysses attends over is [text_0, image_0, text_1, image_1, ...]. `RankSegments` maps each rank's
slice back to global image-token order, from the global image count and diffusers' split rule (`chunk` in equal
parts, or `tensor_split` for the "anything" modes), before the mass is built.

Text padding (QwenImage): a per-key mask over each rank's [text_r, image_r]. Ulysses' template all-gathers it in
the gathered key order, and it enters each rank's part as the single-process key bias; under ring (each rank's
local mask applied to every chunk by diffusers) it is refused at the first guided call.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CHUNK_ELEMENTS = 1 << 24  # scores held at once: 64 MiB of fp32, as the CPU mask kernel


@dataclass(frozen=True)
class ShardPlan:
    """How the model's CP config shards the attention: `kind` "ulysses" or "ring", its degree, this rank's
    index in that group, the group, and whether uneven lengths are split by `tensor_split` ("anything" modes)."""

    kind: str
    degree: int
    rank: int
    group: object
    anything: bool


def cp_config(model: torch.nn.Module):
    """The model's ContextParallelConfig (diffusers' `enable_parallelism`), or None."""
    parallel = getattr(model, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None)


def plan_of(model: torch.nn.Module) -> ShardPlan | None:
    """The model's sharding as SAG reads it, or None without context parallelism."""
    cp = cp_config(model)
    if cp is None:
        return None
    if cp.ulysses_degree > 1:
        return ShardPlan("ulysses", cp.ulysses_degree, cp._ulysses_local_rank, cp._ulysses_mesh.get_group(),
                         bool(cp.ulysses_anything))
    return ShardPlan("ring", cp.ring_degree, cp._ring_local_rank, cp._ring_mesh.get_group(), bool(cp.ring_anything))


def check(model: torch.nn.Module, layer: torch.nn.Module, layer_name: str, compiled: bool) -> None:
    """Refuses a CP set-up whose mask SAG cannot compute exactly (at enable_sag and before every pipeline call)."""
    cp = cp_config(model)
    if cp is None:
        return
    where = f"context parallelism (ring_degree={cp.ring_degree}, ulysses_degree={cp.ulysses_degree})"
    if cp.ring_degree > 1 and cp.ulysses_degree > 1:
        raise ValueError(f"SAG under {where}: ring and Ulysses together (diffusers' unified attention, a ring over "
                         "all-to-all'd sequences) is not supported by SAG's sharded capture; use ring_degree or "
                         "ulysses_degree alone")
    if compiled:
        raise ValueError(f"SAG under {where} with a torch.compile'd model: the sharded capture reads the attention "
                         "outside any graph and is not supported compiled; run the model eager under CP")
    processor = getattr(layer, "processor", None)
    if getattr(processor, "_parallel_config", None) is not model._parallel_config:
        raise ValueError(f"SAG under {where}: the SAG layer {layer_name!r} ({type(processor).__name__}) has no "
                         "parallel config while the model has one (a processor set after enable_parallelism, or a "
                         "layer the model's CP plan does not reach), so its attention would see only this rank's "
                         "tokens; set processors before model.enable_parallelism(...), or pick another layer= ")
    heads = getattr(layer, "heads", None)
    if cp.ulysses_degree > 1 and not cp.ulysses_anything and isinstance(heads, int) \
            and heads % cp.ulysses_degree:
        raise ValueError(f"SAG under {where}: the SAG layer {layer_name!r} has {heads} heads, which "
                         f"ulysses_degree={cp.ulysses_degree} does not divide (each rank attends with heads / "
                         "degree heads); use a degree that divides the heads, ulysses_anything=True, or ring_degree")


def split_sizes(n: int, parts: int, anything: bool, what: str) -> list[int]:
    """diffusers' split of n tokens over `parts` ranks: equal chunks, or tensor_split's (first n % parts get one more)."""
    if anything:
        return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]
    if n % parts:
        raise RuntimeError(f"SAG under context parallelism: {n} {what} do not split into {parts} equal parts")
    return [n // parts] * parts


@dataclass(frozen=True)
class RankSegments:
    """One rank's slice of a joint sequence: `text` tokens and `image` tokens, image first or not, its image tokens
    being global image tokens offset .. offset + image - 1."""

    text: int
    image: int
    offset: int
    image_first: bool

    @property
    def image_start(self) -> int:
        return 0 if self.image_first else self.text


def rank_segments(lengths: list[int], image_total: int, plan: ShardPlan, joint: str | None,
                  ranks: list[int]) -> list[RankSegments]:
    """The segments of the slices of ranks `ranks` with `lengths` tokens each (their sequences as the attention
    sees them), for a model with `image_total` image tokens in all; joint None: every token is an image token."""
    images = split_sizes(image_total, plan.degree, plan.anything, "image tokens")
    offsets = [sum(images[:r]) for r in range(plan.degree)]
    out = []
    for r, n in zip(ranks, lengths):
        text = n - images[r]
        if text < 0 or (joint is None and text):
            raise RuntimeError(f"SAG under context parallelism: rank {r}'s attention has {n} tokens, fewer than or "
                               f"not its {images[r]} image tokens of {image_total}")
        out.append(RankSegments(text, images[r], offsets[r], joint == "image_first"))
    return out


# --------------------------------------------------------------------------------- the mass of the parts
def _heads_first(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t.to(acc).transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)


def image_key_mass(q: torch.Tensor, q_slices: list[tuple[int, RankSegments]],
                   k_chunks: list[tuple[torch.Tensor, list[tuple[int, RankSegments]]]], scale: float,
                   image_total: int, key_bias: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """(B, image_total) part of the image-key mass, summed over the heads of q and the image queries given.

    q: (B, S, H, D) as diffusers' dispatch has it; q_slices: (position in q, segments) of each rank slice in q;
    k_chunks: every key of the attention, as (chunk (B, S_c, H, D), its rank slices); each row's softmax runs over
    all of them (the global log-sum-exp of the rows this rank owns). Accumulated in fp32 (fp64 for fp64), a chunk
    of query rows at a time (never all queries x keys). key_bias: per chunk, None or its (B, S_c) additive bias
    (-inf: a padded text key, out of every row's softmax), the single-process capture's key_bias rule."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    parts = [q.narrow(1, at + s.image_start, s.image) for at, s in q_slices if s.image]
    if not parts:
        return q.new_zeros(q.shape[0], image_total, dtype=acc)
    qi = _heads_first(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], acc)
    keys = [(_heads_first(k, acc).transpose(-1, -2), slices) for k, slices in k_chunks]   # (B, H, D, S_c)
    biases = [None if b is None else b.to(acc)[:, None, None, :] for b in (key_bias or [None] * len(keys))]
    bsz, heads, nq, _ = qi.shape
    n_keys = sum(k.shape[-1] for k, _ in keys)
    rows = max(1, _CHUNK_ELEMENTS // max(1, bsz * heads * n_keys))
    mass = torch.zeros(bsz, heads, 1, image_total, dtype=acc, device=q.device)
    for i in range(0, nq, rows):
        qb = qi[:, :, i:i + rows]
        scores = [torch.matmul(qb, kt).mul_(scale) for kt, _ in keys]
        scores = [sc if b is None else sc.add_(b) for sc, b in zip(scores, biases)]
        top = torch.stack([s.amax(dim=-1, keepdim=True) for s in scores]).amax(dim=0)
        total = None
        for s in scores:
            s.sub_(top).exp_()
            part = s.sum(dim=-1, keepdim=True)
            total = part if total is None else total + part
        inv = total.reciprocal_().transpose(-1, -2)  # (B, H, 1, rows): each row's 1 / its sum over ALL keys
        for s, (_, slices) in zip(scores, keys):
            for at, seg in slices:
                if seg.image:
                    mass[..., seg.offset:seg.offset + seg.image] += torch.matmul(
                        inv, s.narrow(-1, at + seg.image_start, seg.image))
        del scores
    return mass.squeeze(2).sum(dim=1)


def mask_gather_aligned(segments: list[RankSegments]) -> bool:
    """Whether Ulysses-anything's gathered mask lines up with the gathered keys: diffusers pads every rank's local
    mask to the longest slice, concatenates and trims the end, which is right only when no rank but the last is
    shorter than the longest (always with equal slices or degree 2: tensor_split puts the longer slices first)."""
    lengths = [s.text + s.image for s in segments]
    return all(n == max(lengths) for n in lengths[:-1])


def positioned(segments: list[RankSegments]) -> list[tuple[int, RankSegments]]:
    """(position, segments) of rank slices laid end to end (Ulysses' gathered sequence)."""
    out, at = [], 0
    for s in segments:
        out.append((at, s))
        at += s.text + s.image
    return out


def all_reduce(mass: torch.Tensor, group) -> torch.Tensor:
    """The one collective of a step: the parts' sum, on every rank of the CP group (in place)."""
    dist.all_reduce(mass, op=dist.ReduceOp.SUM, group=group)
    return mass


# ------------------------------------------------------------------------------- the reading template
@dataclass(frozen=True)
class _Read:
    """The armed forward's reader: the capture the template's pairs go to, and the sharding they come from."""

    capture: object
    plan: ShardPlan


_ARMED = threading.local()
_LOCK = threading.Lock()
_INSTALLED = {"count": 0, "original": None}  # captures under CP that need the reader; diffusers' own template


@dataclass
class _Call:
    """One call of the backend's forward op inside the CP template: what this rank attends with."""

    query: torch.Tensor
    key: torch.Tensor
    attn_mask: object
    scale: float | None


def _reading_template(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, return_lse=False, *, forward_op, backward_op, _parallel_config=None):
    original = _INSTALLED["original"]
    reader = getattr(_ARMED, "reader", None)
    if reader is None:
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                        forward_op=forward_op, backward_op=backward_op, _parallel_config=_parallel_config)
    _ARMED.reader = None  # the layer's first attention only (as the single-process probe)
    if reader.plan.kind == "ring" and attn_mask is not None:
        raise RuntimeError(
            f"SAG under ring attention (ring_degree={reader.plan.degree}): layer {reader.capture.layer_name!r} attends "
            "with an attention mask (a padded text prompt: QwenImage's encoder_hidden_states_mask), and diffusers' "
            "ring attention applies each rank's own local mask to every rank's key chunk, so neither the attention "
            "nor a SAG mask read from it is the single-process one; use ulysses_degree (its all-gathered mask is "
            "exact, and SAG reads it), or prompts without padding (one prompt per call, or a mask of all ones)")
    calls: list[_Call] = []

    def recording_op(ctx, q, k, v, mask=None, p=0.0, causal=False, s=None, gqa=False, lse=False, *args, **kwargs):
        calls.append(_Call(q, k, mask, s))
        return forward_op(ctx, q, k, v, mask, p, causal, s, gqa, lse, *args, **kwargs)

    out = original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   forward_op=recording_op, backward_op=backward_op, _parallel_config=_parallel_config)
    reader.capture._from_sharded(reader.plan, query, calls, is_causal)
    return out


def install() -> None:
    """Puts the reading template in diffusers' attention dispatch (once per process; counted)."""
    from diffusers.models import attention_dispatch

    with _LOCK:
        if _INSTALLED["original"] is None:  # else still in a chain someone wrapped around it: passes through
            _INSTALLED["original"] = attention_dispatch._templated_context_parallel_attention
            attention_dispatch._templated_context_parallel_attention = _reading_template
        _INSTALLED["count"] += 1


def uninstall() -> None:
    """Takes it out when the last capture that needed it is removed (unless someone wrapped it since)."""
    from diffusers.models import attention_dispatch

    with _LOCK:
        if _INSTALLED["count"] == 0:
            return
        _INSTALLED["count"] -= 1
        if _INSTALLED["count"] == 0 and attention_dispatch._templated_context_parallel_attention is _reading_template:
            attention_dispatch._templated_context_parallel_attention = _INSTALLED["original"]
            _INSTALLED["original"] = None


class reading:
    """`with reading(capture, plan):` the layer's CP attention in this thread is read for `capture`."""

    def __init__(self, capture, plan: ShardPlan):
        self.reader = _Read(capture, plan)

    def __enter__(self):
        self.previous = getattr(_ARMED, "reader", None)
        _ARMED.reader = self.reader
        return self

    def __exit__(self, *exc):
        _ARMED.reader = self.previous
