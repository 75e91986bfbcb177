"""Trains the quality benchmark's feature network (sag_fast/models/features.py) on the shapes data, seeded.

Targets of the largest object: shape (5 classes), colour (8), size (regression) and the number of objects (1-2).
Training batches come from seeds FEATURE_SEED + step, disjoint from the diffusion model's training stream and
from the held-out benchmark set; accuracy is measured on a separate seeded set and written to metrics.json.
A few minutes on one CPU thread; never run by `make test`.

    python scripts/train_features.py --out sag_fast/models/features
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sag_fast.models import shapes  # noqa: E402
from sag_fast.models.features import FeatureNet  # noqa: E402

FEATURE_SEED = 3_000_000
EVAL_SEED = 4_000_000


def batch(seed: int, n: int):
    x, shape, colour, radius, count = shapes.generate(n, seed, with_labels=True, all_labels=True)
    return x, {"shape": shape, "colour": colour, "size": radius, "count": count}


def loss_and_acc(net, x, y):
    out = net.predict(x)
    loss = (F.cross_entropy(out["shape"], y["shape"]) + F.cross_entropy(out["colour"], y["colour"])
            + F.cross_entropy(out["count"], y["count"]) + F.mse_loss(out["size"].squeeze(1), y["size"]))
    acc = {k: (out[k].argmax(1) == y[k]).float().mean().item() for k in ("shape", "colour", "count")}
    acc["size_mae_px"] = (out["size"].squeeze(1) - y["size"]).abs().mean().item() * 32
    return loss, acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default="sag_fast/models/features")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps)
    t0 = time.time()
    for step in range(a.steps):
        x, y = batch(FEATURE_SEED + step, a.batch)
        loss, acc = loss_and_acc(net, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {acc} {time.time() - t0:.0f}s", flush=True)
    net.eval()
    with torch.no_grad():
        accs = [loss_and_acc(net, *batch(EVAL_SEED + i, 500))[1] for i in range(4)]
    metrics = {k: sum(a_[k] for a_ in accs) / len(accs) for k in accs[0]}
    metrics.update(eval_images=2000, train_steps=a.steps, batch=a.batch, train_s=round(time.time() - t0, 1),
                   params=sum(p.numel() for p in net.parameters()))
    print(metrics)
    from safetensors.torch import save_file

    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(a.out, "feature_net.safetensors"))
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
