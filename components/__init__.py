"""KFP v2 components: thin typed wrappers over ``tckr.stages`` (installed as ``tckr.components``).

Components run in the slim CPU image, pinned to the package version; the pipeline moves the tasks
that get a GPU to the CUDA image (``docker/Dockerfile`` builds both, ``make images``). Set
``TCKR_IMAGE`` / ``TCKR_CUDA_IMAGE`` before compiling to use another registry or tag.
"""

import os
from importlib import metadata

IMAGE = os.environ.get("TCKR_IMAGE", f"ghcr.io/tckr/tckr:{metadata.version('tckr')}")
CUDA_IMAGE = os.environ.get("TCKR_CUDA_IMAGE", f"ghcr.io/tckr/tckr:{metadata.version('tckr')}-cuda")
