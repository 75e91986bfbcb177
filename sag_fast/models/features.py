"""The feature network of the quality benchmark: a small CNN trained on the shapes data (scripts/train_features.py).

FID/KID need a feature space in which the data's structure is what counts; Inception (ImageNet, 299x299) would
need a download and says little about 32x32 synthetic shapes. This network learns, from the same generator as the
built-in model's data, the shape, colour and size of the largest object and how many objects there are; its
penultimate 128-d layer is the feature space. Weights ship in sag_fast/models/features/ (safetensors, with the
held-out accuracies in metrics.json).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

FEATURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "features")
NUM_FEATURES = 128
HEADS = {"shape": 5, "colour": 8, "count": 2, "size": 1}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class FeatureNet(nn.Module):
    """images (B, 3, 32, 32) in [-1, 1] -> features (B, 128); `heads(features)` gives the training targets' logits.

    `num_features` is what torchmetrics' FID/KID read to size their buffers."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_block(3, 32), nn.AvgPool2d(2), _block(32, 64), nn.AvgPool2d(2),
                                  _block(64, 128), nn.AvgPool2d(2))         # 4x4x128
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, NUM_FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(NUM_FEATURES, n) for k, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"FeatureNet takes (B, 3, 32, 32) images in [-1, 1], got {tuple(images.shape)}")
        return self.fc(self.body(images.float()))

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self(images)
        return {k: head(f) for k, head in self.heads.items()}


def load_feature_net(path: str = FEATURES_DIR) -> FeatureNet:
    """The trained FeatureNet, in eval mode, weights frozen."""
    from safetensors.torch import load_file

    weights = os.path.join(path, "feature_net.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no feature network weights at {weights}: run scripts/train_features.py")
    net = FeatureNet()
    net.load_state_dict(load_file(weights))
    return net.eval().requires_grad_(False)


def feature_metrics(path: str = FEATURES_DIR) -> dict:
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)
