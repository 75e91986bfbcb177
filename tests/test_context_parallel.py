"""SAG under diffusers' context parallelism (issue 17): two gloo processes on the CPU (tests/cp_test_shims.py makes
them look like GPU ranks to diffusers), a tiny Flux, Wan and QwenImage sharded with Ulysses 2 or ring 2.

Each spawned job runs several checks in one start-up (~6 s per job): the single-process SAG run first (the
reference), then the same pipeline with `enable_parallelism` on, then with the all-reduce removed (each rank's part
alone: the run must then differ, or the comparison could not fail). Refusals of bad set-ups that need no second
process run in this process, on the real config objects."""
from __future__ import annotations

import os
import tempfile
import time
import traceback

import pytest
import torch

import cp_test_shims

WORLD = 2
TIMEOUT_S = 120


# ------------------------------------------------------------------------------------------------ harness
def _entry(rank: int, job: str, rendezvous: str, outdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    cp_test_shims.init_process_group(rank, WORLD, rendezvous)
    try:
        result = JOBS[job](rank, *args)
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def spawn(job: str, *args) -> list[dict]:
    """Runs JOBS[job](rank, *args) in WORLD gloo processes (file:// rendezvous in a temporary directory); the
    ranks' result dicts. Bounded by TIMEOUT_S: a hang (a collective one rank skipped) fails, it does not block."""
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.start_processes(
            _entry, args=(job, os.path.join(tmp, "rendezvous"), tmp, args), nprocs=WORLD, join=False,
            start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"context-parallel job {job!r} did not finish in {TIMEOUT_S} s")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for rank, result in enumerate(results):
        if "error" in result:
            pytest.fail(f"rank {rank} of job {job!r} failed:\n{result['error']}")
    return results


# ---------------------------------------------------------------------------------------------- the jobs
def _config(mode: str):
    from diffusers import ContextParallelConfig

    kind, _, extra = mode.partition("+")
    return ContextParallelConfig(**{f"{kind}_degree": WORLD, **({f"{kind}_anything": True} if extra else {})})


def _masks_of(pipe):
    """Records the SAG mask left by each of the pipeline's model calls (None where the call computed none)."""
    seen = []

    def hook(module, args, out):
        capture = vars(pipe)["_sag_fast_state"].capture
        seen.append(None if capture is None or capture.mask is None else capture.mask.clone())
        if capture is not None:
            capture.mask = None
    return seen, pipe.transformer.register_forward_hook(hook)


def _runs(pipe, call, order: str, mode: str) -> dict:
    """reference (single-process SAG), CP SAG, CP plain, CP SAG with the reduction removed; masks of each."""
    from sag_fast import disable_sag, enable_sag, sharded

    out = {}

    def run(name):
        seen, handle = _masks_of(pipe)
        out[name] = call()
        out[name + "_masks"] = seen
        handle.remove()

    enable_sag(pipe, 1.0)
    run("reference")
    if order == "sag_first":  # enable_parallelism after enable_sag: SAG's hook must stay outside the CP split
        pipe.transformer.enable_parallelism(config=_config(mode))
    else:
        disable_sag(pipe)
        pipe.transformer.enable_parallelism(config=_config(mode))
        enable_sag(pipe, 1.0)
    run("cp")
    reduce = sharded.all_reduce
    sharded.all_reduce = lambda mass, group: mass  # each rank's part alone
    try:
        run("no_reduction")
    finally:
        sharded.all_reduce = reduce
    disable_sag(pipe)
    from diffusers.models import attention_dispatch
    out["dispatch_restored"] = attention_dispatch._templated_context_parallel_attention is not \
        sharded._reading_template and sharded._INSTALLED["count"] == 0
    out["plain"] = call()
    return out


def flux_job(rank: int, mode: str, order: str, negative: bool, text_tokens: int) -> dict:
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    g = torch.Generator().manual_seed(100)
    kw = dict(prompt_embeds=torch.randn(1, text_tokens, 32, generator=g),
              pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=64, width=64, num_inference_steps=2,
              output_type="latent")
    if negative:
        kw.update(negative_prompt_embeds=torch.randn(1, text_tokens, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g), true_cfg_scale=4.0)
    return _runs(pipe, lambda: pipe(generator=torch.Generator().manual_seed(0), **kw).images, order, mode)


def wan_job(rank: int, mode: str, order: str) -> dict:
    from sag_fast.diffusers.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    call = dict(height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    return _runs(pipe, lambda: pipe(prompt_embeds=pe, negative_prompt_embeds=ne,
                                    generator=torch.Generator().manual_seed(0), **call).frames, order, mode)


def _qwen_inputs(padded: tuple[int, int], text: int = 6) -> dict:
    """True CFG on 32x32 images (16 image tokens), `text` tokens per prompt (6: 3 per rank). padded: how many of the
    last tokens of the prompt / negative prompt are padding (large values: attending to them would show), so rank
    1's text slice is partly padded and rank 0's is not; 0: an all-ones mask, which the pipeline turns into None."""
    g = torch.Generator().manual_seed(7)
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent", true_cfg_scale=4.0)
    for name, pad in zip(("prompt", "negative_prompt"), padded):
        embeds, mask = torch.randn(1, text, 32, generator=g), torch.ones(1, text, dtype=torch.long)
        if pad:
            embeds[:, text - pad:] = 10 * torch.randn(1, pad, 32, generator=g)
            mask[:, text - pad:] = 0
        kw[name + "_embeds"], kw[name + "_embeds_mask"] = embeds, mask
    return kw


def qwen_job(rank: int, mode: str, padded: tuple[int, int], text: int = 6) -> dict:
    from sag_fast.diffusers.tiny import tiny_qwenimage_pipeline

    pipe = tiny_qwenimage_pipeline()
    kw = _qwen_inputs(padded, text)
    return _runs(pipe, lambda: pipe(generator=torch.Generator().manual_seed(0), **kw).images, "cp_first", mode)


def qwen_ring_padded_job(rank: int) -> dict:
    """Ring with a padded negative prompt: refused at the first guided call (the unconditional one: it computes
    the shift), before a step completes. Only the negative is padded and SAG is on block 0: the test shim's
    log-sum-exp op takes no mask, so a masked attention outside the SAG read would fail there first (on a GPU,
    cuDNN takes the mask and the refusal comes at the SAG layer, in the first step)."""
    from sag_fast import enable_sag
    from sag_fast.diffusers.tiny import tiny_qwenimage_pipeline

    pipe = tiny_qwenimage_pipeline()
    pipe.transformer.enable_parallelism(config=_config("ring"))
    enable_sag(pipe, 1.0, layer="transformer_blocks.0.attn")
    steps = []
    try:
        pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=lambda *a: steps.append(1) or {},
             **_qwen_inputs((0, 3)))
    except RuntimeError as exc:
        return {"error_message": str(exc), "steps": len(steps)}
    return {"error_message": None, "steps": len(steps)}


def suite_job(rank: int, kinds: tuple) -> dict:
    """Every scenario of each CP kind in one start-up: Flux distilled (CP on before enable_sag for Ulysses, after it
    for ring), Flux true CFG, Flux with 5 text tokens under the anything mode (3 + 2 over the ranks), Wan,
    QwenImage true CFG without text padding (mask None) and, under Ulysses, with padded prompts (the gathered
    text mask read as a key bias; also 5 text tokens under ulysses_anything, 3 + 2); under ring, padded prompts
    refused."""
    out, times = {}, {}
    for kind in kinds:
        first = "cp_first" if kind == "ulysses" else "sag_first"
        qwen = (("qwen_padded", qwen_job, (kind, (2, 3))),
                ("qwen_uneven_padded", qwen_job, (kind + "+anything", (2, 3), 5))) if kind == "ulysses" else \
            (("qwen_ring_padded", qwen_ring_padded_job, ()),)
        for name, job, args in (("flux", flux_job, (kind, first, False, 6)),
                                ("flux_true_cfg", flux_job, (kind, "cp_first", True, 6)),
                                ("flux_uneven", flux_job, (kind + "+anything", "cp_first", False, 5)),
                                ("wan", wan_job, (kind, "cp_first")),
                                ("qwen", qwen_job, (kind, (0, 0))), *qwen):
            start = time.perf_counter()
            out[kind, name] = job(rank, *args)
            times[kind, name] = round(time.perf_counter() - start, 1)
    out["times"] = times
    return out


JOBS = {"suite": suite_job}


# --------------------------------------------------------------------------------------------- the checks
def _check(results: list[dict]) -> None:
    r0, r1 = results
    ref, cp = r0["reference"], r0["cp"]
    masks = [m for m in r0["cp_masks"] if m is not None]
    assert masks and len(masks) == len([m for m in r0["reference_masks"] if m is not None])
    for got, want in zip(r0["cp_masks"], r0["reference_masks"]):  # the global mask, step by step
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    for a, b in zip(r0["cp_masks"], r1["cp_masks"]):
        assert (a is None and b is None) or torch.equal(a, b)
    torch.testing.assert_close(cp, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1["cp"], cp, rtol=0, atol=0)  # the ranks agree exactly
    assert (cp - r0["plain"]).abs().max() > 1e-3  # SAG changes the output under CP
    # without the all-reduce each rank's mask is its own part's: it must differ from the global one
    assert any(not torch.equal(a, b) for a, b in zip(r0["no_reduction_masks"], r0["reference_masks"])
               if a is not None), "each rank's partial mask equals the global one: the test could not fail"
    assert not torch.allclose(r0["no_reduction"], ref, rtol=1e-5, atol=1e-6)
    assert r0["dispatch_restored"] and r1["dispatch_restored"]  # disable_sag takes the reader out of the dispatch


def test_sag_under_context_parallelism_equals_single_process():
    """Ulysses 2 and ring 2 (one spawn for both: start-up is most of the cost), Flux (distilled, true CFG, uneven
    text under the anything modes), Wan and QwenImage (true CFG; under Ulysses also padded text, masked): rank 0's
    latents equal single-process SAG to 1e-5, its masks equal the single-process masks at every step, the ranks
    agree, SAG has an effect, and without the all-reduce the masks and latents differ. Ring with padded text:
    refused in the first model call."""
    kinds = ("ulysses", "ring")
    results = spawn("suite", kinds)
    print("seconds per scenario (rank 0):", results[0]["times"])
    for kind in kinds:
        padded = ("qwen_padded", "qwen_uneven_padded") if kind == "ulysses" else ()
        for scenario in ("flux", "flux_true_cfg", "flux_uneven", "wan", "qwen", *padded):
            try:
                _check([r[kind, scenario] for r in results])
            except AssertionError as exc:
                raise AssertionError(f"{kind}, {scenario}: {exc}") from exc
    for r in results:  # ring with a padded prompt: refused inside the first model call, no step completed
        refused = r["ring", "qwen_ring_padded"]
        assert refused["steps"] == 0 and "ring attention applies each rank's own local mask" in \
            (refused["error_message"] or ""), refused


# ------------------------------------------------------------------------------- the reduction, in float64
@pytest.mark.parametrize("kind", ["ulysses", "ring"])
@pytest.mark.parametrize("degree,text,image,anything,joint", [
    (2, 6, 16, False, "text_first"), (3, 5, 14, True, "text_first"), (2, 4, 10, False, "image_first"),
    (2, 0, 12, False, None), (3, 0, 11, True, None)])
def test_rank_parts_add_up_to_the_float64_reference_mass(kind, degree, text, image, anything, joint):
    """Each rank's part of the mass as sharded.image_key_mass computes it from what the rank holds (Ulysses: the
    gathered sequence of slices [text_r, image_r], heads / N; ring: its own slice against every rank's chunk), summed
    as the all-reduce sums them, equals reference.joint_attention_mass (attention_mass without text) of the global
    q, k, in float64; one rank's part alone does not."""
    from sag_fast import reference, sharded

    b, heads, d = 2, 2 * degree, 4
    g = torch.Generator().manual_seed(degree * 100 + text + image)
    glob_text = torch.randn(b, text, heads, d, 2, generator=g, dtype=torch.float64)
    glob_image = torch.randn(b, image, heads, d, 2, generator=g, dtype=torch.float64)
    split = (lambda t: list(t.tensor_split(degree, dim=1))) if anything else (lambda t: list(t.chunk(degree, dim=1)))
    texts = split(glob_text) if text else [glob_text[:, :0]] * degree
    images = split(glob_image)
    order = (lambda t, i: (i, t)) if joint == "image_first" else (lambda t, i: (t, i))
    local = [torch.cat(order(t, i), dim=1) for t, i in zip(texts, images)]  # rank r's sequence, (B, S_r, H, d, 2)
    plan = lambda r: sharded.ShardPlan(kind, degree, r, None, anything)  # noqa: E731
    scale = 0.7
    parts = []
    for r in range(degree):
        if kind == "ulysses":
            gathered = torch.cat(local, dim=1)[:, :, r * heads // degree:(r + 1) * heads // degree]
            segments = sharded.rank_segments([t.shape[1] for t in local], image, plan(r), joint, list(range(degree)))
            slices = sharded.positioned(segments)
            parts.append(sharded.image_key_mass(gathered[..., 0], slices, [(gathered[..., 1], slices)], scale, image))
        else:
            owners = [(r + i) % degree for i in range(degree)]
            segments = sharded.rank_segments([local[o].shape[1] for o in owners], image, plan(r), joint, owners)
            chunks = [(local[o][..., 1], [(0, s)]) for o, s in zip(owners, segments)]
            parts.append(sharded.image_key_mass(local[r][..., 0], [(0, segments[0])], chunks, scale, image))
    mass = sum(parts) / heads
    q, k = (torch.cat(order(glob_text[..., i], glob_image[..., i]), dim=1).transpose(1, 2) for i in (0, 1))
    start = 0 if joint == "image_first" or not text else text
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    want = reference.joint_attention_mass(probs, (start, image)) if text else reference.attention_mass(probs)
    torch.testing.assert_close(mass, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(parts[0] * degree / heads, want, rtol=1e-3)


@pytest.mark.parametrize("degree,text,image,anything", [(2, 6, 16, False), (2, 5, 14, True), (3, 6, 12, False)])
def test_ulysses_parts_with_a_text_padding_mask_add_up_to_the_masked_float64_mass(degree, text, image, anything):
    """QwenImage's padded text under Ulysses: the template all-gathers each rank's local per-key mask ([text_r,
    image_r]) in the gathered key order; that mask as a key bias in each rank's part (sharded.image_key_mass) sums
    to the mass of the global softmax with the padded keys dropped (reference.joint_attention_mass), in float64;
    without the bias it does not."""
    from sag_fast import reference, sharded

    b, heads, d = 2, 2 * degree, 4
    g = torch.Generator().manual_seed(degree * 10 + text + image)
    q_text, k_text = (torch.randn(b, text, heads, d, generator=g, dtype=torch.float64) for _ in range(2))
    q_img, k_img = (torch.randn(b, image, heads, d, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.arange(text)[None] < torch.tensor([text - 2, text - 3])[:, None]   # (B, text): padded tails
    bias_text = torch.where(keep, 0.0, float("-inf")).double()
    split = (lambda t: list(t.tensor_split(degree, dim=1))) if anything else (lambda t: list(t.chunk(degree, dim=1)))
    ones = torch.zeros(b, image, dtype=torch.float64)
    # rank r's sequence [text_r, image_r]; the gathered sequence and its gathered mask: the slices end to end
    gathered = {name: torch.cat([torch.cat(p, dim=1) for p in zip(split(t), split(i))], dim=1)
                for name, t, i in (("q", q_text, q_img), ("k", k_text, k_img), ("bias", bias_text, ones))}
    lengths = [t.shape[1] + i.shape[1] for t, i in zip(split(q_text), split(q_img))]
    scale = 0.6
    parts, unmasked = [], []
    for r in range(degree):
        plan = sharded.ShardPlan("ulysses", degree, r, None, anything)
        slices = sharded.positioned(sharded.rank_segments(lengths, image, plan, "text_first", list(range(degree))))
        heads_r = slice(r * heads // degree, (r + 1) * heads // degree)
        q, k = gathered["q"][:, :, heads_r], gathered["k"][:, :, heads_r]
        parts.append(sharded.image_key_mass(q, slices, [(k, slices)], scale, image, [gathered["bias"]]))
        unmasked.append(sharded.image_key_mass(q, slices, [(k, slices)], scale, image))
    q, k = (torch.cat(p, dim=1).transpose(1, 2) for p in ((q_text, q_img), (k_text, k_img)))
    bias = torch.cat([bias_text, ones], dim=1)[:, None, None, :]
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
    want = reference.joint_attention_mass(probs, (text, image))
    torch.testing.assert_close(sum(parts) / heads, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sum(unmasked) / heads, want, rtol=1e-3)


@pytest.mark.parametrize("sizes,aligned", [([11, 11], True), ([12, 11], True), ([8, 8, 7], True),
                                           ([8, 7, 6], False), ([7, 8], False)])
def test_ulysses_anything_mask_gather_alignment(sizes, aligned):
    """diffusers' ulysses_anything pads each rank's mask to the longest slice and trims the end of the gathered one:
    aligned with the keys only when no rank but the last is shorter; SAG refuses a mask otherwise."""
    from sag_fast import sharded

    assert sharded.mask_gather_aligned([sharded.RankSegments(0, n, 0, False) for n in sizes]) is aligned
    # what diffusers' gather does to a mask whose entries are the key positions, vs. the keys' gathered order
    masks = [torch.arange(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(len(sizes))]
    gathered = torch.cat([torch.nn.functional.pad(m, (0, max(sizes) - len(m)), value=-1) for m in masks])
    assert torch.equal(gathered[:sum(sizes)], torch.arange(sum(sizes))) is aligned


def test_sharded_key_bias_reads_per_key_masks_only():
    from sag_fast.capture import AttentionCapture

    capture = object.__new__(AttentionCapture)  # the method reads only the layer's name
    capture.layer_name = "transformer_blocks.1.attn"
    mask = torch.tensor([[True, False, True, True]])[:, None, None, :]
    bias = capture._sharded_key_bias(mask, 2, 4, slice(1, 2))
    assert torch.equal(bias, torch.tensor([[0.0, float("-inf"), 0.0, 0.0]]))
    with pytest.raises(RuntimeError, match=r"per-key attention masks \(B, 1, 1, Nk\); this one is \(1, 1, 4, 4\)"):
        capture._sharded_key_bias(torch.ones(1, 1, 4, 4, dtype=torch.bool), 1, 4, slice(None))


# ------------------------------------------------------------------------------------------ the refusals
# What enable_parallelism records (the real config objects; the checks read the degrees, the processors and the heads,
# not the device mesh, so no second process is needed to see them refused)
def _record_cp(model, **degrees):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
    model._parallel_config = config
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = config
    return config


def _flux(heads: int = 2):
    from diffusers import FluxTransformer2DModel
    from sag_fast.diffusers.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    if heads != 2:
        torch.manual_seed(0)
        pipe.register_modules(transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=3, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4)).eval())
    return pipe


def _call(pipe):
    g = torch.Generator().manual_seed(100)
    return pipe(prompt_embeds=torch.randn(1, 6, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                height=64, width=64, num_inference_steps=2, output_type="latent")


def test_ulysses_degree_that_does_not_divide_the_heads_is_refused():
    from sag_fast import enable_sag, sag_config

    pipe = _flux(heads=3)
    _record_cp(pipe.transformer, ulysses_degree=2)
    with pytest.raises(ValueError, match=r"3 heads, which ulysses_degree=2 does not divide.*ulysses_anything"):
        enable_sag(pipe)
    assert sag_config(pipe) is None
    pipe = _flux(heads=3)
    _record_cp(pipe.transformer, ulysses_degree=2, ulysses_anything=True)  # uneven heads: diffusers pads them
    enable_sag(pipe)


def test_sag_layer_without_the_models_parallel_config_is_refused_at_enable_and_at_the_first_call():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from sag_fast import enable_sag

    pipe = _flux()
    _record_cp(pipe.transformer, ring_degree=2)
    pipe.transformer.transformer_blocks[1].attn.set_processor(FluxAttnProcessor())  # set after enable_parallelism
    with pytest.raises(ValueError, match=r"'transformer_blocks.1.attn' \(FluxAttnProcessor\) has no parallel config"):
        enable_sag(pipe)
    pipe = _flux()
    enable_sag(pipe)
    _record_cp(pipe.transformer, ring_degree=2)  # CP switched on after enable_sag ...
    pipe.transformer.transformer_blocks[1].attn.set_processor(FluxAttnProcessor())
    steps = []
    with pytest.raises(ValueError, match="has no parallel config"):  # ... refused before the first step
        pipe(prompt_embeds=torch.zeros(1, 6, 32), pooled_prompt_embeds=torch.zeros(1, 32), height=64, width=64,
             num_inference_steps=2, output_type="latent", callback_on_step_end=lambda *a: steps.append(1) or {})
    assert not steps


@pytest.mark.parametrize("feature", ["unified", "compiled"])
def test_cp_with_a_feature_sag_cannot_make_exact_is_refused(feature):
    """Ring and Ulysses together (diffusers' unified attention): the forward op sees ring chunks of all-to-all'd
    sequences, not read by the sharded capture. A torch.compile'd model under CP: the reader runs outside graphs."""
    from sag_fast import enable_sag

    pipe = _flux()
    if feature == "unified":
        _record_cp(pipe.transformer, ring_degree=2, ulysses_degree=2)
        match = "ring and Ulysses together"
    else:
        _record_cp(pipe.transformer, ring_degree=2)
        pipe.transformer = torch.compile(pipe.transformer)
        match = "torch.compile'd model"
    with pytest.raises(ValueError, match=match):
        enable_sag(pipe)


def test_without_context_parallelism_the_dispatch_is_untouched():
    """The reader goes into diffusers' CP template only while a capture under CP exists, and comes out with it."""
    from diffusers.models import attention_dispatch
    from sag_fast import disable_sag, enable_sag, sharded

    original = attention_dispatch._templated_context_parallel_attention
    pipe = _flux()
    enable_sag(pipe)
    _call(pipe)
    assert attention_dispatch._templated_context_parallel_attention is original
    disable_sag(pipe)
    assert sharded._INSTALLED["count"] == 0


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("value,env,word", [
    ("ulysses=1", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "N >= 2"),
    ("tp=2", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "ulysses=N or ring=N"),
    ("ring=two", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "ulysses=N or ring=N"),
    ("ring=2", {}, "run under torchrun"),
    ("ulysses=2", {"WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "torchrun started 4 processes"),
])
def test_cli_context_parallel_argument_is_checked(tmp_path, monkeypatch, value, env, word):
    from sag_fast.__main__ import main

    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, v in env.items():
        monkeypatch.setenv(name, v)
    with pytest.raises(SystemExit) as err:
        main(["sample", "--model", str(tmp_path), "--context-parallel", value, "--output-dir", str(tmp_path)])
    assert "--context-parallel" in str(err.value) and word in str(err.value)


@pytest.mark.parametrize("extra,word", [
    (["--model", "builtin"], "is a UNet"), (["--model", "tiny-sd"], "is a UNet"),
    (["--device", "cuda:1"], "leave out --device"), (["--dtype", "fp32"], "cuDNN attention backend"),
    ([], "needs one CUDA GPU per process"),
])
def test_cli_context_parallel_refusals_before_loading(tmp_path, monkeypatch, extra, word):
    from sag_fast.__main__ import main

    if not extra and torch.cuda.is_available():
        pytest.skip("the CPU refusal: this machine has a GPU")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as err:
        main(["sample", "--model", str(tmp_path), *extra, "--context-parallel", "ring=2", "--output-dir",
              str(tmp_path)])
    assert word in str(err.value)
