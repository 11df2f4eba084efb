"""The weights' moving average: its warm-up, and which tensors it follows."""

import pytest
import torch
from torch import nn

from tckr.training.ema import ema_decay_at, update_ema

pytestmark = pytest.mark.unit


def test_ema_warm_up_forgets_the_random_initialisation():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(100_000, 0.999) == 0.999
    kept_with, kept_without = 1.0, 0.999 ** 500
    for step in range(500):
        kept_with *= ema_decay_at(step, 0.999)
    assert kept_without > 0.6 and kept_with < 1e-6  # share of the initial weights left in the EMA after 500 steps


def test_update_moves_trained_weights_copies_buffers_and_leaves_frozen_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema.load_state_dict(model.state_dict())
    model[1].requires_grad_(False)  # a frozen part (a LoRA base's weights)
    before = {name: tensor.clone() for name, tensor in ema.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # frozen ones too: the EMA must not follow them
        model[1].running_mean.fill_(5.0)
    update_ema(ema, model, decay=0.75)
    assert torch.allclose(ema[0].weight, before["0.weight"] + 0.25)
    assert torch.equal(ema[1].weight, before["1.weight"])
    assert torch.equal(ema[1].running_mean, torch.full((3,), 5.0))
