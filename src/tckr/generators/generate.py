"""Stage 5: k x synthetic generation, balanced per class, seeded per image, in resumable shards.

The plan (:mod:`tckr.generators.plan`) is a pure function of (captions, private train size, config): image ``i``
has class ``i mod K``, cycles through that class's captions, and starts from noise seeded by ``(seed, i)``.
Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)`` as one Arrow file (``datasets``' own format,
so the trainer memory-maps it: one object per shard in a KFP artifact store or a DVC remote, not one per image;
a tar or Parquet shard would need a decode or a copy before random access). It is packed beside its final name and
renamed into place, so a shard is either complete or absent. A killed run therefore resumes by skipping complete
shards and produces exactly the same set; shards are independent, so pods can produce them in parallel (KFP
ParallelFor). A shard records what made it (:func:`sampler_key`: the generator's weights and the sampling settings),
so a persisted directory's shards of an earlier generator are made again, never reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from tckr.core import distributed
from tckr.core.atomic import atomic_path, write_text
from tckr.core.precision import autocast, autocast_dtype, precision_name
from tckr.core.progress import progress
from tckr.generators.config import GenerateConfig
from tckr.generators.plan import GenerationError, PlannedImage, shard_ranges

SHARD_METADATA = b"tckr.shard"  # the shard's summary (images, seconds, made_by), in its Arrow schema's metadata
PACK_ROWS = 256  # images per Arrow record batch: bounds the memory packing takes


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / "shards" / f"shard-{shard:05d}.arrow"


def _shard_features():
    """A shard's columns, as ``datasets`` reads them: the PNG bytes under the ``Image`` feature, then the plan."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                              "index": datasets.Value("int64"), "class_name": datasets.Value("string"),
                              "prompt": datasets.Value("string"), "seed": datasets.Value("uint64")})


def sampler_key(cfg: GenerateConfig, model_dirs: list[Path]) -> str:
    """What decides a shard's images besides its plan rows: every file of the directories the generator is loaded
    from (base model and adapter; read once per task, a few seconds for Stable Diffusion's weights) and the sampling
    settings. ``dvc repro`` keeps the synthetic directory so that a killed run resumes: with a new adapter, or other
    steps or guidance, its shards are an earlier generator's."""
    digest = hashlib.sha256(json.dumps({"steps": cfg.steps, "guidance": cfg.guidance,
                                        "mixed_precision": cfg.mixed_precision}, sort_keys=True).encode())
    for directory in model_dirs:
        for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
            digest.update(path.relative_to(directory).as_posix().encode())
            with path.open("rb") as stream:
                while chunk := stream.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def _summary(reader: pa.ipc.RecordBatchStreamReader) -> dict:
    return json.loads(reader.schema.metadata[SHARD_METADATA])


def _shard_summary(path: Path) -> dict:
    """A shard's summary, from its schema alone."""
    with pa.memory_map(str(path)) as source:
        return _summary(pa.ipc.open_stream(source))


def _read_shard(out_dir: Path, shard: int) -> tuple[dict, list[dict]]:
    """A complete shard's summary (images, seconds, made_by) and its plan rows, without reading the images."""
    with pa.memory_map(str(shard_path(out_dir, shard))) as source:
        reader = pa.ipc.open_stream(source)
        return _summary(reader), reader.read_all().drop_columns(["image"]).to_pylist()


def _planned(entry: dict) -> tuple:
    """What makes an image the one its plan asked for (a manifest row, or ``asdict`` of a PlannedImage)."""
    return entry["index"], entry["label"], entry["prompt"], entry["seed"]


def made_for(out_dir: Path, shard: int, items: list[PlannedImage], made_by: str) -> bool:
    """Whether the shard is complete and holds exactly these planned images made by the sampler ``made_by``
    (:func:`sampler_key`), not ones a previous plan (another seed, ratio or caption set) or generator left in a
    persisted output directory."""
    if not shard_path(out_dir, shard).is_file():
        return False
    summary, rows = _read_shard(out_dir, shard)
    return summary.get("made_by") == made_by and [_planned(row) for row in rows] == [_planned(asdict(i)) for i in items]


