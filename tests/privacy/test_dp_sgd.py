"""DP-SGD with noise multiplicity: each example's clipped contribution is bounded (against a torch.func
reference), K = 1 is stock Opacus, non-private steps are refused, and training resumes bit for bit with the
epsilon of the composed history."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad, vmap

from tckr.privacy.accounting import epsilon_spent
from tckr.privacy.dp_sgd import MultiplicityDPOptimizer, NonPrivateStepError, UnsupportedModelError, train_dp

pytestmark = [pytest.mark.unit,  # Opacus's hooks on a first layer whose input needs no gradient: expected
              pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")]

CPU = torch.device("cpu")
SIZE = 8


class TinyDenoiser(nn.Module):
    """Conv + GroupNorm + Linear: the layer kinds of a diffusion UNet, at a size that trains in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * SIZE * SIZE, SIZE * SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.silu(self.norm(self.conv(x)))
        return self.head(hidden.flatten(1)).view_as(x)


class LowRankAdapted(nn.Module):
    """A frozen base model plus a trainable low-rank pair beside it: DP-LoRA in miniature."""

    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        self.base = TinyDenoiser().requires_grad_(False)
        self.down = nn.Linear(SIZE * SIZE, rank, bias=False)
        self.up = nn.Linear(rank, SIZE * SIZE, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x.flatten(1))).view_as(x)


def make_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def denoising_loss_rows(images: torch.Tensor):
    """Per-row noise-prediction loss: each row of an example draws its own noise, as diffusion training does."""

    def loss_rows(model: nn.Module, rows: torch.Tensor, noise_rng: torch.Generator) -> torch.Tensor:
        noise = torch.randn(len(rows), 1, SIZE, SIZE, generator=noise_rng)
        return (model(images[rows] + noise) - noise).pow(2).mean(dim=(1, 2, 3))

    return loss_rows


def summed_clipped_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, multiplicity: int,
                         max_grad_norm: float, stock: bool = False, bf16: bool = False) -> list[torch.Tensor]:
    """What an optimiser with no noise sums for these rows: ours, or stock Opacus fed every row as an example;
    ``bf16``: the forward under bf16 autocast (per-sample gradients partly bf16)."""
    wrapped = GradSampleModule(copy.deepcopy(model))
    options = dict(noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=len(inputs) // multiplicity)
    base = torch.optim.SGD(wrapped.parameters(), lr=0.0)
    optimizer = DPOptimizer(base, **options) if stock else MultiplicityDPOptimizer(base, multiplicity=multiplicity,
                                                                                    **options)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        predictions = wrapped(inputs)
    (predictions.float() - targets).pow(2).mean(dim=(1, 2, 3)).mean().backward()
    optimizer.step()
    return [p.summed_grad for p in optimizer.params]


def test_multiplicity_averages_before_clipping_like_a_torch_func_reference():
    torch.manual_seed(0)
    model = TinyDenoiser()
    examples, multiplicity, max_grad_norm = 5, 4, 0.05
    noise = torch.randn(examples * multiplicity, 1, SIZE, SIZE)
    inputs = make_images(examples).repeat_interleave(multiplicity, dim=0) + noise

    params = {name: p.detach() for name, p in model.named_parameters()}

    def row_loss(params: dict, row_input: torch.Tensor, row_noise: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, params, (row_input[None],)) - row_noise[None]).pow(2).mean()

    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, inputs, noise)
    per_example = {name: g.view(examples, multiplicity, *g.shape[1:]).mean(dim=1) for name, g in per_row.items()}
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], dim=1).norm(dim=1)
    clip_factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    assert (clip_factor < 1).all()  # every example is clipped: the bound is what is being tested
    reference = [torch.einsum("i,i...", clip_factor, g) for g in per_example.values()]

    ours = summed_clipped_grads(model, inputs, noise, multiplicity=multiplicity, max_grad_norm=max_grad_norm)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

    for example in range(examples):  # one example alone: what it adds to the sum is within max_grad_norm
        rows = slice(example * multiplicity, (example + 1) * multiplicity)
        alone = summed_clipped_grads(model, inputs[rows], noise[rows], multiplicity=multiplicity,
                                     max_grad_norm=max_grad_norm)
        assert torch.cat([g.flatten() for g in alone]).norm() <= max_grad_norm * (1 + 1e-5)
        stock = summed_clipped_grads(model, inputs[rows], noise[rows], multiplicity=multiplicity,
                                     max_grad_norm=max_grad_norm, stock=True)
        assert torch.cat([g.flatten() for g in stock]).norm() > 2 * max_grad_norm  # K rows, K clipped gradients


