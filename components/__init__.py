"""KFP v2 components: thin typed wrappers over ``tckr.stages`` (installed as ``tckr.components``).

Every component runs in the project image, pinned to the package version; set ``TCKR_IMAGE``
before compiling to use another registry or tag.
"""

import os
from importlib import metadata

IMAGE = os.environ.get("TCKR_IMAGE", f"ghcr.io/tckr/tckr:{metadata.version('tckr')}")
