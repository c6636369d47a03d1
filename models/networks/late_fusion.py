"""Seed 001 (reperfusion-status-specific CNNs, HIBISCUS-STROKE): a late-fusion U-Net predicting the final infarct
from baseline maps, one network per reperfusion scenario.

One encoder branch per input map (MRI: DWI, ADC, Tmax, CBF, CBV), each of convolution blocks
(3x3 convolution + batch normalisation, twice) with max-pooling between them and dropout at the
deepest levels; the branches meet only at the bottleneck, where their deepest features are
concatenated (late fusion) and fused by one convolution block. One decoder (transpose
convolution up, concatenation with the branches' features of that level, one convolution block)
gives three classes: background, healthy, lesion (softmax). Outside the brain mask the output is
background with probability 1. The final infarct is lesion probability >= 0.5.

Differences from the paper, for CPU speed and a file of a few MB: 4 levels of 4-32 channels per
branch (the paper: 5 levels, 8-128) and 2D slices of any size that is a multiple of 16.
"""

from __future__ import annotations

import torch
from torch import nn

BACKGROUND, HEALTHY, LESION = 0, 1, 2
"""Class order of the output."""


def _block(inputs: int, outputs: int) -> nn.Sequential:
    """The seed's convolution block: (3x3 convolution + batch normalisation + ReLU) twice."""
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
    )


class Branch(nn.Module):
    """The encoder of one input map: its features at every level (finest first)."""

    def __init__(self, widths: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        levels, previous = [], 1
        for width in widths:
            levels.append(_block(previous, width))
            previous = width
        self.levels = nn.ModuleList(levels)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, level in enumerate(self.levels):
            if index:
                x = self.pool(x)
            x = level(x)
            features.append(self.dropout(x) if index == len(self.levels) - 1 else x)
        return features


class LateFusionNet(nn.Module):
    """``forward(maps [N, inputs, H, W], brain [N, 1, H, W]) -> probabilities [N, 3, H, W]``
    (background, healthy, lesion). H and W must be multiples of ``size_multiple``."""

    def __init__(self, inputs: int = 5, widths: tuple[int, ...] = (8, 16, 32, 64), classes: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        self.inputs, self.widths, self.classes = inputs, tuple(widths), classes
        self.branches = nn.ModuleList(Branch(self.widths, dropout) for _ in range(inputs))
        self.pool = nn.MaxPool2d(2)
        deepest = 2 * self.widths[-1]
        self.fusion = nn.Sequential(_block(inputs * self.widths[-1], deepest), nn.Dropout2d(dropout))
        ups, decode, previous = [], [], deepest
        for width in reversed(self.widths):
            ups.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            decode.append(_block(width + inputs * width, width))
            previous = width
        self.ups, self.decode = nn.ModuleList(ups), nn.ModuleList(decode)
        self.head = nn.Conv2d(self.widths[0], classes, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.widths)

    def logits(self, maps: torch.Tensor) -> torch.Tensor:
        per_input = [branch(maps[:, i : i + 1]) for i, branch in enumerate(self.branches)]
        skips = [torch.cat([features[level] for features in per_input], dim=1) for level in range(len(self.widths))]
        x = self.fusion(self.pool(skips[-1]))
        for up, decode, skip in zip(self.ups, self.decode, reversed(skips)):
            x = decode(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def forward(self, maps: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.logits(maps), dim=1)
        background = torch.zeros_like(probabilities)
        background[:, BACKGROUND] = 1.0
        return probabilities * brain + background * (1.0 - brain)
