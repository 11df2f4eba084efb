"""The generator stack on a tiny pixel UNet: pretraining, LoRA round trip, sharded generation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tckr.core.errors import ConfigError
from tckr.core.precision import autocast, autocast_dtype, cpu_computes_bf16
from tckr.data.images import ImageSplit
from tckr.data.ingest import FASHION_MNIST_CLASSES
from tckr.generators.config import FinetuneConfig, GenerateConfig, GeneratorConfig
from tckr.generators.generate import finalize, gather_shards, generate_shards, load_synthetic, sampler_key
from tckr.generators.lora import ADAPTER_FILE, finetune_pixel_generator, load_finetuned
from tckr.generators.pixel import (
    DenoiserData,
    PixelGenerator,
    PromptBank,
    TextEncoder,
    build_noise_scheduler,
    build_unet,
    encode_prompts,
    pretrain_pixel_generator,
    sample_pixel_images,
    text_encoder_path,
    train_denoiser,
)
from tckr.generators.plan import GenerationError, plan_generation
from tckr.recipes.config import load_config

CPU = torch.device("cpu")
TINY = GeneratorConfig(block_out_channels=[8, 16], attention_head_dim=4, steps=4, batch_size=16, max_text_tokens=12)
CLASSES = FASHION_MNIST_CLASSES[:3]
MADE_BY = "the tiny base generator"  # a sampler key (generate.sampler_key) for tests of one generator


@pytest.fixture(scope="module")
def pairs(fmnist_arrays):
    """60 real images of 3 classes at 8 px, each captioned by class and a per-image word."""
    images, labels = fmnist_arrays["train"]
    keep = np.flatnonzero(labels < 3)[:60]
    pixels = torch.from_numpy(images[keep]).float().unsqueeze(1)
    pixels = torch.nn.functional.interpolate(pixels, size=8, mode="area").round().to(torch.uint8)
    words = ["dark", "bright", "large", "small"]
    texts = [f"{CLASSES[labels[k]]}: a {words[i % 4]} item" for i, k in enumerate(keep)]
    return pixels, texts, labels[keep]


@pytest.fixture(scope="module")
def base_generator(tmp_path_factory, pairs):
    pixels, texts, _ = pairs
    out = tmp_path_factory.mktemp("base")
    summary = pretrain_pixel_generator(TINY, pixels, texts, out, CPU)
    assert summary["steps"] == 4 and summary["unique_prompts"] == len(set(texts))
    return out


@pytest.mark.unit
def test_base_generator_round_trip(base_generator):
    card = json.loads((base_generator / "generator.json").read_text())
    assert card["kind"] == "pixel" and card["image_size"] == 8 and card["channels"] == 1
    assert (base_generator / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (base_generator / "pretrain-checkpoint.pt").exists()
    generator = PixelGenerator.load(base_generator, CPU)
    assert generator.text_encoder.dim == 384  # the real all-MiniLM-L6-v2


@pytest.mark.unit
def test_a_generator_trains_on_the_prompt_states_it_is_sampled_with(base_generator, pairs):
    """Pretraining and LoRA encode their prompts under the training autocast; generation encodes its own inside the
    sampler's (bf16 where the CPU computes it): the rows of the training bank are the states sampling conditions on."""
    _, texts, _ = pairs
    generator = PixelGenerator.load(base_generator, CPU)
    unique = sorted(set(texts))
    sampled: dict[str, torch.Tensor] = {}
    with torch.no_grad(), autocast(CPU, autocast_dtype(CPU, True)):  # as generate_shards samples
        sample_pixel_images(generator, unique, list(range(len(unique))), 1, 2.0, CPU, sampled)
    bank = encode_prompts(generator.text_encoder, texts, CPU, mixed_precision=True)
    assert torch.equal(bank.states, torch.stack([sampled[text] for text in ["", *unique]]).half())
    if cpu_computes_bf16():  # the states in fp32 differ: what pretraining encoded before
        assert not torch.equal(bank.states, encode_prompts(generator.text_encoder, texts, CPU, False).states)


