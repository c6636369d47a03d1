"""Seed 000's image module: one per map. Each three consecutive slices form a 3-channel image; a
small CNN encodes each triplet, a 2-layer LSTM reads the triplets from the bottom of the stack to
the top, and a linear layer gives the logit of P(mRS 3-6).

The paper encodes triplets with an ImageNet CNN (VGG, ResNet...); nothing pretrained can be
fetched here, so the CNN is three strided convolutions (8-16-32 channels) trained from scratch.
"""

from __future__ import annotations

import torch
from torch import nn


class CnnLstmModule(nn.Module):
    """[B, T, 3, H, W] slice triplets of one map -> [B] logit."""

    def __init__(self, features: int = 32, hidden: int = 32) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, 2, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]

        self.encoder = nn.Sequential(*block(3, 8), *block(8, 16), *block(16, features))
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, triplets: torch.Tensor) -> torch.Tensor:
        b, t = triplets.shape[0], triplets.shape[1]
        encoded = self.encoder(triplets.flatten(0, 1)).mean(dim=(2, 3)).reshape(b, t, -1)
        sequence, _ = self.lstm(encoded)
        return self.head(sequence[:, -1])[:, 0]
