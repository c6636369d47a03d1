"""Seed 004's deep-learning branch: a small 2.5D residual network, slab of slices -> P(mRS 3-6).

The paper fine-tunes an ImageNet ResNet101; nothing pretrained can be fetched here and the
training set is a few hundred synthetic patients, so this is a ResNet of four residual blocks
(16-32-64-64 channels, ~0.2 M parameters) trained from scratch. Output: the logit (the deep score).
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs),
        )
        self.skip = nn.Identity() if inputs == outputs and stride == 1 else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class OutcomeResNet25D(nn.Module):
    """[B, channels, 64, 64] -> [B] deep score (logit of P(mRS 3-6))."""

    def __init__(self, channels: int, widths: tuple[int, ...] = (16, 32, 64, 64), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        previous = widths[0]
        for width in widths:
            layers.append(ResidualBlock(previous, width, 2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, 1))

    def forward(self, slab: torch.Tensor) -> torch.Tensor:
        pooled = self.features(slab).mean(dim=(2, 3))
        return self.head(pooled)[:, 0]
