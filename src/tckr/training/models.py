"""Classifier architectures. Everything is built through ``timm.create_model`` so the teacher, the
student and the attack's shadow models share one factory; ``tckr_cnn`` is registered with timm for
low-resolution CPU runs, where MobileNetV3's 32x downsampling leaves a 16 px image no spatial extent.
"""

from __future__ import annotations

import timm
import torch
from timm.models import register_model
from torch import nn

from tckr.core.errors import ConfigError, TckrError


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class CompactCNN(nn.Module):
    """VGG-style net for 16-32 px inputs: three stages of two 3x3 convs, two 2x2 poolings."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 drop_rate: float = 0.1, **_: object) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for index, width in enumerate(widths):
            layers += [_conv_block(channels, width), _conv_block(width, width)]
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(channels, num_classes))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def tckr_cnn(pretrained: bool = False, **kwargs: object) -> CompactCNN:
    if pretrained:
        raise ConfigError("tckr_cnn has no pretrained weights: set pretrained: false")
    return CompactCNN(**kwargs)


class ModelUnavailableError(TckrError, RuntimeError):
    """Pretrained weights that are neither cached nor reachable."""


def create_classifier(name: str, num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    """Build a classifier by timm name; pretrained weights come from the hub (real loading code)."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ConfigError(f"unknown classifier '{name}': use a timm model name "
                              "(e.g. mobilenetv3_large_100) or tckr_cnn") from None
        raise
    except OSError as error:  # huggingface_hub: not cached and the hub is unreachable
        raise ModelUnavailableError(
            f"pretrained weights for '{name}' are not in the local Hugging Face cache and the hub is "
            f"unreachable ({type(error).__name__}); pre-fetch them into HF_HOME on a connected machine, "
            "or set pretrained: false to train from scratch") from error


class NormalizedClassifier(nn.Module):
    """Classifier that takes images in [0, 1] and normalises them itself: what the registry serves,
    so a consumer needs no knowledge of the training set's statistics."""

    def __init__(self, classifier: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier((images - self.mean) / self.std)
