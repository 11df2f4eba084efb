"""PrivImage's generator stages' work: pretraining on public data (cached), then DP-SGD on the private data.

Pretraining sees public images only, so it is cached across runs by a key over everything that determines
it (settings, resolution, the pool, the selection). Fine-tuning is the run's second private step: its noise
multiplier is solved so that the query and DP-SGD, composed in one accountant, spend the target epsilon
(:func:`tckr.privacy.accounting.plan_privacy`); the run refuses to start when they cannot.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tckr.core.atomic import copy_tree, write_text
from tckr.core.errors import ConfigError
from tckr.core.precision import autocast_dtype, precision_name
from tckr.core.volume import checkpoint_location
from tckr.generators.conditional import (
    ClassConditionalGenerator,
    build_class_unet,
    contiguous_conv_inputs,
    pretrain_class_generator,
)
from tckr.generators.pixel import build_noise_scheduler, digest_files, generator_cache_dir, training_precision
from tckr.privacy.accounting import PrivacyPlan, plan_privacy, query_history
from tckr.privacy.dp_sgd import DPTrainingResult, train_dp
from tckr.recipes.privimage.config import FinetuneConfig, PretrainConfig
from tckr.recipes.privimage.pool import load_built_pool
from tckr.recipes.privimage.selection import load_selection

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def pretraining_data(cfg: PretrainConfig, image_size: int, channels: int, classes: list[str], pool_dir: Path,
                     selection_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """What pretraining sees: the selected public images with their sensitive labels, or the whole pool
    unconditionally (every label the null label); and a digest of that choice for the cache key."""
    from tckr.data.images import decode_split

    pool, card = load_built_pool(pool_dir)
    if cfg.subset == "selected":
        _, _, rows, labels = load_selection(selection_dir)
        images = decode_split(pool.select(rows), image_size, channels)
        return images, torch.as_tensor(labels, dtype=torch.long), digest_files([Path(selection_dir) / "subset.npz"])
    images = decode_split(pool, image_size, channels)
    return images, torch.full((len(images),), len(classes), dtype=torch.long), card["fingerprint"]


def pretrained_generator(cfg: PretrainConfig, image_size: int, data_dir: Path, pool_dir: Path, selection_dir: Path,
                         out_dir: Path, device: torch.device,
                         on_step: Callable[[int, float], None] | None = None) -> dict:
    """The pretrained generator in ``out_dir``: from the cache, or trained and cached (``subset: none``: the
    initial random weights, seeded)."""
    from tckr.data.ingest import DatasetInfo

    info = DatasetInfo.load(Path(data_dir) / "dataset.json")
    if cfg.subset == "none":
        images, labels, data_key = torch.zeros(0, info.channels, image_size, image_size, dtype=torch.uint8), None, ""
    else:
        images, labels, data_key = pretraining_data(cfg, image_size, info.channels, info.classes, pool_dir,
                                                    selection_dir)
    key = hashlib.sha256(json.dumps({"pretrain": cfg.model_dump(mode="json"), "image_size": image_size,
                                     "channels": info.channels, "classes": info.classes, "data": data_key,
                                     "precision": training_precision(cfg, device)},
                                    sort_keys=True).encode()).hexdigest()[:16]
    cached = generator_cache_dir() / "privimage" / key
    hit = (cached / "generator.json").is_file()
    if hit:
        copy_tree(cached, out_dir)
    else:
        if labels is None:
            _save_untrained(cfg, image_size, info.channels, info.classes, out_dir)
        else:
            pretrain_class_generator(cfg, images, labels, info.classes, out_dir, device, on_step=on_step)
        copy_tree(out_dir, cached)
    return {"cache_key": key, "cached": hit, "images": len(images)}


def _save_untrained(cfg: PretrainConfig, image_size: int, channels: int, classes: list[str], out_dir: Path) -> None:
    torch.manual_seed(cfg.seed)
    unet = build_class_unet(cfg, channels, image_size, len(classes))
    scheduler = build_noise_scheduler(cfg)
    ClassConditionalGenerator(unet, dict(scheduler.config), classes, image_size, channels).save(
        out_dir, {"pretraining": None})


def finetune_privately(cfg: FinetuneConfig, image_size: int, data_dir: Path, selection_dir: Path, base_dir: Path,
                       out_dir: Path, device: torch.device,
                       on_epoch: Callable[[dict], None] | None = None) -> tuple[PrivacyPlan, DPTrainingResult]:
    """DP-SGD on every UNet weight (or, with ``lora_rank``, on LoRA adapters only) over the private train split;
    the EMA of the weights, restarted from the pretrained ones, is saved as the fine-tuned generator."""
    from diffusers import DDPMScheduler

    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared
    from tckr.generators.conditional import class_denoising_loss

    splits, info = load_prepared(data_dir)
    _, record, _, _ = load_selection(selection_dir)
    (query_sigma, _, _), = record["history"]
    num_private = len(splits["train"])
    plan = plan_privacy(target_epsilon=cfg.target_epsilon, delta=cfg.delta, num_private=num_private,
                        query_sigma=query_sigma, batch_size=cfg.batch_size, epochs=cfg.epochs, kind=cfg.accountant,
                        max_noise_multiplier=cfg.max_noise_multiplier)
    base = ClassConditionalGenerator.load(base_dir, device)
    if base.classes != info.classes or base.image_size != image_size:
        raise ConfigError(f"the pretrained generator in {base_dir} makes {base.image_size}px images of "
                          f"{base.classes}, not {image_size}px images of {info.classes}")
    images = decode_split(splits["train"], image_size, base.channels)
    labels = torch.as_tensor(np.asarray(splits["train"]["label"]), dtype=torch.long)
    unet = base.unet.train()
    if cfg.lora_rank:
        add_dp_lora(unet, cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    dtype = autocast_dtype(device, cfg.mixed_precision)

    def loss_rows(model: nn.Module, rows: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        rows = rows.cpu()
        return class_denoising_loss(model, images[rows], labels[rows], scheduler, cfg.label_dropout, rng, device,
                                    dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = train_dp(unet, loss_rows, num_examples=num_private, sample_rate=plan.sample_rate, steps=plan.steps,
                      noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                      multiplicity=cfg.multiplicity, lr=cfg.lr, physical_batch_size=cfg.physical_batch_size,
                      seed=cfg.seed, device=device, checkpoint=out_dir / "dp-checkpoint.pt", accountant=cfg.accountant,
                      prior_history=query_history(query_sigma), delta=plan.delta, ema=ema, ema_decay=cfg.ema_decay,
                      on_epoch=on_epoch, recipe="privimage.dp_finetune",
                      resume_key=json.dumps({"base": digest_files([Path(base_dir) / WEIGHTS]),
                                             "data": info.split_fingerprints.get("train", info.fingerprint),
                                             "label_dropout": cfg.label_dropout, "lora": cfg.lora_targets,
                                             "precision": precision_name(dtype)}))
    weights = merged_lora(ema) if cfg.lora_rank else ema
    ClassConditionalGenerator(weights.eval(), base.scheduler_config, info.classes, image_size, base.channels).save(
        out_dir, {"finetuning": {"dp_steps": result.steps, "lora_rank": cfg.lora_rank, "private_images": num_private,
                                 "precision": precision_name(dtype)}})
    write_text(out_dir / "privacy.json", json.dumps(plan.as_dict() | {
        "epsilon_spent": result.epsilon, "history": [list(entry) for entry in result.history], "epochs": result.epochs,
        "covers": "the semantic query (one Gaussian step over the private train split) and every DP-SGD step",
        "does_not_cover": "hyperparameter search, and the public data (assumed public)"}, indent=2) + "\n")
    checkpoint_location(out_dir / "dp-checkpoint.pt").unlink(missing_ok=True)
    return plan, result


def add_dp_lora(unet: nn.Module, cfg: FinetuneConfig) -> None:
    """DP-LoRA: freeze the UNet and train rank-``lora_rank`` adapters on ``lora_targets`` only (their A and B are
    Conv2d/Linear layers, which Opacus clips per example like any other)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils.error import NoMatchingPeftModuleError

    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                           target_modules=cfg.lora_targets, init_lora_weights=True), unet)
    except NoMatchingPeftModuleError:
        raise ConfigError(f"no UNet module matches privacy.lora_targets={cfg.lora_targets}") from None
    contiguous_conv_inputs(unet)  # the adapters' own convs, after attention blocks too


def merged_lora(unet: nn.Module) -> nn.Module:
    """The adapters folded into their base layers, leaving a plain UNet of the original architecture."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(unet)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    return merged