@pytest.mark.parametrize("multiplicity", [1, 3])
def test_mixed_precision_clips_in_float32(multiplicity):
    """Under bf16 autocast some per-sample gradients are bf16; each example's clipped contribution is still
    within C, to fp32 rounding (a norm taken in bf16 would be off by up to 0.4%), and what is summed is fp32."""
    torch.manual_seed(3)
    model = TinyDenoiser()
    examples, max_grad_norm = 16, 1e-3
    noise = torch.randn(examples * multiplicity, 1, SIZE, SIZE)
    inputs = make_images(examples, seed=3).repeat_interleave(multiplicity, dim=0) + noise
    wrapped = GradSampleModule(copy.deepcopy(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped(inputs).float().sum().backward()
    assert {p.grad_sample.dtype for p in wrapped.parameters()} >= {torch.bfloat16}  # the case under test
    for example in range(examples):
        rows = slice(example * multiplicity, (example + 1) * multiplicity)
        alone = summed_clipped_grads(model, inputs[rows], noise[rows], multiplicity=multiplicity,
                                     max_grad_norm=max_grad_norm, bf16=True)
        assert {g.dtype for g in alone} == {torch.float32}
        assert torch.cat([g.flatten() for g in alone]).norm() <= max_grad_norm * (1 + 1e-6)


def test_multiplicity_one_is_stock_opacus():
    torch.manual_seed(1)
    model = TinyDenoiser()
    inputs, targets = make_images(6, seed=1), make_images(6, seed=2)
    results = []
    for stock in (True, False):
        wrapped = GradSampleModule(copy.deepcopy(model))
        options = dict(noise_multiplier=1.3, max_grad_norm=0.1, expected_batch_size=6,
                       generator=torch.Generator().manual_seed(7))
        base = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
        optimizer = DPOptimizer(base, **options) if stock else MultiplicityDPOptimizer(base, multiplicity=1, **options)
        for _ in range(2):
            (wrapped(inputs) - targets).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in wrapped.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_a_step_without_per_sample_gradients_is_refused():
    wrapped = GradSampleModule(TinyDenoiser())
    optimizer = MultiplicityDPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), multiplicity=2,
                                        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)
    inputs = make_images(4)

    with pytest.raises(NonPrivateStepError, match="no per-sample gradient"):
        optimizer.step()  # no backward at all

    wrapped.disable_hooks()  # a backward Opacus did not see: plain gradients only
    wrapped(inputs).pow(2).mean().backward()
    with pytest.raises(NonPrivateStepError, match="no per-sample gradient"):
        optimizer.step()

    optimizer.zero_grad()
    wrapped.enable_hooks()
    wrapped(inputs).pow(2).mean().backward()
    optimizer.step()
    with pytest.raises(NonPrivateStepError, match="already clipped"):
        optimizer.step()  # the same per-sample gradients twice

    outsider = nn.Parameter(torch.zeros(3))  # trained, but not part of the wrapped model
    optimizer = MultiplicityDPOptimizer(torch.optim.SGD([*wrapped.parameters(), outsider], lr=0.1), multiplicity=2,
                                        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)
    (wrapped(inputs).pow(2).mean() + outsider.sum()).backward()
    with pytest.raises(NonPrivateStepError):
        optimizer.step()


def run(model: nn.Module, tmp_path, loss_rows, **overrides):
    options = dict(num_examples=32, sample_rate=0.25, steps=6, noise_multiplier=1.1, max_grad_norm=0.5,
                   multiplicity=2, lr=1e-2, physical_batch_size=3, seed=11, device=CPU,
                   checkpoint=tmp_path / "dp.pt", accountant="rdp", prior_history=[(50.0, 1.0, 1)], delta=1e-5)
    return train_dp(model, loss_rows, **(options | overrides))


