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


def test_cpu_bf16_attention_takes_the_math_kernel_and_only_inside():
    """The fused CPU attention kernel trains slower in bf16 than fp32; autocast to bf16 on a CPU with grad enabled
    switches to the math one for its duration (same result to bf16 rounding); fp32 and sampling keep the fused one."""
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with autocast(CPU, torch.bfloat16):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        math = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with autocast(CPU, None):
        assert torch.backends.cuda.flash_sdp_enabled()
    with torch.no_grad(), autocast(CPU, torch.bfloat16):  # sampling
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    torch.testing.assert_close(math.float(), fused, atol=2e-2, rtol=2e-2)
