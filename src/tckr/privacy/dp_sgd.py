"""DP-SGD with noise multiplicity: the private fine-tuning engine (PrivImage's, DP-LoRA's), loss-agnostic.

The caller supplies a loss of rows; this module owns everything that makes the result private: Poisson
sampling of examples, per-example clipping, Gaussian noise, and the accounting of each step. With noise
multiplicity K every sampled example becomes K consecutive rows (K draws of the caller's randomness, e.g.
diffusion noise), and its K per-row gradients are averaged *before* clipping, so one example moves the summed
gradient by at most ``max_grad_norm``, which is what the accountant assumes. Feeding the B·K rows to stock
Opacus instead clips each row: one example then counts K times (sensitivity K·C), a privacy bug.

Training goes through :class:`~tckr.training.loop.Loop`, one logical (Poisson) step per loop step. Every
random draw of step t (which examples, the loss's noise, the DP noise) comes from generators seeded by
``(seed, t)``, so a killed run resumes bit for bit. That makes ``seed`` part of the secret: whoever knows it
can regenerate, and subtract, the privacy noise.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tckr.core.errors import ConfigError, TckrError
from tckr.privacy.accounting import epsilon_spent, make_accountant
from tckr.training.ema import update_ema
from tckr.training.loop import Loop

History = list[tuple[float, float, int]]
LossRows = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]

# Independent random streams of one step, each seeded from (seed, step, stream).
_SAMPLING, _LOSS_NOISE, _DP_NOISE = range(3)


class NonPrivateStepError(TckrError, RuntimeError):
    """An optimiser step whose gradient was not clipped per example: taking it would void the privacy guarantee."""


class UnsupportedModelError(TckrError, ValueError):
    """A model whose per-example gradients are not separable (BatchNorm mixes the examples of a batch)."""


class MultiplicityDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` for batches whose examples are each ``multiplicity`` consecutive rows.

    Each example's per-row gradients are averaged before its norm is taken and clipped, so its contribution
    stays within ``max_grad_norm``; ``expected_batch_size`` counts examples, not rows. With multiplicity 1
    this is ``DPOptimizer`` exactly. Unlike ``DPOptimizer`` it refuses (:class:`NonPrivateStepError`) to step
    on a gradient that did not come through a ``GradSampleModule`` backward.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, multiplicity: int, **dp_options) -> None:
        if multiplicity < 1:
            raise ConfigError(f"noise multiplicity must be at least 1, not {multiplicity}")
        super().__init__(optimizer, **dp_options)
        self.multiplicity = multiplicity

    def _get_flat_grad_sample(self, p: torch.Tensor) -> torch.Tensor:
        """Per-row gradients of ``p``; their absence means the gradient was never made private."""
        if getattr(p, "grad_sample", None) is None:
            raise NonPrivateStepError(
                f"a trainable parameter of shape {tuple(p.shape)} has no per-sample gradient: the step would "
                "apply an unclipped, un-noised gradient. Compute the loss through the GradSampleModule-wrapped "
                "model (hooks enabled, model in training mode), and do not step without a backward")
        return super()._get_flat_grad_sample(p)

    def example_grads(self, p: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of ``p`` in its own dtype (fp32 where autocast made bf16 ones: a norm taken in
        bf16 is off by up to 0.4%, and the clipped sum could exceed C by as much): the mean over each example's
        ``multiplicity`` rows."""
        rows = self._get_flat_grad_sample(p).to(p.dtype)
        if self.multiplicity == 1:
            return rows
        if len(rows) % self.multiplicity:
            raise ValueError(f"{len(rows)} rows are not whole examples of {self.multiplicity} rows each")
        return rows.view(len(rows) // self.multiplicity, self.multiplicity, *rows.shape[1:]).mean(dim=1)

    def clip_and_accumulate(self) -> None:
        """``DPOptimizer.clip_and_accumulate`` on per-example instead of per-row gradients."""
        for p in self.params:
            try:
                _check_processed_flag(p.grad_sample)
            except ValueError as error:
                raise NonPrivateStepError("these per-sample gradients were already clipped and noised by an earlier "
                                          "step: run a new forward and backward before stepping again") from error
        example_grads = [self.example_grads(p) for p in self.params]
        norms = [g.flatten(1).norm(2, dim=-1) for g in example_grads]  # flatten: reshape(0, -1) fails on empty batches
        per_example_norms = torch.stack([n.to(norms[0].device) for n in norms], dim=1).norm(2, dim=1)
        clip_factor = (self.max_grad_norm / (per_example_norms + 1e-6)).clamp(max=1.0)
        for p, grads in zip(self.params, example_grads, strict=True):
            clipped = torch.einsum("i,i...", clip_factor.to(grads.device, p.dtype), grads)
            p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped
            _mark_as_processed(p.grad_sample)

    def no_examples(self) -> None:
        """An empty Poisson batch: zero per-example gradients, so the step still adds (and accounts) its noise."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))


@dataclass
class DPTrainingResult:
    losses: list[float]  # mean row loss per logical step (NaN for an empty batch); NOT private, for monitoring
    epsilon: float  # of the whole composed history, prior included
    history: History
    steps: int
    epochs: list[dict]  # every completed epoch's {"epoch", "epsilon", "loss"}, the same whether or not it resumed


def train_dp(model: nn.Module, loss_rows: LossRows, *, num_examples: int, sample_rate: float, steps: int,
             noise_multiplier: float, max_grad_norm: float, multiplicity: int, lr: float, physical_batch_size: int,
             seed: int, device: torch.device, checkpoint: Path, accountant: Literal["prv", "rdp"],
             prior_history: History, delta: float, ema: nn.Module | None = None, ema_decay: float = 0.999,
             steps_per_epoch: int | None = None, on_epoch: Callable[[dict], None] | None = None,
             resume_key: str = "", recipe: str = "tckr.dp_sgd", desc: str = "DP-SGD") -> DPTrainingResult:
    """DP-SGD (Adam) on the trainable parameters of ``model``: frozen ones are never touched (DP-LoRA).

    Each of ``steps`` logical steps Poisson-samples examples ``0..num_examples-1`` at ``sample_rate`` and
    repeats each ``multiplicity`` times; ``loss_rows(wrapped_model, rows, noise_rng)`` gets these example
    indices (a CPU tensor, each index ``multiplicity`` times in a row) and must return one loss per row,
    computed through ``wrapped_model`` (on ``device``) and drawing its randomness from the CPU generator
    ``noise_rng``. Physical batches hold at most ``physical_batch_size`` examples. ``prior_history`` (e.g. the
    PrivImage query, ``[(sigma_q, 1.0, 1)]``) is composed ahead of the steps. ``ema``, a copy of ``model``
    that ``ema_decay`` moves towards it after each step, and the accountant live in ``checkpoint``, which a
    later call with the same arguments (and ``resume_key``) resumes. Every ``steps_per_epoch`` steps
    (default ``1 / sample_rate``) ``on_epoch`` gets ``{"epoch", "epsilon", "loss"}``.
    """
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], not {sample_rate}")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trained:
        raise ConfigError("the model has no trainable parameters: nothing to train privately")
    steps_per_epoch = steps_per_epoch or max(1, round(1 / sample_rate))
    optimizer = MultiplicityDPOptimizer(
        torch.optim.Adam(trained.values(), lr=lr), multiplicity=multiplicity, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, expected_batch_size=max(1, round(sample_rate * num_examples)),
        loss_reduction="mean")
    privacy = make_accountant(accountant, [tuple(entry) for entry in prior_history])
    optimizer.attach_step_hook(privacy.get_optimizer_hook_fn(sample_rate=sample_rate))
    settings = json.dumps({
        "num_examples": num_examples, "sample_rate": sample_rate, "steps": steps,
        "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "multiplicity": multiplicity,
        "lr": lr, "physical_batch_size": physical_batch_size, "seed": seed, "accountant": accountant,
        "prior_history": [list(entry) for entry in prior_history], "trained": sorted(trained),
        "ema_decay": ema_decay if ema is not None else None, "resume_key": resume_key})
    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    objects = {"model": _TrainedParameters(trained), "optimizer": optimizer, "accountant": privacy}
    loop = Loop(checkpoint, recipe, settings, objects | ({"ema": ema} if ema is not None else {}),
                {"losses": []}, desc=desc)
    examples = TensorDataset(torch.arange(num_examples))

    def step(index: int) -> float:
        optimizer.generator = _generator(seed, index, _DP_NOISE, device)
        noise_rng = _generator(seed, index, _LOSS_NOISE, torch.device("cpu"))
        poisson = DataLoader(examples, collate_fn=_collate_indices, batch_sampler=UniformWithReplacementSampler(
            num_samples=num_examples, sample_rate=sample_rate, steps=1,
            generator=_generator(seed, index, _SAMPLING, torch.device("cpu"))))
        optimizer.zero_grad(set_to_none=True)
        loss_sum, row_count = 0.0, 0
        with BatchMemoryManager(data_loader=poisson, max_physical_batch_size=physical_batch_size,
                                optimizer=optimizer) as physical_batches:
            for batch in physical_batches:  # the last one takes the real step, the others only accumulate
                if len(batch) == 0:
                    optimizer.no_examples()
                else:
                    rows = batch.repeat_interleave(multiplicity)
                    losses = loss_rows(wrapped, rows, noise_rng)
                    if losses.shape != rows.shape:
                        raise ValueError(f"loss_rows must return one loss per row, {tuple(rows.shape)}, "
                                         f"not {tuple(losses.shape)}")
                    losses.mean().backward()
                    loss_sum, row_count = loss_sum + losses.detach().sum().item(), row_count + len(losses)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, ema_decay)
        step_loss = loss_sum / row_count if row_count else math.nan
        loop.extra["losses"].append(step_loss)
        return step_loss

    def epoch_row(epoch: int) -> dict:
        """An epoch's report from what a checkpoint keeps (the step losses) and the accountant's history up to the
        epoch's last step (the prior entries, then this run's sigma and rate for that many steps), so a resumed
        run reports the epochs before its kill exactly as an unbroken run does."""
        done = epoch * steps_per_epoch
        *prior, (sigma, rate, _) = [tuple(entry) for entry in privacy.history]
        sampled = [loss for loss in loop.extra["losses"][done - steps_per_epoch:done] if not math.isnan(loss)]
        return {"epoch": epoch, "epsilon": epsilon_spent([*prior, (sigma, rate, done)], delta, accountant),
                "loss": sum(sampled) / len(sampled) if sampled else math.nan}

    def report_epoch(done: int, _loss: float) -> None:
        if on_epoch is not None and done % steps_per_epoch == 0:
            on_epoch(epoch_row(done // steps_per_epoch))

    with _per_sample_gradients(model) as wrapped:
        loop.run_steps(steps, step, every=1, on_step=report_epoch)
    history = [tuple(entry) for entry in privacy.history]
    return DPTrainingResult(losses=loop.extra["losses"], epsilon=epsilon_spent(history, delta, accountant),
                            history=history, steps=loop.steps,
                            epochs=[epoch_row(epoch) for epoch in range(1, loop.steps // steps_per_epoch + 1)])


@contextmanager
def _per_sample_gradients(model: nn.Module) -> Iterator[GradSampleModule]:
    """``model`` in training mode (Opacus records activations only then) under Opacus's per-sample hooks,
    handed back as it came: its mode restored, hooks and per-sample gradients removed."""
    was_training = model.training
    model.train()
    try:
        _check_supported(model)
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            with warnings.catch_warnings():
                # The first layer's input (the images) needs no gradient; Opacus' hook there still records the
                # per-sample gradient of its weights, which is all it is for. PyTorch warns on every step.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                yield wrapped
        finally:
            wrapped.cleanup()
    finally:
        model.train(was_training)


def _check_supported(model: nn.Module) -> None:
    """Refuse what Opacus cannot clip per example: the modules its validator rejects, and BatchNorm even when
    frozen (in training mode it still mixes the batch's examples into every output)."""
    unsupported = [f"{name or 'the model'} ({type(module).__name__})" for name, module in model.named_modules()
                   if isinstance(module, nn.modules.batchnorm._BatchNorm)
                   or (any(p.requires_grad for p in module.parameters(recurse=False))
                       and ModuleValidator.VALIDATORS.get(type(module), lambda _: [])(module))]
    if unsupported:
        raise UnsupportedModelError(
            f"DP-SGD cannot clip per example through {', '.join(unsupported)}: replace BatchNorm with GroupNorm, "
            "and LSTM, GRU or MultiheadAttention with Opacus's DP versions (opacus.validators.ModuleValidator.fix)")


@dataclass
class _TrainedParameters:
    """The trained parameters only (all of them, or just a LoRA adapter's): the model's share of a checkpoint."""

    parameters: dict[str, nn.Parameter]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.parameters.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, p in self.parameters.items():
            p.copy_(state[name])


def _generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator for one stream of one step, independent of every other (seed, step, stream)."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def _collate_indices(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    """Example indices of one physical batch; a Poisson batch may be empty."""
    return torch.stack([index for (index,) in items]) if items else torch.zeros(0, dtype=torch.long)