def _pack(staging: Path, items: list[PlannedImage], target: Path, summary: dict) -> None:
    """Write the shard's staged PNGs, in plan order, as one Arrow file (the format ``datasets`` memory-maps)."""
    schema = _shard_features().arrow_schema
    schema = schema.with_metadata(schema.metadata | {SHARD_METADATA: json.dumps(summary).encode()})
    with atomic_path(target) as partial, pa.OSFile(str(partial), "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(items), PACK_ROWS):
            chunk = items[start:start + PACK_ROWS]
            columns = {"image": [{"bytes": (staging / item.file_name).read_bytes(), "path": item.file_name}
                                 for item in chunk]}
            columns |= {name: [getattr(item, name) for item in chunk]
                        for name in ("label", "index", "class_name", "prompt", "seed")}
            writer.write_batch(pa.record_batch(columns, schema=schema))


class ImageGenerator(Protocol):
    """What generation needs of a loaded generator, whatever its kind (pixel UNet or Stable Diffusion)."""

    @property
    def device(self) -> torch.device: ...

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 ``[B, H, W, C]``; image ``i`` depends only on ``(prompts[i], seeds[i])``, not on its batch."""
        ...


def generate_shards(generator: ImageGenerator, plan: list[PlannedImage], out_dir: Path, cfg: GenerateConfig,
                    made_by: str, shards: list[int] | None = None) -> list[int]:
    """Produce the given shards (default: every one not complete and made by ``made_by``, the generator's
    :func:`sampler_key`); returns the shards written now.

    On several ranks (:mod:`tckr.core.distributed`) rank ``r`` of ``n`` samples batches ``r, r + n, ...`` of
    every shard (the same batches one process would sample, so the same images) into a staging folder, and
    rank 0 alone packs and publishes each shard once every rank's images are there.
    """
    rank, ranks = distributed.rank(), distributed.world_size()
    lead = rank == 0
    ranges = shard_ranges(len(plan), cfg.shard_size)
    wanted = range(len(ranges)) if shards is None else shards
    # The same list on every rank: no shard can be published before all ranks reach its first barrier.
    todo = [s for s in wanted if not made_for(out_dir, s, [plan[i] for i in ranges[s]], made_by)]
    batches = {s: [ranges[s][start:start + cfg.batch_size]
                   for start in range(0, len(ranges[s]), cfg.batch_size)][rank::ranks] for s in todo}
    bar = progress(total=sum(len(b) for s in todo for b in batches[s]), desc="generate", unit="img",
                   disable=not lead)
    dtype = autocast_dtype(generator.device, cfg.mixed_precision)
    for shard in todo:
        final = shard_path(out_dir, shard)
        staging = final.with_name(final.stem + ".staging")
        if lead:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run are redone, never trusted
            staging.mkdir(parents=True)
        distributed.barrier()  # the empty staging folder exists
        started = time.perf_counter()
        for batch in batches[shard]:
            items = [plan[i] for i in batch]
            with torch.no_grad(), autocast(generator.device, dtype):
                pixels = generator.sample([item.prompt for item in items], [item.seed for item in items], cfg.steps,
                                          cfg.guidance)
            for item, array in zip(items, pixels, strict=True):
                Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(staging / item.file_name)
            bar.update(len(items))
        distributed.barrier()  # every rank's images are in place
        if not lead:
            continue
        items = [plan[i] for i in ranges[shard]]
        # Device-seconds, the compute the shard took: every rank was busy for (about) its wall time.
        _pack(staging, items, final, {"images": len(items), "seconds": (time.perf_counter() - started) * ranks,
                                      "precision": precision_name(dtype), "made_by": made_by})
        shutil.rmtree(staging)
    bar.close()
    return todo


def gather_shards(sources: list[Path], out_dir: Path) -> list[int]:
    """Copy complete shards produced elsewhere (one folder per fan-out task) into ``out_dir``, in place of any shard
    there that another sampler made."""
    gathered = []
    for source in sources:
        for shard in sorted((Path(source) / "shards").glob("shard-?????.arrow")):
            number = int(shard.stem.removeprefix("shard-"))
            target = shard_path(out_dir, number)
            if not target.is_file() or _shard_summary(target).get("made_by") != _shard_summary(shard).get("made_by"):
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as partial:
                    shutil.copyfile(shard, partial)
                gathered.append(number)
    return sorted(gathered)


def finalize(out_dir: Path, plan: list[PlannedImage], cfg: GenerateConfig) -> dict:
    """Check the shards form the planned set exactly, then write ``manifest.jsonl`` + ``synthetic.json``."""
    out_dir = Path(out_dir)
    ranges = shard_ranges(len(plan), cfg.shard_size)
    for leftover in (out_dir / "shards").glob("shard-?????.*"):  # beyond this plan (a larger one), or staged
        if leftover.suffix != ".arrow" or int(leftover.stem.removeprefix("shard-")) >= len(ranges):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    incomplete = [s for s in range(len(ranges)) if not shard_path(out_dir, s).is_file()]
    if incomplete:
        raise GenerationError(f"{len(incomplete)} of {len(ranges)} shards are missing or incomplete "
                              f"(first: {incomplete[0]}): run the generate stage again to finish them")
    rows = []
    seconds = 0.0  # compute spent on the shards, wherever (and however in parallel) they were made
    for shard in range(len(ranges)):
        summary, planned = _read_shard(out_dir, shard)
        rows += [row | {"shard": shard_path(out_dir, shard).name, "row": number} for number, row in enumerate(planned)]
        seconds += summary["seconds"]
    indices = [row["index"] for row in rows]
    if indices != list(range(len(plan))):
        raise GenerationError("shard manifests do not cover the plan exactly once (gap or duplicate)")
    for row, item in zip(rows, plan, strict=True):
        if _planned(row) != _planned(asdict(item)):
            raise GenerationError(f"image {item.index} was generated for another plan: delete {out_dir} and rerun")
    write_text(out_dir / "manifest.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    summary = {"images": len(rows), "shards": len(ranges), "per_class": len(rows) // len({r["label"] for r in rows}),
               "ratio": cfg.ratio, "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
               "generation_seconds": seconds}
    write_text(out_dir / "synthetic.json", json.dumps(summary, indent=2) + "\n")
    return summary


def load_synthetic(out_dir: Path, classes: list[str]):
    """The synthetic set as a ``datasets.Dataset`` (``image``, ``label``), like a prepared split: its shards
    memory-mapped, so a paper-scale set is read from disk as it is used, never copied. The set is an input (a KFP
    artifact, a DVC output) that nothing may write into: the labels get their class names as a schema change only
    (``cast_column`` would copy every shard into a cache file beside it), and ``datasets``' caching is turned off,
    so later transforms (a train/test split's indices) write to a temporary folder instead."""
    import datasets

    datasets.disable_caching()
    count = json.loads((Path(out_dir) / "synthetic.json").read_text())["shards"]
    shards = [datasets.Dataset.from_file(str(shard_path(out_dir, shard))) for shard in range(count)]
    merged = datasets.concatenate_datasets(shards).select_columns(["image", "label"])
    features = merged.features.copy()
    features["label"] = datasets.ClassLabel(names=classes)  # stored as integers already
    return datasets.Dataset(merged.data, info=datasets.DatasetInfo(features=features))


def sample_grid(out_dir: Path, classes: list[str], per_class: int = 10, scale: int = 3) -> Path:
    """``samples.png``: one row per class, the first ``per_class`` synthetic images of each."""
    out_dir = Path(out_dir)
    synthetic = load_synthetic(out_dir, classes)
    labels = np.asarray(synthetic["label"])
    picked = {label: np.flatnonzero(labels == label)[:per_class] for label in range(len(classes))}
    width, height = synthetic[0]["image"].size
    grid = Image.new(synthetic[0]["image"].mode, (width * per_class, height * len(classes)))
    for label, chosen in picked.items():
        for column, index in enumerate(chosen):
            grid.paste(synthetic[int(index)]["image"], (column * width, label * height))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    path = out_dir / "samples.png"
    grid.save(path)
    return path
