"""Stage 2: one caption per image, the text a generator is later fine-tuned and prompted on.

Two captioners share one interface (:class:`Captioner`):

* ``blip2`` — a BLIP-2 hub model (the paper: ``Salesforce/blip2-opt-2.7b``, fp16, unconditional,
  greedy, ``max_new_tokens=20``);
* ``imagenet`` — offline and CPU-fast (the demo): the real ImageNet MobileNetV2 names what each image
  looks like, and measured brightness, extent, shape, texture and colour describe it, so two images of
  one class get different captions, as with BLIP-2.

Output of :func:`caption_split` (one directory per split): ``captions.jsonl`` (one record per image in
dataset order, written batch by batch and resumed after a kill), ``captions_by_class.json`` (the
generation view) and ``run.json`` (what made the captions: captioner, template, classes and image count, to
refuse mixing two runs). Text only: the artifact travels to every generation shard's pod, and the private images
it describes stay in the ingested dataset (a record's ``index`` is its row there).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image as PILImage
from tqdm.auto import tqdm

from tckr.core.atomic import write_text
from tckr.core.errors import TckrError
from tckr.core.precision import autocast_dtype, precision_name
from tckr.core.progress import progress
from tckr.generators.config import CaptionConfig
from tckr.training.semantic import JUDGED_AT, ImageNetClassifier, grey_on_dark, square_views


class CaptionError(TckrError, ValueError):
    """Captioning cannot run on this input or model; the message says why and what to change."""


class Captioner(Protocol):
    """Describes images in words. ``name`` identifies the captioner and its settings (resume check)."""

    name: str

    def caption(self, images: Sequence[PILImage.Image]) -> list[str]:
        """One caption per image, in order (the caller batches)."""
        ...


# ------------------------------------------------------------------------------------------- BLIP-2
class Blip2Captioner:
    """BLIP-2 as in the reference: unconditional (no prompt), greedy, its weights in ``dtype`` (the reference:
    fp16 on CUDA; ``None``: fp32)."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype | None = None,
                 max_new_tokens: int = 20) -> None:
        from huggingface_hub.errors import HFValidationError
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.name = f"blip2:{model}:{precision_name(dtype)}:max_new_tokens={max_new_tokens}"
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype or torch.float32
        try:
            self.processor = Blip2Processor.from_pretrained(model)
            self.model = Blip2ForConditionalGeneration.from_pretrained(model, dtype=self.dtype)
        except (OSError, HFValidationError) as error:  # the latter: a path that does not exist
            raise CaptionError(
                f"BLIP-2 model '{model}' is neither a local directory, nor in the hub cache, nor reachable "
                f"({error}). Download it where the hub is reachable (`hf download {model}`) and share HF_HOME, "
                "or set caption.model to a local directory; offline, use caption.captioner=imagenet") from error
        self.model.to(device).eval()

    @torch.inference_mode()
    def caption(self, images: Sequence[PILImage.Image]) -> list[str]:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        generated = self.model.generate(pixel_values=pixel_values, do_sample=False, num_beams=1,
                                        max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]


# ------------------------------------------------------------------------------- ImageNet + measures
# Attributes are measured on a bicubic 32x32 view, so a threshold means the same at any source
# resolution (gradients shrink when an image is upsampled). Intensities are in [0, 1].
_ANALYSIS_SIZE = JUDGED_AT
_FOREGROUND_DELTA = 0.1  # a pixel is object when a channel differs this much from the border median
# (upper bound, word), checked in order. Chosen on real Fashion-MNIST so that each word covers roughly
# a fifth to a half of the images; the quantiles there (10/33/67 %): object brightness 0.38/0.54/0.70,
# extent 0.27/0.38/0.56, interior gradient 0.057/0.075/0.104 (a flat square measures 0.01).
_BRIGHTNESS = ((0.45, "dark"), (0.65, "dim"), (float("inf"), "bright"))  # mean intensity of the object
_EXTENT = ((0.35, "small"), (0.55, "medium"), (float("inf"), "large"))  # fraction of the frame covered
_TEXTURE = ((0.07, "smooth"), (0.1, "textured"), (float("inf"), "heavily textured"))  # gradient inside
_ELONGATED = 1.4  # bounding-box height/width (or width/height) ratio above which it is "tall" ("wide")
_SATURATED = 0.2  # object colour saturation below which no colour word is used (grey images never get one)
_HUES = ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"), (255, "blue"),  # degrees
         (290, "purple"), (345, "pink"), (float("inf"), "red"))


