"""The paper's generator path (``generator.kind: stable-diffusion``) on a tiny SD pipeline built from configs:
card, latent LoRA fine-tuning with exact resume, adapter-only output, and seeded pipeline generation."""

import csv
import json

import datasets
import mlflow
import numpy as np
import pytest
import torch

from tckr.data.ingest import FASHION_MNIST_CLASSES
from tckr.generators import pixel as generator_module
from tckr.generators.config import FinetuneConfig, GenerateConfig, GeneratorConfig
from tckr.generators.generate import finalize, generate_shards, load_synthetic, sampler_key
from tckr.generators.lora import ADAPTER_FILE, finetune_generator, load_finetuned
from tckr.generators.pixel import DenoiserData, PromptBank, read_card
from tckr.generators.plan import plan_generation
from tckr.generators.stable_diffusion import GeneratorUnavailableError, StableDiffusionGenerator, save_card
from tckr.recipes.config import load_config

CPU = torch.device("cpu")
CLASSES = FASHION_MNIST_CLASSES[:3]
SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8 x 8
LORA = FinetuneConfig(rank=4, alpha=4, epochs=1, batch_size=2, grad_accum=2, lr=5e-2, seed=3)


def clip_byte_alphabet() -> list[str]:
    """CLIP's byte -> printable-character map (transformers 5 no longer exports ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(stand_ins)) for byte in range(256)]


def build_tiny_pipeline(directory):
    """A randomly initialised SD2-shaped pipeline (v-prediction, CLIP text encoder) saved like a hub snapshot."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    characters = clip_byte_alphabet()
    tokens = [*characters, *(c + "</w>" for c in characters), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=SIZE)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def sd_config(model) -> GeneratorConfig:
    return GeneratorConfig(kind="stable-diffusion", model=str(model), prediction_type="v_prediction")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_sd):
    out = tmp_path_factory.mktemp("base")
    save_card(sd_config(tiny_sd), SIZE, out)
    return out


@pytest.fixture(scope="module")
def pairs(fmnist_arrays):
    """12 real images of 3 classes as 16 px RGB, each captioned by class and a per-image word."""
    images, labels = fmnist_arrays["train"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(3)])
    pixels = torch.from_numpy(images[keep]).float().unsqueeze(1)
    pixels = torch.nn.functional.interpolate(pixels, size=SIZE, mode="area").round().to(torch.uint8)
    texts = [f"{CLASSES[labels[k]]}: a {('dark', 'bright')[i % 2]} item" for i, k in enumerate(keep)]
    return pixels.expand(-1, 3, -1, -1).contiguous(), texts


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir, pairs):
    out = tmp_path_factory.mktemp("lora")
    summary = finetune_generator(base_dir, *pairs, LORA, out, CPU)
    assert summary["steps"] == 3 and summary["train_images"] == 12  # 12 images / (2 x 2) per step
    return out


def test_stages_run_the_paper_generator_path(tmp_path, tiny_sd, tracking_uri):
    """generator -> finetune -> generate_shard on real (grey) Fashion-MNIST: a card instead of weights, RGB for SD."""

    from tckr.platform.tracking import Tracking
    from tckr.recipes.invoke import invoke, sections_of
    from tckr.recipes.tckr.stages import STAGES

    cfg = load_config("smoke", ["generator.kind=stable-diffusion", f"generator.model={tiny_sd}",
                                "generator.prediction_type=v_prediction", f"image_size={SIZE}",
                                "finetune.batch_size=32"])
    tracking = Tracking(tracking_uri, cfg.experiment_name)

    def run(name: str, **artifacts):
        params = {p: artifacts.pop(p) for p in STAGES[name].params}
        return invoke(STAGES[name], sections_of(cfg, STAGES[name]), artifacts, params, tracking)

    data, captions, base, lora, shards = (tmp_path / name for name in ("data", "captions", "base", "lora", "shards"))
    run("ingest", data=data)
    run("caption", data=data, captions=captions)
    assert run("generator", data=data, captions=captions, base_model=base)["stage.generator.seconds"] > 0
    assert read_card(base) == {
        "kind": "stable-diffusion", "model": str(tiny_sd), "revision": None, "variant": None,
        "prediction_type": "v_prediction", "image_size": SIZE, "channels": 3, "latent_size": SIZE // 2}
    assert [p.name for p in base.iterdir()] == ["generator.json"]  # no weights copied
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment_name).experiment_id])
    assert {run.data.tags.get("tckr.generator_model") for run in runs} >= {str(tiny_sd)}

    metrics = run("finetune", data=data, captions=captions, base_model=base, adapter=lora)
    assert metrics["finetune.steps"] == 10  # ceil(300 private images / 32 per step)
    run("generate_shard", shard=0, captions=captions, base_model=base, adapter=lora, images=shards)
    shard = datasets.Dataset.from_file(str(shards / "shards" / "shard-00000.arrow"))
    assert len(shard) == cfg.generate.shard_size
    assert shard[0]["image"].mode == "RGB" and shard[0]["image"].size == (SIZE, SIZE)