def test_denoiser_training_resumes_exactly(tmp_path, pairs):
    pixels, texts, _ = pairs
    encoder = TextEncoder(text_encoder_path(), 12, CPU)
    data = DenoiserData(pixels, PromptBank.build(encoder, texts))

    def run(checkpoint, stop_after=None):
        torch.manual_seed(0)
        unet = build_unet(TINY, 1, 8, encoder.dim)

        def maybe_stop(step, _loss):
            if step == stop_after:
                raise KeyboardInterrupt

        return train_denoiser(unet, list(unet.parameters()), data, build_noise_scheduler(TINY), steps=56,
                              batch_size=8, grad_accum=2, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0,
                              caption_dropout=0.1, random_flip=True, seed=5, device=CPU, checkpoint=checkpoint,
                              on_step=maybe_stop)

    full = run(tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", stop_after=53)  # the checkpoint of step 50 survives
    resumed = run(tmp_path / "b.pt")
    assert len(resumed) == 56
    np.testing.assert_allclose(resumed, full, rtol=1e-5)


@pytest.mark.unit
def test_lora_adapter_round_trip_changes_outputs(tmp_path, base_generator, pairs):
    pixels, texts, _ = pairs
    cfg = FinetuneConfig(rank=4, alpha=4, epochs=1, batch_size=16, grad_accum=1, lr=5e-2, seed=1)
    summary = finetune_pixel_generator(base_generator, pixels, texts, cfg, tmp_path / "lora", CPU)
    assert summary["steps"] == 4 and summary["trainable_parameters"] > 0
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "lora" / ADAPTER_FILE)).keys()
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    assert not any("base_layer" in k for k in keys)  # adapter only
    assert (tmp_path / "lora" / "loss.csv").read_text().count("\n") == 5

    base = PixelGenerator.load(base_generator, CPU)
    tuned = load_finetuned(base_generator, tmp_path / "lora", CPU)
    again = load_finetuned(base_generator, tmp_path / "lora", CPU)
    prompts, seeds = ["Trouser: a dark item", "Pullover: a small item"], [1, 2]
    images = {name: sample_pixel_images(g, prompts, seeds, 4, 2.0, CPU, {}) for name, g in
              (("base", base), ("tuned", tuned), ("again", again))}
    assert not np.array_equal(images["base"], images["tuned"])
    np.testing.assert_array_equal(images["tuned"], images["again"])


@pytest.mark.unit
def test_generation_is_deterministic_per_seed(base_generator):
    generator = PixelGenerator.load(base_generator, CPU)
    prompts = ["T-shirt/top: a dark item"] * 3
    first = sample_pixel_images(generator, prompts, [7, 8, 7], 4, 2.0, CPU, {})
    second = sample_pixel_images(generator, prompts, [7, 8, 7], 4, 2.0, CPU, {})
    assert first.dtype == np.uint8 and first.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], first[2])  # same seed and prompt -> same image
    assert not np.array_equal(first[0], first[1])


CAPTIONS = {name: [f"{name}: a dark item", f"{name}: a bright item"] for name in CLASSES}


@pytest.mark.unit
def test_plan_is_balanced_and_cycles_captions():
    plan = plan_generation(CAPTIONS, CLASSES, num_private=10, cfg=GenerateConfig(ratio=2.0, seed=3))
    assert len(plan) == 18  # round(2 x 10) // 3 = 6 per class
    assert [sum(1 for p in plan if p.label == c) for c in range(3)] == [6, 6, 6]
    trouser = [p.prompt for p in plan if p.label == 1]
    assert trouser[:3] == ["Trouser: a dark item", "Trouser: a bright item", "Trouser: a dark item"]
    assert len({p.seed for p in plan}) == 18


