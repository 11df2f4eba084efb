"""KFP v2 components, one per declared stage (``tckr.core.stage``), installed as ``tckr.components``.

Nothing here is written per stage: :func:`component` turns a stage's declaration into a lightweight
component with a typed signature (its sections as parameters, its artifacts as ``Input``/``Output``)
whose body is one call to :func:`tckr.components.launcher.launch`, the launcher inside the image.

Components run in the slim CPU image; the pipeline moves the tasks that get a GPU to the CUDA image
(``docker/Dockerfile`` builds both, ``make images``). The tag lives here, in one place; set
``TCKR_IMAGE`` / ``TCKR_CUDA_IMAGE`` before compiling to use another registry or tag.
"""

import os
from importlib import metadata

IMAGE = os.environ.get("TCKR_IMAGE", f"ghcr.io/tckr/tckr:{metadata.version('tckr')}")
CUDA_IMAGE = os.environ.get("TCKR_CUDA_IMAGE", f"ghcr.io/tckr/tckr:{metadata.version('tckr')}-cuda")