@pytest.mark.unit
@pytest.mark.parametrize("model", ["stabilityai/stable-diffusion-2", "/no/such/pipeline"])
def test_unloadable_model_is_refused_naming_the_setting(tmp_path, model):
    with pytest.raises(GeneratorUnavailableError, match=f"generator.model='{model}'.*HF cache"):
        save_card(sd_config(model), SIZE, tmp_path)
    assert not (tmp_path / "generator.json").exists()


@pytest.mark.unit
def test_prediction_type_must_match_the_scheduler(tmp_path, tiny_sd):
    with pytest.raises(ValueError, match="set generator.prediction_type=v_prediction"):
        save_card(sd_config(tiny_sd).model_copy(update={"prediction_type": "epsilon"}), SIZE, tmp_path)


@pytest.mark.unit
def test_lora_learns_the_velocity(monkeypatch, tmp_path, base_dir, pairs):
    """SD2 predicts v: every training target is the velocity sqrt(a) * noise - sqrt(1 - a) * x0, not the noise."""
    original, is_velocity = generator_module.denoising_target, []

    def spy(noise_scheduler, samples, noise, timesteps):
        target = original(noise_scheduler, samples, noise, timesteps)
        alpha = noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        is_velocity.append(torch.allclose(target, alpha.sqrt() * noise - (1 - alpha).sqrt() * samples, atol=1e-6))
        return target

    monkeypatch.setattr(generator_module, "denoising_target", spy)
    finetune_generator(base_dir, *pairs, LORA.model_copy(update={"grad_accum": 6}), tmp_path, CPU)
    assert is_velocity == [True] * 6  # one step of 6 micro-batches


@pytest.mark.unit
def test_random_flip_picks_the_precomputed_mirror_latents():
    """A flipped image's latent is encoded from the flipped pixels, not mirrored in latent space."""
    latents, mirrored = torch.randn(4, 4, 2, 2).half(), torch.randn(4, 4, 2, 2).half()
    data = DenoiserData(latents, PromptBank(torch.zeros(1, 1, 1), torch.zeros(4, dtype=torch.long)), mirrored)
    batch = data.batch(torch.tensor([3, 1]), flip=torch.tensor([True, False]).view(2, 1, 1, 1))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, torch.stack([mirrored[3], latents[1]]).float())


@pytest.mark.unit
def test_adapter_only_in_diffusers_format(adapter_dir):
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / ADAPTER_FILE))
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)
    assert not any("base_layer" in k for k in weights)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert (adapter_dir / "loss.csv").read_text().count("\n") == 4
    assert json.loads((adapter_dir / "adapter.json").read_text())["finetune"]["rank"] == 4
    assert not (adapter_dir / "lora-checkpoint.pt").exists()


