"""Mixed precision: one rule, for every trainer and sampler, for the dtype a device computes in.

A ``mixed_precision`` setting (the classifiers' ``amp``, the generators' and DP-SGD's ``mixed_precision``) means
"where the device has a fast low-precision path": fp16 autocast with loss scaling on CUDA, bf16 autocast on CPUs
that compute in bf16 natively (AVX512-BF16 or AMX, through oneDNN), fp32 elsewhere (emulated bf16 is slower than
fp32). Weights, optimiser state and losses stay fp32 either way. The resolved dtype depends on the machine, so
checkpoints, caches and shadow models record it (:func:`precision_name`) and are not mixed across it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (oneDNN's own test)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's bf16 probe
        return False


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for ``device`` when mixed precision is ``enabled``; ``None``: fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_computes_bf16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (``None``: disabled). When training in bf16 on a CPU, attention takes
    PyTorch's math kernel: the fused CPU one's backward runs bf16 slower than fp32 (a text UNet's training step
    1.32 s against 0.85 s with the math kernel and 1.10 s in fp32; bench/suite.py ``generator_step`` 0.80x ->
    1.3-1.5x against fp32 across runs, bench/results.json). Sampling (no grad) keeps the fused kernel, within noise
    of the math one there."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None))
        if device.type == "cpu" and dtype == torch.bfloat16 and torch.is_grad_enabled():
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def loss_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, which fp16 gradients need and bf16 ones (fp32's exponent range) do not."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def precision_name(dtype: torch.dtype | None) -> str:
    """``float32``, ``bfloat16`` or ``float16``: what a run computed in, for its records."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")