class ImageNetCaptioner:
    """Offline captions from the pixels: "a bright, large, textured object like a jersey or a cardigan".

    The ImageNet MobileNetV2 (:class:`~tckr.training.semantic.ImageNetClassifier`) names the ``top_labels``
    categories each image most resembles (grey images on a dark background shown inverted); brightness,
    extent, shape, texture and colour are measured per image (:func:`measure_attributes`).
    """

    def __init__(self, device: torch.device, top_labels: int = 2, input_size: int = 112,
                 dtype: torch.dtype | None = None) -> None:
        self.classifier = ImageNetClassifier(device, input_size, dtype)
        self.name = f"{self.classifier.name}:top{top_labels}"  # names the precision: a resume never mixes two
        self.top_labels = top_labels

    @torch.inference_mode()
    def caption(self, images: Sequence[PILImage.Image]) -> list[str]:
        device = self.classifier.device
        attributes = measure_attributes(square_views(images, _ANALYSIS_SIZE, device))
        logits = self.classifier.logits_of(square_views(images, self.classifier.input_size, device),
                                           attributes.pop("invert"))
        top = logits.topk(self.top_labels, dim=1).indices.cpu().tolist()
        columns = {key: value.cpu().tolist() for key, value in attributes.items()}
        categories = self.classifier.categories
        return [_describe({key: column[i] for key, column in columns.items()}, [categories[j] for j in labels])
                for i, labels in enumerate(top)]


