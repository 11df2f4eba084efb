"""The benchmarks keep working (their figures are measured with `make bench`, not asserted here)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
STAGES = ["captioning", "generator_step", "lora_step", "generation", "teacher_epoch", "student_epoch", "shadows",
          "lira", "fid", "dp_sgd"]
FIELDS = ["stage", "items", "items_per_s", "peak_mb", "baseline", "baseline_items_per_s", "baseline_peak_mb", "ratio",
          "flops_per_item", "mfu"]
NO_MODEL = {"lira"}  # NumPy statistics: no model FLOPs for FlopCounterMode to count


def suite(*args: str) -> subprocess.CompletedProcess:
    """The suite at toy sizes on one thread: two threads on a machine whose other core is busy (a parallel test
    run) wait on each other at every small op and run many times slower."""
    return subprocess.run([sys.executable, str(BENCH / "suite.py"), "--quick", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600)


def test_suite_quick_measures_every_stage_against_its_baseline(tmp_path):
    out = tmp_path / "results.json"
    result = suite("--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert {"device", "cpu", "torch", "threads"} <= set(results)
    assert results["threads"] == 1 and results["cpu"]
    peaks = results["peak_gflops"]
    assert {"float32", "bfloat16"} <= set(peaks) and all(math.isfinite(v) and v > 0 for v in peaks.values())
    assert [entry["stage"] for entry in results["entries"]] == STAGES
    for entry in results["entries"]:
        name = entry["stage"]
        assert set(FIELDS) <= set(entry), name
        assert isinstance(entry["items"], str) and isinstance(entry["baseline"], str) and entry["baseline"], name
        numbers = {key: entry[key] for key in FIELDS[2:] if key not in ("baseline",)}
        assert all(isinstance(v, float) and math.isfinite(v) for v in numbers.values()), (name, numbers)
        assert entry["items_per_s"] > 0 and entry["baseline_items_per_s"] > 0, name
        assert math.isclose(entry["ratio"], entry["items_per_s"] / entry["baseline_items_per_s"]), name
        # Peak memory is growth over the measurement: at toy sizes a variant may touch no new page.
        assert entry["peak_mb"] >= 0 and entry["baseline_peak_mb"] >= 0, name
        if name in NO_MODEL:
            assert entry["flops_per_item"] == 0 and entry["mfu"] == 0, name
        else:
            assert entry["flops_per_item"] > 0 and entry["mfu"] > 0, name
    for name in STAGES:  # the printed table
        assert f"| {name} " in result.stdout
    assert "[10/10] dp_sgd" in result.stderr  # a progress line per entry


def test_suite_runs_only_the_stages_asked_for(tmp_path):
    out = tmp_path / "lira.json"
    result = suite("--only", "lira", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [entry["stage"] for entry in json.loads(out.read_text())["entries"]] == ["lira"]
    refused = suite("--only", "lira,nonsense", "--out", str(out))
    assert refused.returncode != 0 and "nonsense" in refused.stderr


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


def test_caption_benchmark_prints_the_bf16_speed_up_and_the_captions_it_changes():
    result = subprocess.run([sys.executable, str(BENCH / "bench_caption.py"), "--images", "8", "--batch-size", "4"],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "bf16 speed-up" in result.stdout and "same first category as float32" in result.stdout


def test_fid_benchmark_prints_the_bf16_speed_up_and_its_cost():
    result = subprocess.run([sys.executable, str(BENCH / "bench_fid.py"), "--images", "4", "--batch-size", "2"],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "bf16 speed-up" in result.stdout and "FID halves, bfloat16" in result.stdout


def test_text_encoder_benchmark_prints_the_bf16_speed_up_and_its_error():
    result = subprocess.run([sys.executable, str(BENCH / "bench_text_encoder.py"), "--images", "8", "--batch-size",
                             "4"], capture_output=True, text=True, timeout=300, check=True)
    assert "bf16 speed-up" in result.stdout and "relative error of bf16, stored in fp16" in result.stdout
    assert "lowest cosine similarity of a prompt" in result.stdout


def test_process_benchmark_prints_the_split_against_one_process():
    result = subprocess.run([sys.executable, str(BENCH / "bench_processes.py"), "--profile", "smoke", "--processes",
                             "2", "--shadows", "2", "--epochs", "1", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "2 process(es)" in result.stdout and "speed-up" in result.stdout and "same predicted class" in result.stdout


def test_the_readme_quotes_the_committed_results():
    """The figures in the README are the ones in bench/results.json: its table is what `suite.py --show` prints."""
    shown = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--show"], capture_output=True, text=True,
                           timeout=120, check=True).stdout
    assert "| captioning " in shown
    assert f"```\n{shown}```" in (BENCH.parent / "README.md").read_text()
    missing = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--show", "--out", str(BENCH / "none.json")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist: run the suite first" in missing.stderr
