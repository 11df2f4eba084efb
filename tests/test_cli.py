"""The command line: one line and a non-zero exit code for every failure a user can fix; stage options come
from the stage's declaration."""

import inspect

import pytest

import tckr
from tckr.cli import main
from tckr.core.errors import ConfigError, TckrError

pytestmark = pytest.mark.unit


def _error_classes():
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(tckr.__path__, "tckr."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == info.name and issubclass(value, Exception):
                yield name, value


def test_every_error_of_ours_is_a_tckr_error():
    errors = dict(_error_classes())
    assert {"DatasetError", "CaptionError", "GenerationError", "GeneratorUnavailableError", "AttackError",
            "TrackingError", "PipelineFailed", "SubmitError", "ServiceError", "ObjectStoreError",
            "CheckpointMismatchError", "DeviceError"} <= set(errors)
    assert [name for name, error in errors.items() if not issubclass(error, TckrError)] == []


def test_a_typo_gets_the_nearest_setting_in_one_line(capsys):
    assert main(["config", "--profile", "smoke", "--set", "teacher.epohcs=3"]) == ConfigError.exit_code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "teacher.epohcs: unknown setting (did you mean 'epochs'?)" in error


def test_a_stage_failure_is_one_line_and_exit_1(tmp_path, capsys):
    code = main(["stage", "ingest", "--profile", "smoke", "--set", "ingest.source=disk", "--set",
                 f"ingest.name={tmp_path / 'missing'}", "--data", str(tmp_path / "data")])
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tckr:")]  # (MLflow logs too)
    assert code == 1 and ours == [f"tckr: no dataset saved at '{tmp_path / 'missing'}' (source: disk)"]


def test_stage_options_are_the_declared_ports(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["stage", "generate", "--profile", "smoke", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--data", "--captions", "--base-model", "--adapter", "--teacher-model", "--shards", "--synthetic"):
        assert option in help_text
    assert main(["stage", "generate", "--profile", "smoke", "--data", "d"]) == 2
    assert "tckr stage generate needs --captions --base-model --adapter --teacher-model --synthetic" in \
        capsys.readouterr().err


@pytest.mark.parametrize(("override", "message"), [
    ("privacy.target_epsilon=0", "privacy.target_epsilon: Input should be greater than 0"),
    ("privacy.delta=1", "privacy.delta: Input should be less than 1"),
    ("privacy.physical_batch_size=5000", "privacy.physical_batch_size 5000 > privacy.batch_size 100"),
])
def test_a_privacy_setting_that_cannot_hold_is_refused_before_the_run_starts(tmp_path, capsys, override, message):
    assert main(["run", "--profile", "smoke-privimage", "--set", override, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
