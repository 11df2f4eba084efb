"""Stage 5: k x synthetic generation, balanced per class, seeded per image, in resumable shards.

The plan is a pure function of (captions, private train size, config): image ``i`` has class
``i mod K``, cycles through that class's captions, and starts from noise seeded by ``(seed, i)``.
Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``; it is written to a temporary
directory and renamed into place with its ``manifest.jsonl`` last, so a shard is either complete or
absent. A killed run therefore resumes by skipping complete shards and produces exactly the same
set; shards are independent, so pods can produce them in parallel (KFP ParallelFor).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from tckr.core import distributed
from tckr.core.atomic import copy_tree
from tckr.core.errors import TckrError
from tckr.core.progress import progress
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


def shard_dir(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / "shards" / f"shard-{shard:05d}"


def is_complete(out_dir: Path, shard: int) -> bool:
    return (shard_dir(out_dir, shard) / "manifest.jsonl").is_file()


def _read_manifest(out_dir: Path, shard: int) -> list[dict]:
    with open(shard_dir(out_dir, shard) / "manifest.jsonl") as handle:
        return [json.loads(line) for line in handle]


def _planned(entry: dict) -> tuple:
    """What makes an image the one its plan asked for (a manifest row, or ``asdict`` of a PlannedImage)."""
    return entry["index"], entry["label"], entry["prompt"], entry["seed"]


def made_for(out_dir: Path, shard: int, items: list[PlannedImage]) -> bool:
    """Whether the shard is complete and holds exactly these planned images, not ones a previous plan
    (another seed, ratio or caption set) left in a persisted output directory."""
    if not is_complete(out_dir, shard):
        return False
    return [_planned(row) for row in _read_manifest(out_dir, shard)] == [_planned(asdict(item)) for item in items]


@torch.no_grad()
class ImageGenerator(Protocol):
    """What generation needs of a loaded generator, whatever its kind (pixel UNet or Stable Diffusion)."""

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 ``[B, H, W, C]``; image ``i`` depends only on ``(prompts[i], seeds[i])``, not on its batch."""
        ...


