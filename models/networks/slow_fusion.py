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

from models.networks.blocks import Decoder, PerInputEncoders, conv_bn_relu, restricted_softmax

HEALTHY = 0
"""The class outside the brain (classes: healthy, penumbra, core)."""


class SlowFusionNet(nn.Module):
    """``forward(maps [N, inputs, H, W], brain [N, 1, H, W], clinical [N, 2]) -> probabilities [N, 3, H, W]``.

    H and W must be multiples of ``size_multiple`` (2 ** number of levels).
    """

    def __init__(self, inputs: int = 5, widths: tuple[int, ...] = (8, 16, 32, 64), clinical: int = 2,
                 classes: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.inputs, self.widths, self.classes = inputs, tuple(widths), classes
        self.encoders = PerInputEncoders(inputs, self.widths)
        self.pool = nn.MaxPool2d(2)
        deepest = 2 * self.widths[-1]
        self.bottleneck = nn.Sequential(
            conv_bn_relu(inputs * self.widths[-1] + clinical, deepest), conv_bn_relu(deepest, deepest), nn.Dropout2d(dropout)
        )
        self.decoder = Decoder(deepest, self.widths, inputs, classes, conv_bn_relu)

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.widths)

    def logits(self, maps: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        skips = self.encoders(maps)
        x = self.pool(skips[-1])
        constant = torch.ones_like(x[:, :1])
        x = torch.cat([x, *(constant * clinical[:, k, None, None, None] for k in range(clinical.shape[1]))], dim=1)
        return self.decoder(self.bottleneck(x), skips)

    def forward(self, maps: torch.Tensor, brain: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return restricted_softmax(self.logits(maps, clinical), brain, HEALTHY)
