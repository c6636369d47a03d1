"""Seed 002 (Tomasetti et al.): multi-input slow fusion with skip connections, for CT perfusion
core and penumbra on 2D slices.

One small VGG-like encoder per input map (CBF, CBV, TTP, Tmax and the temporal MIP); at every
level the encoders' features are concatenated, and that concatenation is the skip connection of
one shared decoder (transpose convolution up, then convolution), so the inputs are fused slowly,
level by level. NIHSS and a flag saying whether it is known join at the bottleneck, as two
constant feature maps. Softmax over three classes (healthy, penumbra, core); outside the brain
mask the output is healthy with probability 1 (the paper's MIP-based mask, here the analysis's).

Differences from the paper, for CPU speed and a file of a few MB: encoders are trained from
scratch (no ImageNet VGG-16: the inputs are not photographs) with 4 levels of 8-64 channels and
batch normalisation, the decoder has one convolution per level.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """VGG-style: two 3x3 convolutions per level, max-pooling between levels."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        levels, previous = [], 1
        for width in widths:
            levels.append(nn.Sequential(_conv(previous, width), _conv(width, width)))
            previous = width
        self.levels = nn.ModuleList(levels)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, level in enumerate(self.levels):
            if index:
                x = self.pool(x)
            x = level(x)
            features.append(x)
        return features


class SlowFusionNet(nn.Module):
    """``forward(maps [N, inputs, H, W], brain [N, 1, H, W], clinical [N, 2]) -> probabilities [N, 3, H, W]``.

    H and W must be multiples of ``size_multiple`` (2 ** number of levels).
    """

    def __init__(self, inputs: int = 5, widths: tuple[int, ...] = (8, 16, 32, 64), clinical: int = 2,
                 classes: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.inputs, self.widths, self.classes = inputs, tuple(widths), classes
        self.encoders = nn.ModuleList(Encoder(self.widths) for _ in range(inputs))
        self.pool = nn.MaxPool2d(2)
        deepest = 2 * self.widths[-1]
        self.bottleneck = nn.Sequential(
            _conv(inputs * self.widths[-1] + clinical, deepest), _conv(deepest, deepest), nn.Dropout2d(dropout)
        )
        ups, fuse, previous = [], [], deepest
        for width in reversed(self.widths):
            ups.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            fuse.append(_conv(width + inputs * width, width))
            previous = width
        self.ups, self.fuse = nn.ModuleList(ups), nn.ModuleList(fuse)
        self.head = nn.Conv2d(self.widths[0], classes, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.widths)

    def logits(self, maps: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        per_input = [encoder(maps[:, i : i + 1]) for i, encoder in enumerate(self.encoders)]
        skips = [torch.cat([features[level] for features in per_input], dim=1) for level in range(len(self.widths))]
        x = self.pool(skips[-1])
        constant = torch.ones_like(x[:, :1])
        x = torch.cat([x, *(constant * clinical[:, k, None, None, None] for k in range(clinical.shape[1]))], dim=1)
        x = self.bottleneck(x)
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def forward(self, maps: torch.Tensor, brain: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.logits(maps, clinical), dim=1)
        healthy = torch.zeros_like(probabilities)
        healthy[:, 0] = 1.0
        return probabilities * brain + healthy * (1.0 - brain)
