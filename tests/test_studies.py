"""The demo's studies under bench/: stages re-run as DVC declares them, the trade-off and scaling arithmetic, and
the cluster cost's pod and FLOP counts (their figures are measured by `make tradeoff` / `make scaling`)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import cluster  # noqa: E402
import scaling  # noqa: E402
import stages  # noqa: E402
import tradeoff  # noqa: E402

from tckr.recipes.config import load_config  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "src" / "tckr" / "recipes" / "tckr" / "profiles" / "smoke.yaml"


def test_a_point_runs_the_stage_dvc_declares_on_its_own_outputs_and_the_inputs_for_the_rest(tmp_path):
    point = stages.Point("p", ("generator", "finetune", "generate"), (("generator.steps", 250),))
    inputs, folder, profile = tmp_path / "in", tmp_path / "work" / "p", tmp_path / "profile.yaml"
    command = point.command("finetune", inputs, folder, profile)
    assert command[0] == str(Path(sys.executable).parent / "tckr") and command[1:3] == ["stage", "finetune"]
    options = dict(zip(command[3::2], command[4::2], strict=False))
    assert options["--profile"] == str(profile)
    assert options["--data"] == str(inputs / "data") and options["--captions"] == str(inputs / "captions")
    assert options["--base-model"] == str(folder / "outputs" / "generator")  # remade by this point's first stage
    assert options["--adapter"] == str(folder / "outputs" / "adapter")
    assert options["--metrics"] == str(folder / "metrics" / "finetune.json")
    assert command[-2:] == ["--set", "generator.steps=250"]
    for stage in stages.DVC:  # every declared stage resolves: no path left relative to the repository
        words = stages.Point("q", (stage,), ()).command(stage, inputs, folder, profile)
        assert not [w for w in words if w.startswith(("outputs/", "metrics/")) or w == "params.yaml"], stage


def test_an_input_model_logged_elsewhere_is_read_through_a_mirror_without_its_logged_model(tmp_path):
    teacher = tmp_path / "in" / "teacher"
    teacher.mkdir(parents=True)
    for name in ("model.safetensors", "model.json", "logged_model.json"):
        (teacher / name).write_text(name)
    point = stages.Point("p", ("attack",), ())
    command = point.command("attack", tmp_path / "in", tmp_path / "work" / "p", tmp_path / "profile.yaml")
    mirror = Path(dict(zip(command[3::2], command[4::2], strict=False))["--teacher-model"])
    assert mirror == tmp_path / "work" / "p" / "inputs" / "teacher"
    assert sorted(entry.name for entry in mirror.iterdir()) == ["model.json", "model.safetensors"]
    assert (mirror / "model.json").read_text() == "model.json"
    assert point.command("attack", tmp_path / "in", tmp_path / "work" / "p", tmp_path / "profile.yaml") == command


def test_a_point_is_run_once_and_read_back_after(tmp_path, monkeypatch):
    point = stages.Point("ingest=smoke", ("ingest",), (("ingest.train_limit", 1200),))
    first = point.run(tmp_path / "unused", tmp_path, SMOKE)
    assert first["metrics"]["data.train_images"] > 0 and first["seconds"]["ingest"] > 0
    assert (tmp_path / "ingest=smoke" / "outputs" / "data" / "dataset.json").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert point.run(tmp_path / "unused", tmp_path, SMOKE) == first


def test_a_failing_stage_stops_the_study_and_leaves_no_metrics(tmp_path):
    point = stages.Point("bad", ("ingest",), (("ingest.train_limit", -1),))
    with pytest.raises(subprocess.CalledProcessError):
        point.run(tmp_path / "unused", tmp_path, SMOKE)
    assert not (tmp_path / "bad" / "metrics" / "ingest.json").exists()


def test_tradeoff_figures_times_and_the_fitted_default():
    attack = next(k for k in tradeoff.KNOBS if k.key == "attack.shadows")
    metrics = {"teacher.mia.auc": 0.53, "student.mia.auc": 0.51, "delta.mia.auc_ci_low": -0.03,
               "delta.mia.auc_ci_high": -0.01}
    assert tradeoff.figure(attack, metrics, {}) == pytest.approx(
        {"figure": 0.02, "ci_low": 0.01, "ci_high": 0.03, "teacher_auc": 0.53, "student_auc": 0.51})
    student = next(k for k in tradeoff.KNOBS if k.key == "student.epochs")
    assert tradeoff.figure(student, {"student.test_accuracy": 0.8}, {"teacher.test_accuracy": 0.9})["figure"] == \
        pytest.approx(0.8 / 0.9)
    # Agreement measured on 640 samples: the generation stage's time is scaled to the demo's 5,000 images.
    steps = next(k for k in tradeoff.KNOBS if k.key == "generate.steps")
    run = {"seconds": {"generate": 40.0}, "metrics": {"synthetic.images_per_second": 20.0, "synthetic.images": 640}}
    assert tradeoff.stage_seconds(steps, run, 5000) == pytest.approx(40 + 4360 / 20)
    # A knob upstream of the figure counts only its own stage.
    generator = next(k for k in tradeoff.KNOBS if k.key == "generator.steps")
    chain = {"seconds": {"generator": 190.0, "finetune": 90.0, "generate": 40.0}, "metrics": run["metrics"]}
    assert tradeoff.stage_seconds(generator, chain, 5000) == 190.0
    # The demo's own ratio is not re-run: its figure is the finished demo's, its time on the measured points' line.
    ratio = next(k for k in tradeoff.KNOBS if k.key == "generate.ratio")
    measured = [{"setting": 0.125, "seconds": 120.0}, {"setting": 0.25, "seconds": 220.0}]
    committed = {}
    for name in ("teacher", "student"):
        committed.update(json.loads((stages.ROOT / "metrics" / f"{name}.json").read_text()))
    default = tradeoff.from_demo(ratio, 0.5, measured, committed)
    assert default["seconds"] == pytest.approx(420.0) and default["demo_default"]
    assert default["figure"] == pytest.approx(committed["student.test_accuracy"] / committed["teacher.test_accuracy"])


def png(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_tradeoff_table_and_plot(tmp_path, capsys):
    results = {"teacher.epochs": {"figure": "teacher.test_accuracy", "bar": 0.86, "points": [
        {"setting": 4, "demo_default": False, "seconds": 47.0, "figure": 0.845},
        {"setting": 8, "demo_default": True, "seconds": 48.5, "figure": 0.879}]},
        "attack.shadows": {"figure": "teacher_minus_student_auc", "bar": 0.0, "points": [
            {"setting": 2, "demo_default": False, "seconds": 180.0, "figure": 0.01, "ci_low": -0.002,
             "ci_high": 0.02}]}}
    tradeoff.print_table(results)
    table = capsys.readouterr().out.splitlines()
    assert "missed" in table[2] and "held" in table[3] and "8*" in table[3] and "held" in table[4]
    tradeoff.plot(results, tmp_path / "tradeoff.png")
    assert png(tmp_path / "tradeoff.png")[0] > 0


def test_scaling_exponent_is_the_log_log_slope_and_is_plotted(tmp_path):
    rows = [{"size": s, "seconds": 3 * s ** 0.8, "stage_seconds": {"teacher": 2 * s, "attack": 5.0}}
            for s in (1000, 2000, 4000)]
    assert scaling.exponents(rows, ("teacher", "attack")) == {"total": 0.8, "teacher": 1.0, "attack": 0.0}
    results = {"private": {"key": "ingest.train_limit", "size": "data.train_images", "stages": ["teacher", "attack"],
                           "points": rows, "exponent": scaling.exponents(rows, ("teacher", "attack"))}}
    scaling.plot(results, tmp_path / "scaling.png")
    assert png(tmp_path / "scaling.png")[0] > 0


def test_cluster_pods_expand_both_fan_outs_of_the_compiled_pipeline():
    cfg = load_config("paper-cifar10")
    counts = cluster.pods(cfg, 475_000)
    assert counts["generate-shard"] == 464  # 475,000 images in shards of 1,024
    assert counts["shadow-group"] == 2  # 16 shadows, 8 per group
    assert {"ingest", "teacher", "student", "attack", "report"} <= set(counts)
    assert sum(counts.values()) == 464 + 2 + len(counts) - 2


def test_cluster_flops_match_published_counts():
    # timm's MobileNetV3-Large at 224 px: 0.22 GMACs, 5.5M parameters (its model card).
    counts = cluster.classifier_flops("mobilenetv3_large_100", 1000, 224)
    assert counts["forward"] == pytest.approx(2 * 0.217e9, rel=0.05)
    assert counts["train"] == 3 * counts["forward"]


def test_shadow_draws_summarise_the_spread_that_one_interval_does_not_cover():
    import shadow_draws

    def metrics(teacher: float, student: float) -> dict:
        found = {}
        for target in shadow_draws.TARGETS:
            for attack in shadow_draws.ATTACKS:
                value = {"teacher": teacher, "student": student}.get(target, 0.5)
                found |= {f"{target}.{attack}.auc": value, f"{target}.{attack}.auc_ci_low": value - 0.01,
                          f"{target}.{attack}.auc_ci_high": value + 0.01}
        for attack in shadow_draws.ATTACKS:
            found |= {f"delta.{attack}.auc_ci_low": student - teacher - 0.02,
                      f"delta.{attack}.auc_ci_high": student - teacher + 0.02}
        return found

    draws = [{"figures": shadow_draws.figures(metrics(teacher, 0.50))} for teacher in (0.51, 0.54, 0.525)]
    assert draws[1]["figures"]["delta.mia.auc"]["value"] == pytest.approx(-0.04)
    summary = shadow_draws.summarise(draws)
    teacher = summary["teacher.mia.auc"]
    assert teacher["mean"] == pytest.approx(0.525) and teacher["sd"] == pytest.approx(0.015)
    assert (teacher["min"], teacher["max"]) == pytest.approx((0.51, 0.54))
    assert teacher["interval_width"] == pytest.approx(0.02)
    assert teacher["intervals_holding_mean"] == 1  # 0.525 lies in [0.515, 0.535] only
    assert summary["student.rmia.auc"]["sd"] == 0
