"""KFP v2 components, one per declared stage (``tckr.core.stage``), installed as ``tckr.components``.

Nothing here is written per stage: :func:`component` turns a stage's declaration into a lightweight
component with a typed signature (its sections as parameters, its artifacts as ``Input``/``Output``)
whose body is one call to :func:`tckr.components.launcher.launch`, the launcher inside the image.

Components run in the slim CPU image; the pipeline moves the tasks that get a GPU to the CUDA image
(``docker/Dockerfile`` builds both, ``make images``). Their tags are decided here, in one place, by content:
``<version>-<digest>``, the digest a SHA-256 over everything the image is built from, so changed code is a tag
no node has cached (``imagePullPolicy: IfNotPresent`` would keep running the old code under a version tag) and
an unchanged tree is the same tag on every machine. ``kubernetes.image`` / ``kubernetes.cuda_image`` (``tckr
compile --image``) point a pipeline at other tags, e.g. another registry's.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

REPOSITORY = "ghcr.io/tckr/tckr"
CHECKOUT = Path(__file__).resolve().parents[3]
IMAGE_INPUTS = ("docker/Dockerfile", "pyproject.toml", "requirements.lock", "requirements-weights.txt", "src/tckr")
"""What the image is built from, relative to a source checkout. Left out: the README (copied into the build only
for the package's metadata) and the compiled pipelines beside their source (they name the images: a digest over
them would change with itself)."""
IMAGE_ENV = ("TCKR_IMAGE", "TCKR_CUDA_IMAGE")
"""Set in the image to its own tags (build arguments), so a pipeline compiled inside it names it."""


class Images(NamedTuple):
    cpu: str
    cuda: str


def _image_files(root: Path) -> list[Path]:
    files = []
    for name in IMAGE_INPUTS:
        path = root / name
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [p for p in files if "__pycache__" not in p.parts and not p.name.endswith("_pipeline.yaml")]


def source_digest(root: Path = CHECKOUT) -> str:
    """SHA-256 over the image's inputs in the checkout at ``root``: each file's path and bytes, in path order."""
    digest = hashlib.sha256()
    for path in _image_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def default_images(root: Path = CHECKOUT, repository: str = REPOSITORY) -> Images:
    """This code's images: the tags baked into the image when running inside it; from a source checkout,
    ``<version>-<digest>``; an installed release (no checkout) is its version, which names released content."""
    baked = [os.environ.get(name) for name in IMAGE_ENV]
    if all(baked):
        return Images(*baked)
    version = metadata.version("tckr")
    if (root / "docker" / "Dockerfile").is_file():
        version = f"{version}-{source_digest(root)[:12]}"
    return Images(f"{repository}:{version}", f"{repository}:{version}-cuda")
