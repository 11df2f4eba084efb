"""Images at the pipeline's one resolution: decoded once per item on the CPU (:class:`ImageSplit`, or a whole
split at once with :func:`decode_split`), augmented and normalised batched on the training device
(:class:`BatchAugment`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from torch import nn
from torch.utils.data import Dataset

from tckr.core.progress import progress


class ImageSplit(Dataset):
    """One split of a prepared dataset as uint8 ``[C, S, S]`` tensors at the pipeline resolution."""

    def __init__(self, split, image_size: int, channels: int, augmix: bool = False) -> None:
        self.images = split.cast_column("image", split.features["image"].__class__(decode=False))
        self.labels = torch.as_tensor(np.asarray(split["label"]), dtype=torch.long)
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.augmix = None
        if augmix:
            from torchvision.transforms import v2

            self.augmix = v2.AugMix()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.images[int(index)]["image"]
        data = item["bytes"] or Path(item["path"]).read_bytes()  # embedded (prepared) or on disk (synthetic)
        with PILImage.open(io.BytesIO(data)) as image:
            image = image.convert(self.mode)
            if image.size != (self.image_size, self.image_size):
                image = _resize_center_crop(image, self.image_size)
            array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
        if self.augmix is not None:
            tensor = self.augmix(tensor)
        return tensor, self.labels[index]


def _resize_center_crop(image: PILImage.Image, size: int) -> PILImage.Image:
    """Bicubic resize of the short side to ``size``, then a centre crop (the reference's eval view)."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           PILImage.Resampling.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


class BatchAugment(nn.Module):
    """uint8 batch -> normalised float batch; random pad-crop and flip when ``train``."""

    def __init__(self, mean: list[float], std: list[float], crop_padding: int = 0, hflip: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)
        self.crop_padding = crop_padding
        self.hflip = hflip

    def forward(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if not train:
            return x
        batch, _, height, width = x.shape
        if self.crop_padding:
            pad = self.crop_padding
            # Zero padding after normalisation = padding with the dataset mean, as in the reference.
            padded = nn.functional.pad(x, (pad, pad, pad, pad))
            rows = torch.randint(0, 2 * pad + 1, (batch, 1), device=x.device) + torch.arange(height, device=x.device)
            cols = torch.randint(0, 2 * pad + 1, (batch, 1), device=x.device) + torch.arange(width, device=x.device)
            index = torch.arange(batch, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(batch, 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        return x.contiguous()


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Normalised images ``[..., H, W]`` shifted by ``dy`` rows and ``dx`` columns, the gap zero (the dataset
    mean, as :class:`BatchAugment`'s padded crop fills it): the crop at ``(pad + dy, pad + dx)`` of the padded image."""
    if dy == dx == 0:
        return x
    pad = max(abs(dy), abs(dx))
    height, width = x.shape[-2:]
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width].contiguous()


def decode_split(split, image_size: int, channels: int) -> torch.Tensor:
    """A whole split as uint8 ``[N, C, S, S]`` at the pipeline resolution."""
    items = ImageSplit(split, image_size, channels)
    return torch.stack([items[i][0] for i in progress(range(len(items)), desc="decode images", unit="img")])
