"""Trains the built-in model (sag_fast/models/builtin): an unconditional DDPM UNet2DModel on seeded shapes, on CPU.

Seeded and resumable: the batch, noise and timesteps of step k are functions of k alone (shapes.batch_for_step and
a generator seeded with SEED + k), so a run resumed from the checkpoint of step k continues exactly as an
uninterrupted one would. Checkpoints every --ckpt-every seconds to --work (model, EMA, optimizer, step); the loss
of every step goes to <work>/loss.csv. At the end the EMA weights are written as a diffusers model folder to --out.
Never run by `make test` or CI.

The shipped weights (sag_fast/models/builtin) are the EMA at step 7400, trained in three runs on a shared 2-core
CPU (one thread each). Steps 0-2008: the first run (2800-step schedule, cut at 2009 for time; steps 0-383 ran
under a 4500-step schedule). Steps 2009-3399: a continuation from that run's export (optimizer fresh, warm-up
restarted, the batches continuing the training stream), whose schedule was shortened twice while it ran to end
annealed within the session (steps 2009-2659 under --steps 14000, 2660-2785 under --steps 3900, the rest under
--steps 3400). Steps 3400-7399: a third run from the step-3400 export, lr 2e-4 (steps 3400-4472 under --steps
9400, the rest under --steps 7400, shortened to end annealed within the session). The learning rate of every
step is in the loss log, docs/builtin_training_loss.csv (its `run` column: 1, 2, 3):

    python scripts/train_builtin.py --work /tmp/sag_train --out sag_fast/models/builtin            # first run
    python scripts/train_builtin.py --work /tmp/sag_train2 --init <step-2009 export> --init-step 2009 \
        --steps 3400 --lr 3e-4 --out sag_fast/models/builtin
    python scripts/train_builtin.py --work /tmp/sag_train3 --init <step-3400 export> --init-step 3400 \
        --steps 7400 --lr 2e-4
    python scripts/train_builtin.py --work /tmp/sag_train3 --out sag_fast/models/builtin --export-only

The class-conditional model (sag_fast/models/builtin_cond) is a fine-tune of the step-7400 export with a class
embedding (the largest object's shape, 5 classes, plus a null class for classifier-free guidance, 15% of labels
dropped to it), steps 7400-8899, its loss log docs/builtin_cond_training_loss.csv (an earlier fine-tune of the
step-2009 export, steps 2009-3399, was the shipped one before; class accuracy at CFG 3: 36% then, 38% now):

    python scripts/train_builtin.py --work /tmp/sag_cond --init sag_fast/models/builtin --init-step 7400 \
        --steps 8900 --lr 3e-4 --classes 5 --class-lr-mult 30
    python scripts/train_builtin.py --work /tmp/sag_cond --classes 5 --out sag_fast/models/builtin_cond --export-only

To train further, start a new run from the shipped export with --init sag_fast/models/builtin --init-step 7400
and a longer --steps (or resume the work folder, where it still exists).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sag_fast.models.shapes import TRAIN_SEED, batch_for_step, generate  # noqa: E402

SEED = 20260101


def build_unet(width: int = 32, classes: int = 0):
    """classes > 0: class-conditional, with classes + 1 class embeddings (the last one is the null class, used
    for the unconditional half of classifier-free guidance)."""
    from diffusers import UNet2DModel

    # Self-attention at 16x16 and 8x8 (two resolutions, as SAG's mask is taken from a middle-block
    # or decoder attention map), one head per 32 channels.
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8,
        num_class_embeds=classes + 1 if classes else None,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True)


def lr_at(step: int, steps: int, lr: float, warmup: int = 200, first: int = 0) -> float:
    """Linear warm-up over [first, first + warmup), then cosine down to lr / 10 at `steps`."""
    k = step - first
    if k < warmup:
        return lr * (k + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - first - warmup))))


def training_info(work: str, step: int, elapsed: float, a) -> dict:
    """What training.json (beside an exported model) records: the step reached, time, and the loss around it."""
    losses = []
    path = os.path.join(work, "loss.csv")
    if os.path.exists(path):
        with open(path) as f:
            losses = [(int(r[0]), float(r[1])) for r in list(csv.reader(f))[1:] if int(r[0]) < step]
    tail = [v for k, v in losses if k >= step - 200]
    return {"step": step, "trained_s": round(elapsed, 1), "batch": a.batch, "lr": a.lr, "schedule_steps": a.steps,
            "init": a.init, "init_step": a.init_step, "classes": a.classes,
            "loss_mean_last_200_steps": round(sum(tail) / len(tail), 5) if tail else None,
            "script": "scripts/train_builtin.py"}


def _write_info(out: str, info: dict | None) -> None:
    if info is not None:
        with open(os.path.join(out, "training.json"), "w") as f:
            json.dump(info, f, indent=1)


def export_conditional(ema, scheduler, out: str, classes: int, info: dict | None = None) -> None:
    """<out>/unet (a class-conditional UNet2DModel, fp16), <out>/scheduler (DDIM, same betas) and <out>/labels.json
    (the class names and the null class's index)."""
    from diffusers import DDIMScheduler

    from sag_fast.models.shapes import SHAPES

    copy.deepcopy(ema).half().save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    DDIMScheduler.from_config(scheduler.config).save_pretrained(os.path.join(out, "scheduler"))
    with open(os.path.join(out, "labels.json"), "w") as f:
        json.dump({"label": "shape of the largest object", "classes": list(SHAPES[:classes]),
                   "null_class": classes}, f, indent=1)
    _write_info(out, info)


def export(ema, scheduler, out: str, fp16: bool = True, info: dict | None = None) -> None:
    """A DDPMPipeline folder with the EMA weights and a DDIM scheduler (same betas): the pipeline's default
    sampler is then a fast deterministic one (20 steps are enough), and DDIMPipeline loads it as it is."""
    from diffusers import DDIMScheduler, DDPMPipeline

    unet = copy.deepcopy(ema)
    if fp16:
        unet = unet.half()  # halves the package size; loaders upcast to float32
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config)).save_pretrained(
        out, safe_serialization=True)
    _write_info(out, info)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--work", default="/tmp/sag_train")
    p.add_argument("--out", default=None, help="diffusers folder for the EMA weights (default: none)")
    p.add_argument("--ckpt-every", type=float, default=180.0, help="seconds between checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-only", type=int, default=0, help="time this many steps and exit")
    p.add_argument("--export-only", action="store_true", help="write --out from the last checkpoint's EMA and exit")
    p.add_argument("--init", default=None, help="start a new run from this diffusers model folder (its unet/ "
                   "weights become both the model and the EMA; the optimizer starts fresh)")
    p.add_argument("--init-step", type=int, default=0, help="with --init: the global step the run starts at, so "
                   "its batches continue the training stream after the run that made --init, and the warm-up "
                   "restarts there")
    p.add_argument("--classes", type=int, default=0, help="train a class-conditional model on the shape of the "
                   "largest object (5 shapes; 0: unconditional). With --init from the unconditional model, the "
                   "class embedding starts at zero, i.e. the unconditional model")
    p.add_argument("--p-uncond", type=float, default=0.15, help="with --classes: fraction of labels replaced by "
                   "the null class (classifier-free guidance training)")
    p.add_argument("--class-lr-mult", type=float, default=10.0, help="with --classes: the class embedding's "
                   "learning rate as a multiple of --lr")
    a = p.parse_args(argv)
    from sag_fast.models.shapes import SHAPES

    if not 0 <= a.classes <= len(SHAPES):
        p.error(f"--classes must be 0 (unconditional) or 1..{len(SHAPES)}, got {a.classes}")
    if not 0.0 <= a.p_uncond < 1.0:
        p.error(f"--p-uncond must be in [0, 1), got {a.p_uncond}")
    if a.init_step and not a.init:
        p.error("--init-step needs --init")
    if a.init_step >= a.steps:
        p.error(f"--init-step {a.init_step} must be below --steps {a.steps}")
    if a.export_only:
        state = torch.load(os.path.join(a.work, "ckpt.pt"), weights_only=False)
        ema = build_unet(a.width, a.classes)
        ema.load_state_dict(state["ema"])
        with open(os.path.join(a.work, "config.json")) as f:  # the run's own settings, not this command's
            run = argparse.Namespace(**{**vars(a), **{k: v for k, v in json.load(f).items() if k in vars(a)}})
        info = training_info(a.work, state["step"], state["elapsed"], run)
        if a.classes:
            export_conditional(ema, build_scheduler(), a.out, a.classes, info=info)
        else:
            export(ema, build_scheduler(), a.out, info=info)
        print(f"wrote {a.out} from the checkpoint of step {state['step']}", flush=True)
        return

    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)
    os.makedirs(a.work, exist_ok=True)
    unet = build_unet(a.width, a.classes)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = build_scheduler()
    # the class embedding of a conditional fine-tune starts at zero: a larger learning rate lets it catch up
    emb = [p for n, p in unet.named_parameters() if n.startswith("class_embedding.")]
    rest = [p for n, p in unet.named_parameters() if not n.startswith("class_embedding.")]
    opt = torch.optim.AdamW([{"params": rest, "mult": 1.0}] + ([{"params": emb, "mult": a.class_lr_mult}] if emb else []),
                            lr=a.lr, weight_decay=0.0)
    ckpt = os.path.join(a.work, "ckpt.pt")
    start, elapsed = 0, 0.0
    if a.init and not os.path.exists(ckpt):
        from diffusers import UNet2DModel

        init = UNet2DModel.from_pretrained(a.init, subfolder="unet").float().state_dict()
        if a.classes and "class_embedding.weight" not in init:  # conditional from the unconditional model
            init["class_embedding.weight"] = torch.zeros_like(unet.class_embedding.weight)
        unet.load_state_dict(init)
        ema.load_state_dict(init)
        start = a.init_step
        print(f"initialised from {a.init} at step {start}", flush=True)
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if len(opt.param_groups) > 1:  # this command's --class-lr-mult, not the checkpoint's
            opt.param_groups[1]["mult"] = a.class_lr_mult
        start, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {start} ({elapsed:.0f} s trained)", flush=True)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"params {n_params}  steps {a.steps}  batch {a.batch}", flush=True)
    with open(os.path.join(a.work, "config.json"), "w") as f:
        json.dump({**vars(a), "params": n_params, "seed": SEED}, f, indent=1)

    log_path = os.path.join(a.work, "loss.csv")
    if start == 0 or not os.path.exists(log_path):
        with open(log_path, "w") as f:
            f.write("step,loss,lr,elapsed_s\n")
    else:  # drop rows logged after the checkpoint: they are re-run
        with open(log_path) as f:
            rows = [r for r in csv.reader(f)]
        with open(log_path, "w") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) < start])
    log = open(log_path, "a")
    alphas = sched.alphas_cumprod
    t0, last_ckpt = time.time(), time.time()
    unet.train()
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(SEED + step)
        if a.classes:
            x0, labels, _ = generate(a.batch, TRAIN_SEED + step, with_labels=True)  # the same images as below
            labels = labels.clamp(max=a.classes - 1)
        else:
            x0, labels = batch_for_step(step, a.batch), None
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,), generator=g)
        if a.classes:  # drawn after noise and t, so the unconditional stream of a step is unchanged
            labels = torch.where(torch.rand(a.batch, generator=g) < a.p_uncond, a.classes, labels)
        ab = alphas[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
        lr = lr_at(step, a.steps, a.lr, first=a.init_step)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("mult", 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))  # short warm-up so the early EMA is not the random init
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        now = time.time()
        log.write(f"{step},{loss.item():.5f},{lr:.6f},{elapsed + now - t0:.1f}\n")
        if a.time_only and step + 1 - start >= a.time_only:
            print(f"{(now - t0) / a.time_only:.3f} s/step", flush=True)
            return
        if step % 100 == 0:
            log.flush()
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {elapsed + now - t0:.0f}s", flush=True)
        if now - last_ckpt > a.ckpt_every or step + 1 == a.steps:
            tmp = ckpt + ".tmp"
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "step": step + 1, "elapsed": elapsed + now - t0}, tmp)
            os.replace(tmp, ckpt)  # atomic: a crash mid-save keeps the previous checkpoint
            log.flush()
            last_ckpt = now
    log.close()
    if a.out:
        info = training_info(a.work, a.steps, elapsed + time.time() - t0, a)
        if a.classes:
            export_conditional(ema, sched, a.out, a.classes, info=info)
        else:
            export(ema, sched, a.out, info=info)
        print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
