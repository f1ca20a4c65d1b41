"""Backbones for few-shot learning.

Every backbone here is safe under ``torch.func.vmap`` with second-order gradients. Native ``nn.BatchNorm2d`` is not:
its second-order meta-gradient under vmap is silently wrong (see DESIGN.md), so normalization is
:class:`BatchStatNorm`, written with plain tensor ops. It always normalizes with the statistics of the batch it sees,
in training and in evaluation, as the reference MAML did: evaluation is *transductive* (a task's query set is
normalized with its own statistics), so always evaluate whole query sets.

A backbone built with ``out_features`` ends in a linear layer named ``head`` (the part ANIL adapts); without it, it
returns embeddings (what metric methods use).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BatchStatNorm(nn.Module):
    """Normalization over every dimension but the channel one (dim 1), with batch statistics and an affine map.

    Equivalent to ``nn.BatchNorm{1,2}d(track_running_stats=False)`` but with exact higher-order gradients under
    ``vmap``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def conv_block(in_channels: int, out_channels: int, pool: str) -> nn.Sequential:
    """3x3 conv, batch-statistics norm, ReLU, then 2x2 max-pool (``pool="max"``) or stride 2 (``pool="stride"``)."""
    if pool not in ("max", "stride"):
        raise ValueError(f"pool must be 'max' or 'stride', got {pool!r}")
    stride = 2 if pool == "stride" else 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        BatchStatNorm(out_channels),
        nn.ReLU(),
    ]
    if pool == "max":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """The four-block CNN of Vinyals et al. / Finn et al.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet / CIFAR).
        hidden: filters per block (64 for Omniglot, 32 for MAML's mini-ImageNet).
        out_features: classes of the linear ``head``; ``None`` returns embeddings instead.
        pool: ``"max"`` (3x3 conv + 2x2 max-pool) or ``"stride"`` (stride-2 convs without pooling, Finn et al.'s
            Omniglot network).
        image_size: input height/width, to size the head.
        embedding: ``"flatten"`` the last feature map, or ``"mean"`` over its spatial positions (Finn et al. average
            for Omniglot).
        blocks: number of conv blocks (4).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: int | None = 5,
        pool: str = "max",
        image_size: int = 28,
        embedding: str = "flatten",
        blocks: int = 4,
    ) -> None:
        super().__init__()
        if embedding not in ("flatten", "mean"):
            raise ValueError(f"embedding must be 'flatten' or 'mean', got {embedding!r}")
        self.in_channels, self.image_size, self.embedding = in_channels, image_size, embedding
        self.features = nn.Sequential(
            *(conv_block(in_channels if i == 0 else hidden, hidden, pool) for i in range(blocks))
        )
        size = image_size
        for _ in range(blocks):
            size = math.ceil(size / 2) if pool == "stride" else size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {blocks} downsampling blocks")
        self.embedding_dim = hidden if embedding == "mean" else hidden * size * size
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None

    def embed(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return h.mean(dim=(2, 3)) if self.embedding == "mean" else h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.head(z) if self.head is not None else z


class SinusoidMLP(nn.Module):
    """Finn et al.'s regression network: ``in -> 40 -> 40 -> out`` with ReLU."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], out_features)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
