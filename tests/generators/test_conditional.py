"""PrivImage's class-conditional pixel generator: Opacus compatibility, pretraining, sampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tckr.core.errors import ConfigError
from tckr.data.ingest import FASHION_MNIST_CLASSES
from tckr.generators.conditional import (
    ClassConditionalGenerator,
    ClassLabels,
    build_class_unet,
    class_denoising_loss,
    pretrain_class_generator,
)
from tckr.generators.config import ClassGeneratorConfig, GeneratorError
from tckr.generators.pixel import build_noise_scheduler

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
CLASSES = FASHION_MNIST_CLASSES[:3]
TINY = ClassGeneratorConfig(block_out_channels=[8, 16], steps=60, batch_size=16, lr=3e-3)
OPACUS_LAYERS = {"Conv2d", "Linear", "GroupNorm", "Embedding", "LayerNorm"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one torch thread is many times faster than several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def labelled(fmnist_arrays):
    """160 real images at 8 px: 40 of each of 3 classes, and 40 of a 4th class left unlabelled (the null label)."""
    images, labels = fmnist_arrays["train"]
    keep = np.flatnonzero(labels < 4)
    pixels = torch.from_numpy(images[keep]).float().unsqueeze(1)
    pixels = torch.nn.functional.interpolate(pixels, size=8, mode="area").round().to(torch.uint8)
    return pixels, torch.from_numpy(labels[keep]).clamp(max=len(CLASSES))


def pretrain(labelled, out_dir, stop_after=None, **overrides):
    """Pretrain TINY; the losses of the steps this call ran (a resumed run starts after its checkpoint)."""
    losses = []

    def record(step, loss):
        losses.append(loss)
        if step == stop_after:
            raise KeyboardInterrupt

    summary = pretrain_class_generator(TINY.model_copy(update=overrides), *labelled, CLASSES, out_dir, CPU, record)
    return summary, losses


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, labelled):
    out = tmp_path_factory.mktemp("class-generator")
    summary, losses = pretrain(labelled, out)
    return out, summary, losses


@pytest.mark.parametrize("attention", [False, True])
def test_unet_shapes_and_null_label(attention):
    unet = build_class_unet(TINY.model_copy(update={"attention": attention}), 1, 8, num_classes=3)
    assert unet.class_embedding.num_embeddings == 4  # 3 classes + the null label
    assert any("Attn" in type(block).__name__ for block in unet.down_blocks) == attention
    output = unet(torch.randn(5, 1, 8, 8), torch.tensor([0, 10, 500, 900, 999]), class_labels=torch.arange(5) % 4)
    assert output.sample.shape == (5, 1, 8, 8)
    with pytest.raises(ConfigError, match="image_size 9 is not divisible by 2"):
        build_class_unet(TINY, 1, 9, num_classes=3)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus' hook on the input conv
def test_per_sample_gradients_under_opacus_match_autograd(attention):
    """What DP-SGD clips: Opacus' per-sample gradients (hooks) of the per-image losses, for every parameter."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    cfg = TINY.model_copy(update={"attention": attention})
    torch.manual_seed(0)
    unet = build_class_unet(cfg, 1, 8, num_classes=3)
    assert ModuleValidator.validate(unet, strict=False) == []
    assert {type(m).__name__ for m in unet.modules() if list(m.parameters(recurse=False))} <= OPACUS_LAYERS
    reference = copy.deepcopy(unet)
    images, labels = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 2, 1])
    scheduler = build_noise_scheduler(cfg)

    def losses(model):
        return class_denoising_loss(model, images, labels, scheduler, 0.5, torch.Generator().manual_seed(4), CPU)

    private = GradSampleModule(unet, loss_reduction="sum")
    losses(private).sum().backward()
    per_image = losses(reference)
    parameters = list(reference.parameters())
    expected = [torch.autograd.grad(loss, parameters, retain_graph=True) for loss in per_image]
    for index, (name, parameter) in enumerate(private._module.named_parameters()):
        torch.testing.assert_close(parameter.grad_sample, torch.stack([grads[index] for grads in expected]),
                                   rtol=1e-4, atol=1e-5, msg=name)