def generate_shards(generator: ImageGenerator, plan: list[PlannedImage], out_dir: Path, cfg: GenerateConfig,
                    shards: list[int] | None = None) -> list[int]:
    """Produce the given shards (default: every incomplete one); returns the shards written now.

    On several ranks (:mod:`tckr.core.distributed`) rank ``r`` of ``n`` samples batches ``r, r + n, ...`` of
    every shard (the same batches one process would sample, so the same images), and rank 0 alone
    prepares, describes and publishes each shard around the others' writes.
    """
    rank, ranks = distributed.rank(), distributed.world_size()
    lead = rank == 0
    ranges = shard_ranges(len(plan), cfg.shard_size)
    wanted = range(len(ranges)) if shards is None else shards
    # The same list on every rank: no shard can be published before all ranks reach its first barrier.
    todo = [s for s in wanted if not made_for(out_dir, s, [plan[i] for i in ranges[s]])]
    batches = {s: [ranges[s][start:start + cfg.batch_size]
                   for start in range(0, len(ranges[s]), cfg.batch_size)][rank::ranks] for s in todo}
    bar = progress(total=sum(len(b) for s in todo for b in batches[s]), desc="generate", unit="img",
                   disable=not lead)
    for shard in todo:
        final = shard_dir(out_dir, shard)
        partial = final.with_name(final.name + ".partial")
        if lead:
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed run are redone, never trusted
            partial.mkdir(parents=True)
        distributed.barrier()  # the empty shard directory exists
        started = time.perf_counter()
        for batch in batches[shard]:
            items = [plan[i] for i in batch]
            pixels = generator.sample([item.prompt for item in items], [item.seed for item in items], cfg.steps,
                                      cfg.guidance)
            for item, array in zip(items, pixels, strict=True):
                Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(partial / item.file_name)
            bar.update(len(items))
        distributed.barrier()  # every rank's images are in place
        if not lead:
            continue
        items = [plan[i] for i in ranges[shard]]
        # Device-seconds, the compute the shard took: every rank was busy for (about) its wall time.
        seconds = (time.perf_counter() - started) * ranks
        (partial / "shard.json").write_text(json.dumps({"images": len(items), "seconds": seconds}) + "\n")
        with open(partial / "manifest.jsonl", "w") as handle:
            for item in items:
                handle.write(json.dumps(asdict(item) | {"file": f"{final.name}/{item.file_name}"}) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a shard of another plan
        partial.replace(final)
    bar.close()
    return todo


def gather_shards(sources: list[Path], out_dir: Path) -> list[int]:
    """Move complete shards produced elsewhere (one directory per fan-out task) into ``out_dir``."""
    gathered = []
    for source in sources:
        for shard in sorted((Path(source) / "shards").glob("shard-?????")):
            number = int(shard.name.removeprefix("shard-"))
            if (shard / "manifest.jsonl").is_file() and not is_complete(out_dir, number):
                copy_tree(shard, shard_dir(out_dir, number))
                gathered.append(number)
    return sorted(gathered)


def finalize(out_dir: Path, plan: list[PlannedImage], cfg: GenerateConfig) -> dict:
    """Check the shards form the planned set exactly, then write ``manifest.jsonl`` + ``synthetic.json``."""
    out_dir = Path(out_dir)
    ranges = shard_ranges(len(plan), cfg.shard_size)
    for leftover in (out_dir / "shards").glob("shard-?????"):  # beyond this plan: a previous, larger one
        if int(leftover.name.removeprefix("shard-")) >= len(ranges):
            shutil.rmtree(leftover)
    incomplete = [s for s in range(len(ranges)) if not is_complete(out_dir, s)]
    if incomplete:
        raise GenerationError(f"{len(incomplete)} of {len(ranges)} shards are missing or incomplete "
                              f"(first: {incomplete[0]}): run the generate stage again to finish them")
    rows = []
    seconds = 0.0  # compute spent on the shards, wherever (and however in parallel) they were made
    for shard in range(len(ranges)):
        rows += _read_manifest(out_dir, shard)
        seconds += json.loads((shard_dir(out_dir, shard) / "shard.json").read_text())["seconds"]
    indices = [row["index"] for row in rows]
    if indices != list(range(len(plan))):
        raise GenerationError("shard manifests do not cover the plan exactly once (gap or duplicate)")
    for row, item in zip(rows, plan, strict=True):
        if _planned(row) != _planned(asdict(item)):
            raise GenerationError(f"image {item.index} was generated for another plan: delete {out_dir} and rerun")
    with open(out_dir / "manifest.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    summary = {"images": len(rows), "shards": len(ranges), "per_class": len(rows) // len({r["label"] for r in rows}),
               "ratio": cfg.ratio, "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
               "generation_seconds": seconds}
    (out_dir / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_synthetic(out_dir: Path, classes: list[str]):
    """The synthetic set as a ``datasets.Dataset`` (``image``, ``label``), like a prepared split."""
    import datasets

    out_dir = Path(out_dir)
    with open(out_dir / "manifest.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict(
        {"image": [str(out_dir / "shards" / row["file"]) for row in rows], "label": [row["label"] for row in rows]},
        features=features)


def sample_grid(out_dir: Path, classes: list[str], per_class: int = 10, scale: int = 3) -> Path:
    """``samples.png``: one row per class, the first ``per_class`` synthetic images of each."""
    out_dir = Path(out_dir)
    with open(out_dir / "manifest.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    picked = {label: [r for r in rows if r["label"] == label][:per_class] for label in range(len(classes))}
    first = Image.open(out_dir / "shards" / rows[0]["file"])
    width, height = first.size
    grid = Image.new(first.mode, (width * per_class, height * len(classes)))
    for label, chosen in picked.items():
        for column, row in enumerate(chosen):
            grid.paste(Image.open(out_dir / "shards" / row["file"]), (column * width, label * height))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    path = out_dir / "samples.png"
    grid.save(path)
    return path
