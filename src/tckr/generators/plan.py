"""The generation plan: which image, of which class, from which prompt and noise seed, in which shard. A pure
function of (captions, private train size, config), kept apart from the sampler (no torch), so the pipeline's
planning tasks that fan the shards out start in a second."""

from __future__ import annotations

from dataclasses import dataclass

from tckr.core.errors import TckrError
from tckr.generators.config import GenerateConfig


class GenerationError(TckrError, ValueError):
    """The inputs cannot make a generation plan, or the shards do not make a complete set."""


@dataclass(frozen=True)
class PlannedImage:
    index: int
    label: int
    class_name: str
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:07d}.png"


def image_seed(base_seed: int, index: int) -> int:
    """A distinct 64-bit noise seed per image, stable across shardings and batch sizes."""
    return (base_seed << 32) + index


def plan_generation(captions_by_class: dict[str, list[str]], classes: list[str], num_private: int,
                    cfg: GenerateConfig) -> list[PlannedImage]:
    """``ratio x num_private`` images, ``N // K`` per class, prompts cycling each class's captions."""
    if not captions_by_class:
        raise GenerationError("the caption file is empty: caption the private train split first")
    missing = [name for name in classes if not captions_by_class.get(name)]
    if missing:
        raise GenerationError(f"classes with no captions to prompt with: {missing}")
    per_class = int(round(cfg.ratio * num_private)) // len(classes)
    if per_class < 1:
        raise GenerationError(f"ratio {cfg.ratio} x {num_private} private images is less than one image per "
                              f"class ({len(classes)} classes): raise generate.ratio")
    plan = []
    for index in range(per_class * len(classes)):
        label, turn = index % len(classes), index // len(classes)
        name = classes[label]
        prompts = captions_by_class[name]
        plan.append(PlannedImage(index, label, name, prompts[turn % len(prompts)], image_seed(cfg.seed, index)))
    return plan


def shard_ranges(total: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]
