"""The benchmarks keep working (their figures are measured with `make bench`, not asserted here)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_generation_benchmark_prints_a_ratio():
    result = subprocess.run([sys.executable, str(BENCH / "bench_generation.py"), "--profile", "smoke",
                             "--images", "6", "--steps", "2", "--batch-size", "4"],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "naive per-prompt loop" in result.stdout
    assert "speed-up" in result.stdout


def test_shadow_benchmark_prints_ratios():
    result = subprocess.run([sys.executable, str(BENCH / "bench_shadows.py"), "--profile", "smoke",
                             "--shadows", "2", "--population", "256", "--epochs", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "one at a time" in result.stdout and "stack, vmap speed-up" in result.stdout