def measure_attributes(view: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image measures of an RGB batch ``[B, 3, S, S]`` in [0, 1] (thresholds above assume S = 32).

    The object is every pixel that differs from the border's median colour. Returns float tensors
    ``brightness`` (object mean), ``extent`` (object fraction), ``aspect`` (bounding box height / width),
    ``texture`` (mean gradient magnitude where the 3x3 neighbourhood is all object: the silhouette's own
    edge would otherwise dominate), ``saturation`` and ``hue`` (degrees) of the object's mean colour,
    and bool ``invert`` (a grey image on a dark background).
    """
    batch, _, size, _ = view.shape
    border = torch.cat([view[:, :, 0], view[:, :, -1], view[:, :, :, 0], view[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values  # [B, 3]
    foreground = (view - background[:, :, None, None]).abs().amax(dim=1) > _FOREGROUND_DELTA  # [B, S, S]
    area = foreground.sum(dim=(1, 2))
    has_object = area > 0

    object_mean = (view * foreground[:, None]).sum(dim=(2, 3)) / area.clamp(min=1)[:, None]  # [B, 3]
    colour = torch.where(has_object[:, None], object_mean, view.mean(dim=(2, 3)))

    rows, cols = foreground.any(dim=2), foreground.any(dim=1)  # [B, S] each
    index = torch.arange(size, device=view.device)
    height = torch.where(rows, index, -1).amax(dim=1) - torch.where(rows, index, size).amin(dim=1) + 1
    width = torch.where(cols, index, -1).amax(dim=1) - torch.where(cols, index, size).amin(dim=1) + 1
    aspect = torch.where(has_object, height.clamp(min=1) / width.clamp(min=1), torch.ones(batch, device=view.device))

    grey = torch.nn.functional.pad(view.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")[:, 0]
    gradient = torch.hypot(grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2], grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]) / 2
    interior = -torch.nn.functional.max_pool2d(-foreground[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5
    texture = (gradient * interior).sum(dim=(1, 2)) / interior.sum(dim=(1, 2)).clamp(min=1)

    high, low = colour.amax(dim=1), colour.amin(dim=1)
    red, green, blue = colour.unbind(dim=1)
    hue = torch.rad2deg(torch.atan2(np.sqrt(3) * (green - blue), 2 * red - green - blue)) % 360
    return {"brightness": colour.mean(dim=1), "extent": area / size**2, "aspect": aspect, "texture": texture,
            "saturation": (high - low) / high.clamp(min=1e-6), "hue": hue,
            "invert": grey_on_dark(view)}


def _level(value: float, levels: tuple[tuple[float, str], ...]) -> str:
    return next(word for bound, word in levels if value < bound)


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _describe(measures: dict[str, float], labels: list[str]) -> str:
    words = [_level(measures["brightness"], _BRIGHTNESS), _level(measures["extent"], _EXTENT)]
    if measures["aspect"] > _ELONGATED:
        words.append("tall")
    elif measures["aspect"] < 1 / _ELONGATED:
        words.append("wide")
    words.append(_level(measures["texture"], _TEXTURE))
    colour = f" {_level(measures['hue'], _HUES)}" if measures["saturation"] >= _SATURATED else ""
    likes = [_with_article(label) for label in labels]
    resembles = likes[0] if len(likes) == 1 else f"{', '.join(likes[:-1])} or {likes[-1]}"
    return f"{_with_article(', '.join(words))}{colour} object like {resembles}"


def build_captioner(cfg: CaptionConfig, device: torch.device) -> Captioner:
    """The configured captioner, loaded once per stage (BLIP-2 takes minutes to load)."""
    dtype = autocast_dtype(device, cfg.mixed_precision)
    if cfg.captioner == "blip2":
        return Blip2Captioner(cfg.model, device, dtype, cfg.max_new_tokens)
    return ImageNetCaptioner(device, cfg.top_labels, cfg.input_size, dtype)


# ---------------------------------------------------------------------------------------- captioning
def caption_text(template: str, class_name: str, caption: str) -> str:
    """The conditioning text. An empty caption (BLIP-2 emits a few) leaves the class name alone."""
    if not caption:
        return template.format(class_name=class_name, caption="").strip().rstrip(":;,-").strip()
    return template.format(class_name=class_name, caption=caption)


def _completed_records(path: Path, labels: np.ndarray) -> list[dict[str, Any]]:
    """Complete, in-order records a killed run left; the file is cut back to exactly those lines."""
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    kept_bytes = 0
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # killed mid-line
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            index = len(records)
            if index >= len(labels) or record.get("index") != index or record.get("label") != int(labels[index]):
                break
            records.append(record)
            kept_bytes += len(line)
    with path.open("r+b") as handle:
        handle.truncate(kept_bytes)
    return records


def caption_split(captioner: Captioner, split, classes: list[str], out_dir: Path,
                  template: str = "{class_name}: {caption}", batch_size: int = 32) -> dict[str, Any]:
    """Caption every image of ``split`` (``image`` + ``label`` columns) in dataset order into ``out_dir``.

    Resumable: records already in ``captions.jsonl`` from the same captioner, template and classes are
    kept and captioning continues after the last complete line. An empty caption is kept (its text is
    the class name alone, see :func:`caption_text`) and counted. Returns ``{images, distinct_captions,
    empty_captions, resumed_from, seconds, images_per_second}`` (the rate of this call's images).
    """
    if len(split) == 0:
        raise CaptionError("the split to caption has no images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(split["label"])
    if labels.min() < 0 or labels.max() >= len(classes):
        raise CaptionError(f"labels must lie in [0, {len(classes)}) for classes {classes}")

    run = {"captioner": captioner.name, "template": template, "classes": classes, "images": len(split)}
    run_path, jsonl_path = out_dir / "run.json", out_dir / "captions.jsonl"
    if run_path.exists() and json.loads(run_path.read_text()) != run:
        jsonl_path.unlink(missing_ok=True)  # made by another captioner, template or dataset: start over
    write_text(run_path, json.dumps(run, indent=2) + "\n")
    records = _completed_records(jsonl_path, labels)
    if records:
        tqdm.write(f"resuming captions after {len(records)}/{len(split)} images")

    raw = split.cast_column("image", split.features["image"].__class__(decode=False))
    started = time.perf_counter()
    resumed_from = len(records)
    bar = progress(total=len(split), initial=resumed_from, desc=f"caption {out_dir.name}", unit="img")
    with jsonl_path.open("a", encoding="utf-8") as out:
        for start in range(resumed_from, len(split), batch_size):
            stop = min(start + batch_size, len(split))
            encoded = [item["bytes"] or Path(item["path"]).read_bytes() for item in raw[start:stop]["image"]]
            images = [PILImage.open(io.BytesIO(data)) for data in encoded]
            captions = captioner.caption(images)
            if len(captions) != len(images):
                raise CaptionError(f"captioner {captioner.name} returned {len(captions)} captions "
                                   f"for {len(images)} images")
            lines = []
            for offset, caption in enumerate(captions):
                index, caption = start + offset, caption.strip()
                label = int(labels[index])
                record = {"index": index, "label": label, "class_name": classes[label], "caption": caption,
                          "text": caption_text(template, classes[label], caption)}
                records.append(record)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            out.write("".join(lines))
            out.flush()
            bar.update(len(images))
    bar.close()
    seconds = time.perf_counter() - started

    by_class: dict[str, list[str]] = {name: [] for name in classes}
    for record in records:
        by_class[record["class_name"]].append(record["text"])
    write_text(out_dir / "captions_by_class.json", json.dumps(by_class, indent=1, ensure_ascii=False) + "\n")
    done = len(records) - resumed_from
    return {"images": len(records), "distinct_captions": len({r["caption"] for r in records}),
            "empty_captions": sum(not r["caption"] for r in records), "resumed_from": resumed_from,
            "seconds": seconds, "images_per_second": done / seconds if done and seconds > 0 else 0.0}


def read_captions(split_dir: Path, labels: Sequence[int], classes: list[str]) -> list[str]:
    """The caption texts of one split in dataset order, once checked to be this split's: the same classes, as many
    images, each record of its image's class. Captions of another dataset (or of this one split with another seed)
    would pair each image with another image's description."""
    split_dir = Path(split_dir)
    try:
        run = json.loads((split_dir / "run.json").read_text())
        with open(split_dir / "captions.jsonl", encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
    except (OSError, ValueError) as error:
        raise CaptionError(f"no readable captions in {split_dir} ({error}): caption the dataset first "
                           "(tckr stage caption)") from None
    labels = [int(label) for label in labels]
    if run["classes"] != classes:
        problem = f"their classes are {run['classes']}, the dataset's {classes}"
    elif len(records) != len(labels):
        problem = f"{len(records)} captions for {len(labels)} images"
    elif (wrong := next((i for i, (record, label) in enumerate(zip(records, labels, strict=True))
                         if record["label"] != label), None)) is not None:
        problem = f"caption {wrong} describes a {classes[records[wrong]['label']]}, image {wrong} is a " \
                  f"{classes[labels[wrong]]}"
    else:
        return [record["text"] for record in records]
    raise CaptionError(f"the captions in {split_dir} were not made for this dataset's {split_dir.name} split "
                       f"({problem}): caption it (tckr stage caption), or give the captions made for it")


def caption_dataset(cfg: CaptionConfig, data_dir: Path, out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Caption each of ``cfg.splits`` the prepared dataset has into ``out_dir/<split>/``.

    Writes ``out_dir/captions.json`` (captioner, template, per-split summaries) and returns it.
    """
    from tckr.data.ingest import load_prepared

    splits, info = load_prepared(Path(data_dir))
    present = [name for name in cfg.splits if name in splits]
    if not present:
        raise CaptionError(f"none of caption.splits {cfg.splits} is in the prepared dataset "
                           f"(splits: {list(splits)})")
    captioner = build_captioner(cfg, device)
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"captioner": captioner.name, "template": cfg.template, "splits": {}}
    for name in present:
        tqdm.write(f"captioning split '{name}' ({len(splits[name])} images) with {captioner.name}")
        summary["splits"][name] = caption_split(captioner, splits[name], info.classes, out_dir / name,
                                                cfg.template, cfg.batch_size)
    write_text(out_dir / "captions.json", json.dumps(summary, indent=2) + "\n")
    return summary
