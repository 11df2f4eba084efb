"""PrivImage's stages (none declared yet: a run of this recipe is refused with a message that says so)."""

from __future__ import annotations

from tckr.core.stage import StageRegistry

STAGES = StageRegistry()
