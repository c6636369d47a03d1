"""The building blocks the multi-input U-Nets share: convolution blocks and one encoder per input map.

Seed 001 (late fusion) and seed 002 (slow fusion) both give every input map its own encoder of
two 3x3 convolutions (each with batch normalisation and ReLU) per level, max-pooling between
levels; they differ in where the encoders' features meet (``late_fusion``, ``slow_fusion``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv_bn_relu(inputs: int, outputs: int) -> nn.Sequential:
    """3x3 convolution (no bias) + batch normalisation + ReLU."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


def double_conv(inputs: int, outputs: int) -> nn.Sequential:
    """Two ``conv_bn_relu`` blocks: one level of the encoders (VGG-style, the seeds' convolution block)."""
    return nn.Sequential(conv_bn_relu(inputs, outputs), conv_bn_relu(outputs, outputs))


class Encoder(nn.Module):
    """The encoder of one input map: its features at every level (finest first); ``dropout`` on the deepest."""

    def __init__(self, widths: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        levels, previous = [], 1
        for width in widths:
            levels.append(double_conv(previous, width))
            previous = width
        self.levels = nn.ModuleList(levels)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, level in enumerate(self.levels):
            if index:
                x = self.pool(x)
            x = level(x)
            features.append(self.dropout(x) if index == len(self.levels) - 1 else x)
        return features


class PerInputEncoders(nn.Module):
    """One ``Encoder`` per input map: ``forward(maps [N, inputs, H, W])`` gives, per level (finest
    first), the encoders' features of that level concatenated ``[N, inputs * width, ...]``."""

    def __init__(self, inputs: int, widths: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(Encoder(widths, dropout) for _ in range(inputs))

    def forward(self, maps: torch.Tensor) -> list[torch.Tensor]:
        per_input = [encoder(maps[:, i : i + 1]) for i, encoder in enumerate(self.encoders)]
        return [torch.cat(level, dim=1) for level in zip(*per_input)]


class Decoder(nn.Module):
    """One decoder over the per-level skips of ``PerInputEncoders``: at every level (deepest first) a
    2x2 transpose convolution up, concatenation with that level's skip, and ``block``; then a 1x1
    convolution to the classes' logits."""

    def __init__(self, deepest: int, widths: tuple[int, ...], inputs: int, classes: int,
                 block: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        ups, blocks, previous = [], [], deepest
        for width in reversed(widths):
            ups.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            blocks.append(block(width + inputs * width, width))
            previous = width
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def restricted_softmax(logits: torch.Tensor, brain: torch.Tensor, outside: int) -> torch.Tensor:
    """Class probabilities inside the brain (``brain`` ``[N, 1, H, W]`` 0/1); outside it class ``outside`` with probability 1."""
    probabilities = torch.softmax(logits, dim=1)
    fixed = torch.zeros_like(probabilities)
    fixed[:, outside] = 1.0
    return probabilities * brain + fixed * (1.0 - brain)
