"""TCKR (arXiv 2504.04582): captions -> LoRA -> k x synthetic images -> a student distilled from a teacher,
both attacked with LiRA. Stages in :mod:`.stages`, settings in :mod:`.config`, profiles in ``profiles/``."""