@pytest.mark.unit
@pytest.mark.parametrize(("captions", "ratio", "message"), [
    ({}, 1.0, "the caption file is empty"),
    ({**CAPTIONS, "Pullover": []}, 1.0, r"classes with no captions to prompt with: \['Pullover'\]"),
    (CAPTIONS, 0.1, "less than one image per class"),
])
def test_plan_bad_input(captions, ratio, message):
    with pytest.raises(GenerationError, match=message):
        plan_generation(captions, CLASSES, num_private=10, cfg=GenerateConfig(ratio=ratio))


@pytest.mark.unit
def test_ratio_must_be_positive():
    with pytest.raises(ConfigError, match="generate.ratio: Input should be greater than 0"):
        load_config("smoke", ["generate.ratio=0"])


def run_generation(generator, captions, classes, num_private, cfg, out_dir):
    plan = plan_generation(captions, classes, num_private, cfg)
    generate_shards(generator, plan, out_dir, cfg, MADE_BY)
    return finalize(out_dir, plan, cfg)


def _shard_table(path):
    """A shard's images and plan (not its metadata, which holds the seconds it took)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


class _KilledAfter:
    """Wraps a generator; the n-th sampler call raises, as a pod killed mid-shard would."""

    def __init__(self, generator, calls):
        self.generator = generator
        self.device = generator.device
        self.calls = calls

    def sample(self, *args):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.generator.sample(*args)


@pytest.mark.unit
def test_killed_generation_resumes_to_the_same_set(tmp_path, base_generator):
    cfg = GenerateConfig(ratio=1.0, steps=2, batch_size=4, shard_size=5, seed=11)
    generator = PixelGenerator.load(base_generator, CPU)
    reference = run_generation(generator, CAPTIONS, CLASSES, 12, cfg, tmp_path / "ref")
    assert reference["images"] == 12 and reference["shards"] == 3

    plan = plan_generation(CAPTIONS, CLASSES, 12, cfg)
    with pytest.raises(KeyboardInterrupt):  # batches of 4: shard 0 takes 2 calls, the 3rd call is in shard 1
        generate_shards(_KilledAfter(generator, calls=2), plan, tmp_path / "cut", cfg, MADE_BY)
    assert (tmp_path / "cut" / "shards" / "shard-00000.arrow").is_file()
    assert (tmp_path / "cut" / "shards" / "shard-00001.staging").is_dir()
    with pytest.raises(GenerationError, match="2 of 3 shards are missing"):
        finalize(tmp_path / "cut", plan, cfg)
    written = generate_shards(generator, plan, tmp_path / "cut", cfg, MADE_BY)
    assert written == [1, 2]
    finalize(tmp_path / "cut", plan, cfg)

    assert (tmp_path / "cut" / "manifest.jsonl").read_text() == (tmp_path / "ref" / "manifest.jsonl").read_text()
    for shard in ("shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"):  # the same images, one file each
        cut, ref = (_shard_table(tmp_path / run / "shards" / shard) for run in ("cut", "ref"))
        assert cut.equals(ref)
    assert sorted(p.name for p in (tmp_path / "cut" / "shards").iterdir()) == \
        ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]  # no staging folder left


@pytest.mark.unit
def test_manifest_validity_and_loading(tmp_path, base_generator):
    cfg = GenerateConfig(ratio=1.0, steps=2, batch_size=8, shard_size=4, seed=2)
    generator = PixelGenerator.load(base_generator, CPU)
    run_generation(generator, CAPTIONS, CLASSES, 9, cfg, tmp_path / "syn")
    rows = [json.loads(line) for line in (tmp_path / "syn" / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(9))
    summary = json.loads((tmp_path / "syn" / "synthetic.json").read_text())
    assert summary["images"] == 9 and summary["shards"] == 3 and summary["generation_seconds"] > 0
    assert {"shard", "row", "label", "class_name", "prompt", "seed"} <= set(rows[0])
    assert (rows[4]["shard"], rows[4]["row"]) == ("shard-00001.arrow", 0)
    dataset = load_synthetic(tmp_path / "syn", CLASSES)
    assert len(dataset) == 9 and dataset[4]["label"] == 1 and dataset[4]["image"].size == (8, 8)
    assert dataset.features["label"].names == CLASSES and dataset.column_names == ["image", "label"]
    assert [Path(f["filename"]).parent for f in dataset.cache_files] == [tmp_path / "syn" / "shards"] * 3  # mapped
    # Reading it never writes beside it (a DVC output, a KFP input artifact): no cache file of a cast or a split.
    ImageSplit(dataset.train_test_split(test_size=0.3, seed=0)["train"], 8, 1)[0]
    assert sorted(p.name for p in (tmp_path / "syn" / "shards").iterdir()) == \
        ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    # A manifest made for another plan is refused.
    other = plan_generation(CAPTIONS, CLASSES, 9, GenerateConfig(ratio=1.0, shard_size=4, seed=3))
    with pytest.raises(GenerationError, match="generated for another plan"):
        finalize(tmp_path / "syn", other, cfg)


@pytest.mark.unit
def test_a_persisted_directory_from_another_plan_is_regenerated(tmp_path, base_generator):
    """DVC keeps the synthetic directory between runs (to resume): a changed seed or ratio must redo
    the shards another plan left, and drop those beyond the new plan, never reuse them."""
    generator = PixelGenerator.load(base_generator, CPU)
    out_dir = tmp_path / "syn"
    run_generation(generator, CAPTIONS, CLASSES, 12, GenerateConfig(ratio=1.0, steps=2, shard_size=4, seed=5),
                   out_dir)
    reseeded = GenerateConfig(ratio=0.5, steps=2, shard_size=4, seed=6)
    plan = plan_generation(CAPTIONS, CLASSES, 12, reseeded)
    assert generate_shards(generator, plan, out_dir, reseeded, MADE_BY) == [0, 1]
    assert finalize(out_dir, plan, reseeded)["images"] == 6
    assert sorted(p.name for p in (out_dir / "shards").iterdir()) == ["shard-00000.arrow", "shard-00001.arrow"]
    run_generation(generator, CAPTIONS, CLASSES, 12, reseeded, tmp_path / "fresh")
    assert (out_dir / "manifest.jsonl").read_text() == (tmp_path / "fresh" / "manifest.jsonl").read_text()
    assert generate_shards(generator, plan, out_dir, reseeded, MADE_BY) == []  # now current: nothing redone


@pytest.mark.unit
def test_a_persisted_directory_from_another_generator_is_regenerated(tmp_path, base_generator):
    """The same plan sampled by another generator (a new adapter or base model) or with other sampling settings
    makes other images: DVC's persisted directory must not hand the student the earlier generator's shards, and a
    fan-out shard of the current generator replaces one of an earlier generator when gathered."""
    cfg = GenerateConfig(ratio=1.0, steps=2, shard_size=4, seed=5)
    generator = PixelGenerator.load(base_generator, CPU)
    plan = plan_generation(CAPTIONS, CLASSES, 12, cfg)
    retrained = tmp_path / "retrained"
    shutil.copytree(base_generator, retrained)
    weights = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte of the weights differs
    key = sampler_key(cfg, [base_generator])
    assert key == sampler_key(cfg, [base_generator])  # a resumed run finds its own shards
    others = {sampler_key(cfg, [retrained]), sampler_key(cfg.model_copy(update={"steps": 3}), [base_generator]),
              sampler_key(cfg.model_copy(update={"guidance": cfg.guidance + 1}), [base_generator])}
    assert len(others) == 3 and key not in others
    out_dir = tmp_path / "syn"
    assert generate_shards(generator, plan, out_dir, cfg, key) == [0, 1, 2]
    assert generate_shards(generator, plan, out_dir, cfg, key) == []
    other = sampler_key(cfg, [retrained])
    assert generate_shards(generator, plan, out_dir, cfg, other, shards=[1]) == [1]  # made by "another generator"
    assert generate_shards(generator, plan, out_dir, cfg, key) == [1]  # not taken for this one's
    generate_shards(generator, plan, tmp_path / "pod", cfg, other, shards=[0])
    assert gather_shards([tmp_path / "pod"], out_dir) == [0]  # the fan-out's shard replaces the earlier one


@pytest.mark.unit
def test_shards_made_by_parallel_workers_are_gathered(tmp_path, base_generator):
    """The fan-out: each worker writes its own shard directory; the gatherer assembles the planned set."""
    cfg = GenerateConfig(ratio=1.0, steps=2, batch_size=4, shard_size=4, seed=4)
    generator = PixelGenerator.load(base_generator, CPU)
    plan = plan_generation(CAPTIONS, CLASSES, 12, cfg)
    for shard in (0, 2):  # two "pods"; shard 1 is left for the gatherer to make itself
        generate_shards(generator, plan, tmp_path / f"pod{shard}", cfg, MADE_BY, shards=[shard])
    assert gather_shards([tmp_path / "pod0", tmp_path / "pod2"], tmp_path / "all") == [0, 2]
    assert generate_shards(generator, plan, tmp_path / "all", cfg, MADE_BY) == [1]
    finalize(tmp_path / "all", plan, cfg)
    reference = tmp_path / "ref"
    run_generation(generator, CAPTIONS, CLASSES, 12, cfg, reference)
    assert (tmp_path / "all" / "manifest.jsonl").read_text() == (reference / "manifest.jsonl").read_text()
    assert gather_shards([tmp_path / "pod0"], tmp_path / "all") == []  # already complete: untouched


class _Counting:
    """Wraps a generator; counts the images this process sampled."""

    def __init__(self, generator):
        self.generator = generator
        self.device = generator.device
        self.images = 0

    def sample(self, prompts, *args):
        self.images += len(prompts)
        return self.generator.sample(prompts, *args)


def _generate_every_shard(*, generator_dir, cfg: GenerateConfig, out_dir) -> tuple[list[int], int]:
    """What each rank runs: load the generator, make its share of every shard; the shards written and
    how many images this rank sampled."""
    generator = _Counting(PixelGenerator.load(generator_dir, CPU))
    written = generate_shards(generator, plan_generation(CAPTIONS, CLASSES, 12, cfg), out_dir, cfg, MADE_BY)
    return written, generator.images


def test_two_ranks_make_the_same_shards_as_one(tmp_path, base_generator, monkeypatch):
    """A generation stage given two GPUs: each rank samples every other batch of each shard, rank 0
    publishes the shard; the set is the one a single process makes, image for image."""
    from pathlib import Path

    from tckr.core.distributed import run_stage

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # the ranks unpickle this helper
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same float arithmetic as here
    cfg = GenerateConfig(ratio=1.0, steps=2, batch_size=2, shard_size=5, seed=5)  # 12 images: shards of 5, 5, 2
    written, sampled_by_rank_0 = run_stage("generate", _generate_every_shard, {
        "generator_dir": base_generator, "cfg": cfg, "out_dir": tmp_path / "ranks"}, count=2, device="cpu")
    assert written == [0, 1, 2]
    assert sampled_by_rank_0 == 3 + 3 + 2  # batches 0 and 2 of the two full shards, the last shard's only batch
    plan = plan_generation(CAPTIONS, CLASSES, 12, cfg)
    finalize(tmp_path / "ranks", plan, cfg)
    run_generation(PixelGenerator.load(base_generator, CPU), CAPTIONS, CLASSES, 12, cfg, tmp_path / "one")
    assert (tmp_path / "ranks" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
    for shard in (tmp_path / "one" / "shards").iterdir():
        assert _shard_table(tmp_path / "ranks" / "shards" / shard.name).equals(_shard_table(shard)), shard.name
    assert sorted(p.name for p in (tmp_path / "ranks" / "shards").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "shards").iterdir())