def test_label_dropout_sends_rows_to_the_null_label():
    conditioning = ClassLabels(torch.tensor([0, 1, 2, 1]), num_classes=3)
    dropped = torch.tensor([False, True, False, True])
    assert conditioning(torch.tensor([3, 1, 2, 0]), dropped, CPU)["class_labels"].tolist() == [1, 3, 2, 3]

    unet = build_class_unet(TINY, 1, 8, num_classes=3)
    seen = []
    unet.class_embedding.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    images, labels = torch.zeros(400, 1, 8, 8, dtype=torch.uint8), torch.arange(400) % 3
    for rate in (0.0, 0.5):
        with torch.no_grad():
            class_denoising_loss(unet, images, labels, build_noise_scheduler(TINY), rate, torch.Generator(), CPU)
    kept, half = seen
    assert torch.equal(kept, labels)
    nulled = half == 3
    assert torch.equal(half[~nulled], labels[~nulled]) and 150 < int(nulled.sum()) < 250


def test_pretraining_lowers_the_loss_and_saves_the_generator(pretrained):
    out, summary, losses = pretrained
    assert summary["steps"] == 60 and summary["train_images"] == 160 and summary["parameters"] > 0
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "pretrain-checkpoint.pt").exists()
    generator = ClassConditionalGenerator.load(out, CPU)
    assert generator.classes == CLASSES and generator.image_size == 8 and generator.channels == 1


def test_interrupted_pretraining_resumes_bit_identically(tmp_path, labelled, pretrained):
    reference, _, losses = pretrained
    with pytest.raises(KeyboardInterrupt):
        pretrain(labelled, tmp_path, stop_after=55)  # the checkpoint of step 50 survives
    _, resumed = pretrain(labelled, tmp_path)
    assert resumed == losses[50:]
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / weights).read_bytes() == (reference / weights).read_bytes()


def test_pretraining_refuses_bad_labels_and_foreign_weights(tmp_path, labelled, pretrained):
    images, labels = labelled
    with pytest.raises(GeneratorError, match=r"labels must lie in 0\.\.3"):
        pretrain_class_generator(TINY, images, labels + 1, CLASSES, tmp_path, CPU)
    with pytest.raises(GeneratorError, match="another architecture or class count"):
        pretrain_class_generator(TINY, images, labels.clamp(max=2), CLASSES[:2], tmp_path, CPU,
                                 init_from=pretrained[0])


def test_save_load_round_trip_samples_identically(tmp_path, pretrained):
    generator = ClassConditionalGenerator.load(pretrained[0], CPU)
    names, seeds = ["Trouser", "T-shirt/top", "Trouser"], [5, 6, 7]
    before = generator.sample(names, seeds, steps=4, guidance=3.0)
    generator.save(tmp_path, {"note": "copy"})
    np.testing.assert_array_equal(ClassConditionalGenerator.load(tmp_path, CPU).sample(names, seeds, 4, 3.0), before)
    assert before.dtype == np.uint8 and before.shape == (3, 8, 8, 1)


def test_unguided_sampling_skips_the_unconditional_pass(pretrained):
    """At guidance 1 the guided prediction is the conditional one: the UNet sees B rows, not 2B, and the
    images are those of the two-pass arithmetic (guidance a hair above 1 takes that path)."""
    generator = ClassConditionalGenerator.load(pretrained[0], CPU)
    names, seeds = ["Pullover", "Trouser", "T-shirt/top"], [1, 2, 3]
    rows = []
    hook = generator.unet.register_forward_hook(lambda _module, inputs, _output: rows.append(len(inputs[0])))
    try:
        unguided = generator.sample(names, seeds, steps=4, guidance=1.0)
    finally:
        hook.remove()
    two_pass = generator.sample(names, seeds, steps=4, guidance=1.0 + 1e-7)
    assert rows == [3] * 4
    assert np.abs(unguided.astype(int) - two_pass.astype(int)).max() <= 1  # batched float arithmetic may round


def test_an_image_depends_only_on_its_class_and_seed(pretrained):
    generator = ClassConditionalGenerator.load(pretrained[0], CPU)
    batch = generator.sample(["Pullover", "Trouser", "Trouser"], [1, 2, 3], steps=4, guidance=3.0)
    alone = generator.sample(["Trouser"], [2], steps=4, guidance=3.0)
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1  # batched float arithmetic may round
    assert not np.array_equal(batch[1], batch[2])
    with pytest.raises(GeneratorError, match=r"not \['Sneaker'\]"):
        generator.sample(["Sneaker"], [1], steps=4, guidance=3.0)
