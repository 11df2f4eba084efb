"""How the suite measures: throughput timed against a baseline in turns, peak memory growth, model FLOPs counted by
torch's FlopCounterMode, and the machine's dense matmul peak from a probe."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import synchronize
from torch.utils.flop_counter import FlopCounterMode

MB = 2**20


# ----------------------------------------------------------------------------------------------- memory
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _high_water_mark() -> int | None:
    """The kernel's peak RSS of this process since its last reset (``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The peak memory growth of a block, in MB (``mb`` after it ends).

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the start. CPU: the peak resident set
    above the one at the start, from ``/proc/self/statm`` polled every ``interval`` seconds and the kernel's
    high-water mark (``VmHWM``, reset at the start where ``/proc/self/clear_refs`` allows). Freed heap memory is
    handed back first (``malloc_trim``), so memory the allocator kept from earlier work is counted again when this
    block touches it: growth, not what happened to be resident already.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.mb = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.hwm = _reset_high_water_mark()
        self.start = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / MB
            return
        self.stop.set()
        self.thread.join()
        peak = max(self.peak, _rss())
        if self.hwm:
            peak = max(peak, _high_water_mark() or 0)
        self.mb = max(peak - self.start, 0) / MB


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Rate:
    items_per_s: float
    peak_mb: float
    seconds: float
    items: int
    calls: int


def measure(variants: dict[str, Callable[[], int]], seconds: float, device: torch.device,
            rounds: int = 2) -> dict[str, Rate]:
    """Each variant (a call returning the items it processed) timed for about ``seconds``, in ``rounds`` turns
    that alternate between the variants (a shared machine's speed drifts; turns spread the drift over both).
    A turn repeats its variant's call until ``seconds / rounds`` have passed (at least once)."""
    totals = {name: [0.0, 0, 0, 0.0] for name in variants}  # seconds, items, calls, peak MB
    for _ in range(rounds):
        for name, call in variants.items():
            total = totals[name]
            with PeakMemory(device) as memory:
                synchronize(device)
                started = time.perf_counter()
                spent = 0.0
                while True:
                    total[1] += call()
                    total[2] += 1
                    synchronize(device)
                    spent = time.perf_counter() - started
                    if spent >= seconds / rounds:
                        break
            total[0] += spent
            total[3] = max(total[3], memory.mb)
    return {name: Rate(items / spent, peak, spent, items, calls)
            for name, (spent, items, calls, peak) in totals.items()}


def count_flops(call: Callable[[], int]) -> float:
    """Model FLOPs per item of ``call`` (one batch; returns its item count), as FlopCounterMode counts them:
    matmuls, convolutions and attention, forward and (if the call runs one) backward."""
    with FlopCounterMode(display=False) as counter:
        items = call()
    return counter.get_total_flops() / items


# ------------------------------------------------------------------------------------------- peak probe
def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], seconds: float) -> dict[int, float]:
    """Dense square matmul throughput (FLOP/s, ``2 n^3`` per product) at each size: the best is the machine's
    practical peak in ``dtype``."""
    rates = {}
    for n in sizes:
        generator = torch.Generator(device=device).manual_seed(n)
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: kernels, their workspace
        synchronize(device)
        started, products = time.perf_counter(), 0
        while True:
            torch.mm(a, b, out=out)
            products += 1
            synchronize(device)
            spent = time.perf_counter() - started
            if spent >= seconds:
                break
        rates[n] = 2 * n**3 * products / spent
    return rates


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
