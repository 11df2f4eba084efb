"""The exponential moving average of a model's weights that the diffusion trainers sample from."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA's decay after optimiser step ``step`` (from 0) with warm-up, as diffusers' ``EMAModel``:
    ``min(decay, (1 + step) / (10 + step))``. Without it an EMA of a model trained from scratch keeps
    ``decay ** steps`` of its random initialisation (at 0.999: 37 % after 1,000 steps, 61 % after 500)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move ``ema``'s weights towards ``model``'s trained ones by ``1 - decay``; buffers (batch-norm statistics)
    are copied. Frozen weights are left alone: the EMA began as the model's copy, so they are equal already."""
    for target, source in zip(ema.parameters(), model.parameters(), strict=True):
        if source.requires_grad:
            target.lerp_(source.detach(), 1.0 - decay)
    for target, source in zip(ema.buffers(), model.buffers(), strict=True):
        target.copy_(source)
