"""The mixed-precision rule: fp16 on CUDA, bf16 on CPUs that compute it natively, fp32 otherwise or when off."""

from __future__ import annotations

import pytest
import torch

from tckr.core import precision
from tckr.core.precision import autocast, autocast_dtype, loss_scaler, precision_name

pytestmark = pytest.mark.unit

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_dtype_follows_the_device_and_the_switch(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: native_bf16)
    assert autocast_dtype(CPU, True) == (torch.bfloat16 if native_bf16 else None)
    assert autocast_dtype(CUDA, True) == torch.float16
    assert autocast_dtype(CPU, False) is None and autocast_dtype(CUDA, False) is None


def test_only_fp16_is_loss_scaled_and_every_dtype_has_a_name():
    assert loss_scaler(CPU, torch.float16).is_enabled()
    assert not loss_scaler(CPU, torch.bfloat16).is_enabled() and not loss_scaler(CPU, None).is_enabled()
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["float32", "bfloat16", "float16"]


def test_autocast_runs_matmuls_in_the_dtype_or_leaves_them_alone():
    a = torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (a @ a).dtype == torch.float32
