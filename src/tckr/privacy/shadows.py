"""Stage 7a: LiRA's shadow models, trained many at once.

A shadow imitates the teacher: same architecture, same recipe (:class:`tckr.training.classifier.Recipe`), same
selection on the real validation split, trained on its half of the attack population (private
train members + holdout non-members, see :func:`build_population`). Shadows are trained in groups:
a group is one :class:`ModelStack` — the models' parameters stacked along a leading axis — stepped
by one optimiser. On a GPU the stack runs as a single ``torch.func.vmap``-ed call, so many small
models fill the device that one would leave idle; on a CPU, where even one small model saturates
the cores, the same stack runs its models one after another (``attack.vectorize``). A group is the
unit of resume (a checkpoint per epoch) and of fan-out (one pipeline task per group), and each
shadow's outputs are written the moment its group finishes, so finished shadows are never redone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tckr.core.progress import progress
from tckr.core.seeds import derive_seed, own_stream
from tckr.data.images import BatchAugment
from tckr.data.ingest import DatasetInfo
from tckr.privacy.config import AttackConfig
from tckr.privacy.lira import AttackError, Query, balanced_keep_matrix, training_queries
from tckr.training.classifier import Recipe, batch_logits
from tckr.training.config import ClassifierConfig
from tckr.training.loop import Loop
from tckr.training.models import create_classifier

TRAINER = "tckr.shadows"  # what their checkpoints say made them


@dataclass
class Population:
    """The attack's challenge set: ``n`` private-train members then ``n`` holdout non-members; and RMIA's population
    samples ``z`` (``references``: test images no model trained on), which every model is queried on too."""

    images: torch.Tensor  # uint8 [P, C, S, S]
    labels: torch.Tensor  # long [P]
    is_member: np.ndarray  # bool [P]: in the targets' training set
    split_rows: np.ndarray  # row of each example in its own split (train or holdout)
    references: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))  # uint8 [Z, C, S, S]
    reference_labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # long [Z]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def queried(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What every model is queried on: the challenge examples, then the population samples ``z``."""
        if not len(self.references):
            return self.images, self.labels
        return torch.cat([self.images, self.references]), torch.cat([self.labels, self.reference_labels])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of every image, label and membership: which population a shadow was trained for."""
        digest = hashlib.sha256()
        for array in (self.images.numpy(), self.labels.numpy(), self.is_member, self.split_rows,
                      self.references.numpy(), self.reference_labels.numpy()):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]


def check_population(trained: int, holdout: int) -> None:
    """Refuse (:class:`AttackError`) a population on which shadows would train on fewer images than the target.

    ``trained``: images in the private train split (all of which the teacher trained on); ``holdout``: images
    in the holdout split. Cheap: a stage may call it right after ingest, so that a run fails in minutes rather
    than at the attack.
    """
    if holdout < trained:
        raise AttackError(
            f"the holdout split has {holdout} images, fewer than the {trained} private train images the target "
            f"trained on, so each shadow would train on only {holdout}: raise ingest.holdout_fraction until "
            "holdout >= train (about (1 - validation_fraction - public_fraction) / 2, plus a little for per-class "
            "rounding) and prepare the dataset again")


def build_population(splits, image_size: int, channels: int, seed: int, references: int = 0) -> Population:
    """All of the private train split (the members) and as many holdout images (the non-members); and
    ``references`` test images as RMIA's population samples (none of the models trains on the test split).

    Balanced so that AUC and balanced accuracy mean what they say. Each shadow trains on half of the
    population, i.e. on as many images as the targets' teacher trained on (the whole train split): with
    fewer images each example weighs more in training, so a smaller shadow's IN/OUT score distributions are
    not those of the target and the likelihood ratio is miscalibrated. Hence :class:`AttackError` (see
    :func:`check_population`) when the holdout split is smaller than the train split.
    """
    from tckr.data.images import decode_split

    if "holdout" not in splits:
        raise AttackError("the prepared dataset has no holdout split (LiRA's non-members): set "
                          "ingest.holdout_fraction > 0")
    trained = len(splits["train"])
    check_population(trained, len(splits["holdout"]))
    count = trained
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(len(splits["train"]), count, replace=False))
    non_members = np.sort(rng.choice(len(splits["holdout"]), count, replace=False))
    chosen = [splits["train"].select(members), splits["holdout"].select(non_members)]
    images = torch.cat([decode_split(part, image_size, channels) for part in chosen])
    labels = torch.cat([torch.as_tensor(np.asarray(part["label"])) for part in chosen])
    population = Population(images, labels.long(), np.r_[np.ones(count, bool), np.zeros(count, bool)],
                            np.r_[members, non_members])
    if references:
        test = splits["test"].select(np.sort(rng.choice(len(splits["test"]), min(references, len(splits["test"])),
                                                        replace=False)))
        population.references = decode_split(test, image_size, channels)
        population.reference_labels = torch.as_tensor(np.asarray(test["label"])).long()
    return population


def keep_matrix(cfg: AttackConfig, population_size: int) -> np.ndarray:
    return balanced_keep_matrix(cfg.shadows, population_size, cfg.seed)


def use_vmap(cfg: AttackConfig, device: torch.device) -> bool:
    return cfg.vectorize == "on" or (cfg.vectorize == "auto" and device.type == "cuda")


# ------------------------------------------------------------------------------------- model stack
class ModelStack(nn.Module):
    """``M`` models of one architecture held as stacked parameters and buffers (leading axis ``M``).

    ``forward(x)`` maps ``[M, B, ...]`` (or a shared ``[B, ...]``) to ``[M, B, K]``. With ``vectorize``
    all models run as one vmap-ed call; without, one after another on slices of the same stacked
    tensors, model ``m`` drawing its randomness (dropout) from ``seeds[m]`` when given. Either way the
    optimiser sees one tensor per parameter name: AdamW is elementwise, so stepping the stack equals
    stepping every model on its own.
    """

    def __init__(self, models: list[nn.Module], vectorize: bool) -> None:
        from torch.func import stack_module_state

        super().__init__()
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.buffer_names = list(buffers)
        self.stacked = nn.ParameterList([nn.Parameter(params[name]) for name in self.names])
        for index, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{index}", buffers[name])
        self.template = [copy.deepcopy(models[0]).to("meta")]  # a list: not registered as a submodule
        self.size = len(models)
        self.vectorize = vectorize

    def _buffers_stacked(self) -> list[torch.Tensor]:
        return [getattr(self, f"buffer_{index}") for index in range(len(self.buffer_names))]

    def _call_one(self, params: list[torch.Tensor], buffers: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        state = dict(zip(self.names, params, strict=True)) | dict(zip(self.buffer_names, buffers, strict=True))
        return functional_call(self.template[0], state, (x,))

    def forward(self, x: torch.Tensor, shared: bool = False, seeds: list[int] | None = None) -> torch.Tensor:
        self.template[0].train(self.training)
        params, buffers = list(self.stacked), self._buffers_stacked()
        if self.vectorize:
            return torch.vmap(self._call_one, in_dims=(0, 0, None if shared else 0), randomness="different")(
                params, buffers, x)
        outputs = []
        for m in range(self.size):
            with own_stream(seeds[m], x.device) if seeds else contextlib.nullcontext():
                outputs.append(self._call_one([p[m] for p in params], [b[m] for b in buffers], x if shared else x[m]))
        return torch.stack(outputs)

    @torch.no_grad()
    def copy_model(self, source: ModelStack, m: int) -> None:
        """Overwrite model ``m`` with model ``m`` of ``source`` (keeping a best epoch)."""
        for target, value in zip([*self.stacked, *self._buffers_stacked()],
                                 [*source.stacked, *source._buffers_stacked()], strict=True):
            target[m].copy_(value[m])


def stack_logits(stack: ModelStack | nn.Module, augment: BatchAugment, images: torch.Tensor, batch_size: int,
                 device: torch.device, query: Query = (0, 0, False), desc: str = "eval") -> torch.Tensor:
    """Logits for uint8 ``images`` (one shared input for every model) seen through ``query`` (a shift and a
    mirror, :data:`tckr.privacy.lira.Query`), float32 on the CPU: ``[M, N, K]`` for a stack, ``[N, K]`` for a
    single model."""
    stack.eval()
    forward = functools.partial(stack, shared=True) if isinstance(stack, ModelStack) else stack
    batches = (images[start:start + batch_size]
               for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"))
    dy, dx, mirrored = query
    return batch_logits(forward, augment, batches, device, flip=mirrored, shift=(dy, dx))


def query_logits(model: ModelStack | nn.Module, augment: BatchAugment, images: torch.Tensor, batch_size: int,
                 device: torch.device, queries: tuple[Query, ...], desc: str = "query") -> torch.Tensor:
    """The logits of every query (:func:`tckr.privacy.lira.training_queries`): ``[..., Q, N, K]``."""
    return torch.stack([stack_logits(model, augment, images, batch_size, device, query,
                                     desc=f"{desc} ({i + 1}/{len(queries)})") for i, query in enumerate(queries)],
                       dim=-3)


# -------------------------------------------------------------------------------------- training
def shadow_dir(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"shadow-{index:04d}"


def provenance(recipe: ClassifierConfig, keep: np.ndarray, index: int, population: Population,
               queries: tuple[Query, ...]) -> dict[str, str]:
    """What shadow ``index`` is made for: its row of the keep-matrix, the population, the training recipe, the
    seed and the queries its logits answer. A shadow is reused only where all five match (another
    ``attack.seed`` draws another keep-matrix, another recipe or dataset trains other models, other queries need
    other logits). The precision it trained in (which depends on the machine) is recorded beside, not matched."""
    return {"keep_row": hashlib.sha256(np.packbits(keep[index]).tobytes()).hexdigest()[:16],
            "population": population.fingerprint,
            "recipe": hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:16], "seed": str(recipe.seed),
            "query_set": hashlib.sha256(repr(queries).encode()).hexdigest()[:16]}


def mismatch(out_dir: Path, index: int, made_for: dict[str, str]) -> list[str] | None:
    """``None`` if ``out_dir`` holds no finished shadow ``index``; else what differs from ``made_for`` (empty: a
    shadow made for exactly this)."""
    card = shadow_dir(out_dir, index) / "shadow.json"
    if not card.is_file():
        return None
    found = json.loads(card.read_text()).get("provenance", {})
    return [key for key, value in made_for.items() if found.get(key) != value]


def is_done(out_dir: Path, index: int, made_for: dict[str, str]) -> bool:
    return mismatch(out_dir, index, made_for) == []


def train_shadow_group(cfg: ClassifierConfig, indices: list[int], keep: np.ndarray, population: Population,
                       validation: tuple[torch.Tensor, torch.Tensor], info: DatasetInfo, out_dir: Path,
                       device: torch.device, vectorize: bool, queries: tuple[Query, ...] = training_queries(0),
                       on_epoch: Callable[[dict], None] | None = None) -> list[int]:
    """Train shadows ``indices`` (rows of ``keep``) as one stack; returns those written now.

    Every random draw of model ``m`` is its own, derived from ``(recipe seed, "shadow", index)``
    (:func:`tckr.core.seeds.derive_seed`: never a target's streams): its initial weights, its batch order per epoch
    and, per step, its augmentations, MixUp and dropout. So a shadow is the same model whichever group or process
    trains it, up to floating-point summation order (a stack's one vmap-ed call draws dropout for all its models
    at once, and a CUDA loss scaler skips a step for all of them together). A checkpoint per epoch makes a killed
    group resume where it was (and one that another trainer left in ``out_dir`` is refused). A finished shadow made
    for another attack (:func:`provenance`) is trained again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made_for = {index: provenance(cfg, keep, index, population, queries) for index in indices}
    todo = [index for index in indices if not is_done(out_dir, index, made_for[index])]  # stale ones are redone
    if not todo:
        return []
    started = time.perf_counter()
    members = [torch.as_tensor(np.flatnonzero(keep[index])) for index in indices]
    per_model = len(members[0])
    if any(len(rows) != per_model for rows in members):
        raise AttackError("shadows of one group must train on equally many examples (use balanced_keep_matrix)")
    steps = per_model // cfg.batch_size
    if steps == 0:
        raise AttackError(f"a shadow's {per_model} training examples make no batch of {cfg.batch_size}: "
                          "use more private training images or a smaller batch size")
    models = []
    for index in indices:
        torch.manual_seed(derive_seed(cfg.seed, "shadow", index, "init"))
        models.append(create_classifier(cfg.model, info.num_classes, info.channels, cfg.pretrained))
    stack = ModelStack(models, vectorize).to(device)
    best = copy.deepcopy(stack)
    augment = BatchAugment(info.mean, info.std, cfg.crop_padding, cfg.hflip).to(device)
    recipe = Recipe.build(cfg, stack.parameters(), info.num_classes, device)
    augmix = _augmix() if cfg.augmix else None

    settings = f"{cfg.model_dump_json()}|{indices}|{keep[indices].sum(1).tolist()}|{len(population)}|{recipe.precision}"
    loop = Loop(out_dir / f"group-{indices[0]:04d}-{indices[-1]:04d}.pt", TRAINER, settings,
                {"stack": stack, "best": best, "optimizer": recipe.optimizer, "scheduler": recipe.scheduler,
                 "scaler": recipe.scaler},
                {"best_val": [-1.0] * len(indices), "best_epoch": [0] * len(indices), "history": []},
                desc=f"shadows {indices[0]}-{indices[-1]}")
    state = loop.extra

    def batches(epoch: int) -> list[tuple[int, int, torch.Tensor]]:
        """Each step's epoch, number and rows ``[M, batch]``: model ``m``'s own permutation of its members."""
        stack.train()
        orders = torch.stack([
            rows[torch.randperm(per_model, generator=torch.Generator().manual_seed(
                derive_seed(cfg.seed, "shadow", index, "order", epoch)))]
            for rows, index in zip(members, indices, strict=True)])
        return [(epoch, number, rows)
                for number, rows in enumerate(orders[:, :steps * cfg.batch_size].split(cfg.batch_size, dim=1))]

    def model_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model's augmented images and targets (MixUp per model: never one shadow's data in another's)."""
        images = population.images[rows]
        if augmix is not None:
            images = torch.stack([augmix(image) for image in images])
        images, targets = augment(images.to(device, non_blocking=True), train=True), population.labels[rows].to(device)
        return recipe.mixup(images, targets) if recipe.mixup is not None else (images, targets)

    def step(batch: tuple[int, int, torch.Tensor]) -> float:
        epoch, number, rows = batch
        made = []
        for m, index in enumerate(indices):
            with own_stream(derive_seed(cfg.seed, "shadow", index, "augment", epoch, number), device):
                made.append(model_batch(rows[m]))
        images, targets = torch.stack([x for x, _ in made]), torch.stack([t for _, t in made])
        dropout = [derive_seed(cfg.seed, "shadow", index, "dropout", epoch, number) for index in indices]
        with recipe.autocast(device):
            logits = stack(images, seeds=dropout)
            loss = sum(recipe.objective(logits[m], images[m], targets[m]) for m in range(len(indices)))
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe.scaler.scale(loss).backward()
        recipe.scaler.step(recipe.optimizer)
        recipe.scaler.update()
        return loss.item() / len(indices)

    def end_epoch(epoch: int, train_loss: float) -> dict:
        recipe.scheduler.step()
        val_logits = stack_logits(stack, augment, validation[0], cfg.eval_batch_size, device, desc="validate")
        val_accuracy = (val_logits.argmax(-1) == validation[1]).float().mean(-1).tolist()
        for m, value in enumerate(val_accuracy):
            if value > state["best_val"][m]:
                state["best_val"][m], state["best_epoch"][m] = value, epoch
                best.copy_model(stack, m)
        record = {"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_accuracy}
        state["history"].append(record)
        return record

    loop.run_epochs(cfg.epochs, batches, step, end_epoch, on_epoch=on_epoch)

    logits = query_logits(best, augment, population.queried[0], cfg.eval_batch_size, device, queries,
                          desc="shadow queries")
    queried = logits  # [M, Q, P + Z, K]: the challenge examples, then RMIA's population samples
    logits, labels = queried[:, :, :len(population)], population.labels
    seconds = (time.perf_counter() - started) / len(indices)  # this call's share: a resumed group counts its rest
    for m, index in enumerate(indices):
        if index in todo:
            predictions = logits[m, 0].argmax(-1) == labels
            summary = {"index": index, "provenance": made_for[index], "members": per_model, "seconds": seconds,
                       "precision": recipe.precision,
                       "best_epoch": state["best_epoch"][m],
                       "val_accuracy": state["best_val"][m],
                       "in_accuracy": float(predictions[keep[index]].float().mean()),
                       "out_accuracy": float(predictions[~keep[index]].float().mean()),
                       "history": [{"epoch": r["epoch"], "val_accuracy": r["val_accuracy"][m]}
                                   for r in state["history"]]}
            _write_shadow(out_dir, index, queried[m].numpy(), summary)
    loop.path.unlink(missing_ok=True)
    return todo


def _augmix():
    from torchvision.transforms import v2

    return v2.AugMix()


def _write_shadow(out_dir: Path, index: int, logits: np.ndarray, summary: dict) -> None:
    """``logits.npy`` (``[Q, P + Z, K]``) then ``shadow.json``, renamed into place together."""
    final = shadow_dir(out_dir, index)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / "logits.npy", logits.astype(np.float32))
    (partial / "shadow.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.replace(final)

