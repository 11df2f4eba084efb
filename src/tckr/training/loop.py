"""The one resumable training loop: classifiers, shadow stacks and denoisers all train through it.

A trainer supplies its step (one optimiser step, returning the loss) and, when it trains in epochs,
each epoch's batches and its end-of-epoch work (validation, keeping the best model). The loop owns the
rest: iterating epochs or steps, the progress bar, the callbacks, and a checkpoint written atomically
that lets a killed run resume bit for bit. Everything that must survive a kill goes through that
checkpoint: the named ``objects`` (model, optimiser, scheduler, scaler, EMA, a data-order
``torch.Generator``, a privacy accountant: anything with ``state_dict``/``load_state_dict``), the global
RNGs, and plain ``extra`` state such as the history.

The checkpoint goes where :func:`tckr.core.volume.checkpoint_location` says: at ``path``, or on the pipeline's
shared volume when a pod has one, so a retried pod resumes. A checkpoint names the recipe and trainer that wrote
it and a key of the run's settings: a file of another trainer is refused (:class:`CheckpointMismatchError`), a
file of other settings is stale and training starts over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from tckr.core.atomic import torch_save
from tckr.core.errors import TckrError
from tckr.core.progress import progress
from tckr.core.seeds import rng_state, set_rng_state
from tckr.core.volume import checkpoint_location


class CheckpointMismatchError(TckrError, RuntimeError):
    """A checkpoint written by another recipe or trainer: resuming it would train something else, and
    overwriting it would destroy someone else's work."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


class Loop:
    """A resumable run of ``recipe`` (e.g. ``"tckr.classifier"``) with ``settings`` (a key of everything
    that determines it), checkpointed at ``path``.

    ``objects`` and ``extra`` are restored in place when the run resumes; ``done`` counts the epochs (or
    steps) finished and ``steps`` the optimiser steps. Only the ``lead`` process (rank 0 under torchrun)
    writes, draws bars and calls back; the others restore and train alike.
    """

    def __init__(self, path: Path, recipe: str, settings: str, objects: Mapping[str, Stateful | torch.Generator],
                 extra: dict[str, Any] | None = None, *, desc: str = "train", lead: bool = True) -> None:
        self.path, self.recipe, self.settings = checkpoint_location(path), recipe, settings
        self.objects = objects
        self.extra = {} if extra is None else extra
        self.desc, self.lead = desc, lead
        self.done = self.steps = 0
        self.last_record: dict | None = None  # the last epoch's report, kept in the checkpoint

    def run_epochs(self, epochs: int, batches: Callable[[int], Iterable], step: Callable[[Any], float],
                   end_epoch: Callable[[int, float], dict | None], *,
                   on_step: Callable[[int, float], None] | None = None,
                   on_epoch: Callable[[dict], None] | None = None) -> None:
        """Train epochs ``done + 1 .. epochs``: ``step`` on each of ``batches(epoch)``, then
        ``end_epoch(epoch, mean loss)``, whose record (None: nothing to report) goes to ``on_epoch``
        after the epoch's checkpoint. A resumed run hands the last checkpointed record to ``on_epoch`` once more:
        the kill (or a tracking server that stopped answering) may have come between the checkpoint and the report,
        so each report arrives at least once, a repeated one with the same values."""
        self._resume("epoch", epochs)
        if self.last_record is not None and on_epoch and self.lead:
            on_epoch(self.last_record)
        for epoch in range(self.done + 1, epochs + 1):
            bar = progress(batches(epoch), desc=f"{self.desc} epoch {epoch}/{epochs}", unit="batch",
                           disable=not self.lead)
            total, count = 0.0, 0
            for batch in bar:
                loss = self._step(step, batch, bar)
                total, count = total + loss, count + 1
                if on_step and self.lead:
                    on_step(self.steps, loss)
            record = end_epoch(epoch, total / count)
            self.done, self.last_record = epoch, record
            self._save()
            if on_epoch and self.lead and record is not None:
                on_epoch(record)

    def run_steps(self, steps: int, step: Callable[[int], float], *, every: int = 1,
                  on_step: Callable[[int, float], None] | None = None) -> None:
        """Train optimiser steps ``done .. steps - 1`` (``step`` gets the index and picks its own data),
        checkpointing every ``every`` steps and after the last, each before ``on_step`` hears of it."""
        self._resume("step", steps)
        bar = progress(range(self.done, steps), desc=self.desc, unit="step", initial=self.done, total=steps,
                       disable=not self.lead)
        for index in bar:
            loss = self._step(step, index, bar)
            self.done = self.steps
            if self.done % every == 0 or self.done == steps:
                self._save()
            if on_step and self.lead:
                on_step(self.done, loss)

    def _step(self, step: Callable[[Any], float], batch: Any, bar: tqdm) -> float:
        loss = step(batch)
        self.steps += 1
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        return loss

    def _resume(self, unit: str, length: int) -> None:
        if not self.path.exists():
            return
        # To the CPU: load_state_dict moves each tensor to its object's device, and RNG states must stay there.
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        if saved.get("recipe") != self.recipe:
            raise CheckpointMismatchError(
                f"{self.path} is a checkpoint of {saved.get('recipe')!r}, not of {self.recipe!r}: "
                "another trainer's run is in this directory; train elsewhere, or delete the file to start over")
        if saved["settings"] != self.settings:
            if self.lead:
                tqdm.write(f"{self.path} was made with other settings: training {self.desc} from the start")
            return
        for name, target in self.objects.items():
            if isinstance(target, torch.Generator):
                target.set_state(saved["objects"][name])
            else:
                target.load_state_dict(saved["objects"][name])
        set_rng_state(saved["rng"])
        self.extra.update(saved["extra"])
        self.done, self.steps, self.last_record = saved["done"], saved["steps"], saved.get("last_record")
        if self.lead:
            tqdm.write(f"resuming {self.desc} after {unit} {self.done}/{length}")

    def finish(self) -> None:
        """Training is over and its outputs are written: the checkpoint goes, so a re-run whose outputs were
        deleted (``dvc repro`` deletes a stage's outputs first) trains anew instead of finding nothing to do."""
        if self.lead:
            self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        if not self.lead:
            return
        objects = {name: target.get_state() if isinstance(target, torch.Generator) else target.state_dict()
                   for name, target in self.objects.items()}
        torch_save({"recipe": self.recipe, "settings": self.settings, "done": self.done, "steps": self.steps,
                    "objects": objects, "rng": rng_state(), "extra": self.extra, "last_record": self.last_record},
                   self.path)

