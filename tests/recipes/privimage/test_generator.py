"""DP-LoRA: adapters that Opacus clips correctly (after attention blocks too), folded back into a plain UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from tckr.core.errors import ConfigError
from tckr.generators.conditional import build_class_unet, class_denoising_loss
from tckr.generators.config import ClassGeneratorConfig
from tckr.generators.pixel import build_noise_scheduler
from tckr.recipes.privimage.config import FinetuneConfig
from tckr.recipes.privimage.generator import add_dp_lora, merged_lora

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
TINY = ClassGeneratorConfig(block_out_channels=[8, 16], attention=True)
LORA = FinetuneConfig(lora_rank=2)


def _adapted_unet():
    torch.manual_seed(0)
    unet = build_class_unet(TINY, 1, 8, num_classes=3)
    add_dp_lora(unet, LORA)
    for name, parameter in unet.named_parameters():  # B starts at zero: give the adapters something to say
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return unet


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_only_adapters_train_and_their_per_sample_gradients_are_exact_after_attention():
    from opacus import GradSampleModule

    unet = _adapted_unet()
    trainable = [name for name, parameter in unet.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any(name.startswith("up_blocks.0.") for name in trainable)  # the adapters right after attention
    reference = copy.deepcopy(unet)
    images, labels = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 2, 1])
    scheduler = build_noise_scheduler(TINY)

    def losses(model):
        return class_denoising_loss(model, images, labels, scheduler, 0.5, torch.Generator().manual_seed(4), CPU)

    private = GradSampleModule(unet, loss_reduction="sum")
    losses(private).sum().backward()
    per_image = losses(reference)
    parameters = [parameter for parameter in reference.parameters() if parameter.requires_grad]
    expected = [torch.autograd.grad(loss, parameters, retain_graph=True) for loss in per_image]
    trained = [(name, p) for name, p in private._module.named_parameters() if p.requires_grad]
    for index, (name, parameter) in enumerate(trained):
        torch.testing.assert_close(parameter.grad_sample, torch.stack([grads[index] for grads in expected]),
                                   rtol=1e-4, atol=1e-5, msg=name)


def test_merged_adapters_leave_the_original_architecture_with_the_same_outputs():
    unet = _adapted_unet().eval()
    merged = merged_lora(unet).eval()
    plain = build_class_unet(TINY, 1, 8, num_classes=3)
    assert merged.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(merged.state_dict())  # a stock UNet loads it: nothing of peft is left
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 400, 999]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, class_labels=y).sample, unet(x, t, class_labels=y).sample,
                                   rtol=1e-4, atol=1e-5)


def test_lora_targets_that_match_nothing_are_refused():
    unet = build_class_unet(TINY, 1, 8, num_classes=3)
    with pytest.raises(ConfigError, match=r"no UNet module matches privacy.lora_targets=\['no_such_module'\]"):
        add_dp_lora(unet, LORA.model_copy(update={"lora_targets": ["no_such_module"]}))
