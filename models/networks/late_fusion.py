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

from models.networks.blocks import Decoder, PerInputEncoders, double_conv, restricted_softmax

BACKGROUND, HEALTHY, LESION = 0, 1, 2
"""Class order of the output."""


class LateFusionNet(nn.Module):
    """``forward(maps [N, inputs, H, W], brain [N, 1, H, W]) -> probabilities [N, 3, H, W]``
    (background, healthy, lesion). H and W must be multiples of ``size_multiple``."""

    def __init__(self, inputs: int = 5, widths: tuple[int, ...] = (8, 16, 32, 64), classes: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        self.inputs, self.widths, self.classes = inputs, tuple(widths), classes
        self.branches = PerInputEncoders(inputs, self.widths, dropout)
        self.pool = nn.MaxPool2d(2)
        deepest = 2 * self.widths[-1]
        self.fusion = nn.Sequential(double_conv(inputs * self.widths[-1], deepest), nn.Dropout2d(dropout))
        self.decoder = Decoder(deepest, self.widths, inputs, classes, double_conv)

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.widths)

    def logits(self, maps: torch.Tensor) -> torch.Tensor:
        skips = self.branches(maps)
        return self.decoder(self.fusion(self.pool(skips[-1])), skips)

    def forward(self, maps: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        return restricted_softmax(self.logits(maps), brain, BACKGROUND)
