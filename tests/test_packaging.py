"""What the image installs (a regular, non-editable wheel) is the whole package: every module of src/tckr
and the profiles."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_the_wheel_holds_every_module_and_profile(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tckr-*.whl")
    packed = {name for name in zipfile.ZipFile(wheel).namelist() if not name.startswith("tckr-")}
    expected = {str(path.relative_to(REPO / "src")) for path in (REPO / "src" / "tckr").rglob("*.py")}
    expected |= {str(path.relative_to(REPO / "src")) for path in (REPO / "src" / "tckr").rglob("profiles/*.yaml")}
    assert expected - packed == set()