def test_killed_finetuning_resumes_to_the_uninterrupted_result(tmp_path, base_dir, pairs):
    from safetensors.torch import load_file

    cfg = LORA.model_copy(update={"epochs": 9, "grad_accum": 1})  # 54 steps: one checkpoint, at step 50

    def kill_at_52(step, _loss):
        if step == 52:
            raise KeyboardInterrupt

    finetune_generator(base_dir, *pairs, cfg, tmp_path / "full", CPU)
    with pytest.raises(KeyboardInterrupt):
        finetune_generator(base_dir, *pairs, cfg, tmp_path / "cut", CPU, on_step=kill_at_52)
    finetune_generator(base_dir, *pairs, cfg, tmp_path / "cut", CPU)

    def losses(directory):
        with open(directory / "loss.csv") as handle:
            return [float(row["loss"]) for row in csv.DictReader(handle)]

    assert len(losses(tmp_path / "full")) == 54
    np.testing.assert_allclose(losses(tmp_path / "cut"), losses(tmp_path / "full"), rtol=1e-5)
    full, resumed = (load_file(str(tmp_path / d / ADAPTER_FILE)) for d in ("full", "cut"))
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value)


PROMPTS = ["T-shirt/top: a dark item", "Trouser: a bright item", "T-shirt/top: a dark item"]


@pytest.mark.unit
def test_adapter_changes_generation(base_dir, adapter_dir):
    base = StableDiffusionGenerator.load(read_card(base_dir), CPU).sample(PROMPTS[:2], [1, 2], 3, 2.0)
    tuned = load_finetuned(base_dir, adapter_dir, CPU).sample(PROMPTS[:2], [1, 2], 3, 2.0)
    assert tuned.dtype == np.uint8 and tuned.shape == (2, SIZE, SIZE, 3)
    assert not np.array_equal(base, tuned)


@pytest.mark.unit
def test_generation_is_seeded_per_image(base_dir, adapter_dir):
    generator = load_finetuned(base_dir, adapter_dir, CPU)
    batch = generator.sample(PROMPTS, [7, 8, 7], 3, 2.0)
    again = load_finetuned(base_dir, adapter_dir, CPU).sample(PROMPTS, [7, 8, 7], 3, 2.0)
    np.testing.assert_array_equal(batch, again)
    np.testing.assert_array_equal(batch[0], batch[2])  # same seed and prompt -> same image
    assert not np.array_equal(batch[0], batch[1])
    alone = generator.sample(PROMPTS[:1], [7], 3, 2.0)[0]  # another batch: the same image, up to float rounding
    assert np.abs(alone.astype(int) - batch[0].astype(int)).max() <= 1


def test_shards_and_manifest(tmp_path, base_dir, adapter_dir):
    captions = {name: [f"{name}: a dark item", f"{name}: a bright item"] for name in CLASSES}
    cfg = GenerateConfig(ratio=1.0, steps=2, batch_size=2, shard_size=4, seed=5)
    plan = plan_generation(captions, CLASSES, 9, cfg)
    assert generate_shards(load_finetuned(base_dir, adapter_dir, CPU), plan, tmp_path, cfg,
                           sampler_key(cfg, [base_dir, adapter_dir])) == [0, 1, 2]
    summary = finalize(tmp_path, plan, cfg)
    assert summary["images"] == 9 and summary["shards"] == 3
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(9)) and rows[4]["prompt"] == "Trouser: a bright item"
    dataset = load_synthetic(tmp_path, CLASSES)
    assert dataset[4]["label"] == 1 and dataset[4]["image"].size == (SIZE, SIZE) and dataset[4]["image"].mode == "RGB"


@pytest.mark.gpu
def test_fp16_finetuning_and_generation_on_cuda(tmp_path, base_dir, pairs):
    """fp16 base weights under autocast with fp32 LoRA weights, then fp16 generation (the paper's setup)."""
    from safetensors.torch import load_file

    cuda = torch.device("cuda")
    summary = finetune_generator(base_dir, *pairs, LORA.model_copy(update={"epochs": 2}), tmp_path, cuda)
    assert np.isfinite(summary["final_loss"])
    weights = load_file(str(tmp_path / ADAPTER_FILE))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    generator = load_finetuned(base_dir, tmp_path, cuda)
    assert generator.pipe.unet.dtype == torch.float16
    images = generator.sample(PROMPTS, [7, 8, 7], 3, 2.0)
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[2])