def test_resume_after_a_crash_is_bit_identical(tmp_path, capsys):
    torch.manual_seed(2)
    loss_rows = denoising_loss_rows(make_images(32))
    unbroken = TinyDenoiser()
    resumed = copy.deepcopy(unbroken)
    unbroken_ema, resumed_ema = copy.deepcopy(unbroken), copy.deepcopy(unbroken)
    expected = run(unbroken, tmp_path / "a", loss_rows, ema=unbroken_ema, accountant="prv", steps_per_epoch=2)

    calls = 0

    def crashing(model: nn.Module, rows: torch.Tensor, noise_rng: torch.Generator) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 9:  # part-way through a logical step, after a few physical batches
            raise KeyboardInterrupt
        return loss_rows(model, rows, noise_rng)

    with pytest.raises(KeyboardInterrupt):
        run(resumed, tmp_path / "b", crashing, ema=resumed_ema, accountant="prv", steps_per_epoch=2)
    assert not hasattr(next(resumed.parameters()), "grad_sample")  # handed back without Opacus's hooks
    reported = []
    got = run(resumed, tmp_path / "b", loss_rows, ema=resumed_ema, accountant="prv", steps_per_epoch=2,
              on_epoch=reported.append)
    assert "resuming DP-SGD after step 2/6" in capsys.readouterr().out

    assert all(torch.equal(a, b) for a, b in zip(unbroken.parameters(), resumed.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(unbroken_ema.parameters(), resumed_ema.parameters(), strict=True))
    assert got.history == expected.history and got.epsilon == expected.epsilon
    assert got.losses == expected.losses and got.steps == expected.steps == 6
    # Epoch 1 ended before the crash: the resumed run reports epochs 2 and 3 live, and returns all three as the
    # unbroken run does (what privacy.json records).
    assert [row["epoch"] for row in reported] == [2, 3] and got.epochs == expected.epochs
    assert [row["epoch"] for row in got.epochs] == [1, 2, 3] and got.epochs[-1]["epsilon"] == got.epsilon


def test_epsilon_is_the_composed_history_and_empty_batches_still_step(tmp_path):
    model = TinyDenoiser()
    before = [p.detach().clone() for p in model.parameters()]
    prior = [(50.0, 1.0, 1)]
    epochs = []
    result = run(model, tmp_path, denoising_loss_rows(make_images(16)), num_examples=16, sample_rate=0.02, steps=8,
                 steps_per_epoch=4, prior_history=prior, on_epoch=epochs.append)

    assert result.history == [*prior, (1.1, 0.02, 8)]
    assert result.epsilon == epsilon_spent([*prior, (1.1, 0.02, 8)], 1e-5, "rdp")
    assert any(math.isnan(loss) for loss in result.losses)  # a Poisson batch with no example
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # noise moved them
    assert [record["epoch"] for record in epochs] == [1, 2]
    assert epochs[0]["epsilon"] < epochs[1]["epsilon"] == result.epsilon
    assert json.dumps(result.epochs) == json.dumps(epochs)  # what it returns is what it reported (NaN included)


def test_ema_moves_once_per_logical_step(tmp_path):
    model = TinyDenoiser()
    ema, start = copy.deepcopy(model), copy.deepcopy(model)
    run(model, tmp_path, denoising_loss_rows(make_images(32)), steps=1, physical_batch_size=2, ema=ema,
        ema_decay=0.75)
    for average, first, last in zip(ema.parameters(), start.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(average, first.lerp(last, 0.25), rtol=0, atol=1e-7)


def test_frozen_parameters_never_change_dp_lora(tmp_path):
    model = LowRankAdapted()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(adapter) == ["down.weight", "up.weight"]
    run(model, tmp_path, denoising_loss_rows(make_images(32)), steps=3)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert all(not torch.equal(params[name], value) for name, value in adapter.items())


def test_batch_norm_is_refused_even_frozen(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2).requires_grad_(False))
    with pytest.raises(UnsupportedModelError, match=r"1 \(BatchNorm2d\)"):
        run(model, tmp_path, denoising_loss_rows(make_images(32)))
