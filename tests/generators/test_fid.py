"""FID: the Fréchet distance against its closed form and scipy's sqrtm, the offline Inception features on real
Fashion-MNIST, the real set's statistics cache. Inception takes 0.07-0.7 s an image on two (shared) CPU cores:
the tests embed 41 images."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch

from tckr.generators.fid import (
    FeatureStatistics,
    FidError,
    InceptionFeatures,
    fid,
    fid_cache_dir,
    frechet_distance,
    real_statistics,
)

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def gaussian(mean: np.ndarray, covariance: np.ndarray, count: int = 100) -> FeatureStatistics:
    return FeatureStatistics(mean, covariance, count)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=6), rng.normal(size=6)
    variance_a, variance_b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum(variance_a + variance_b - 2 * np.sqrt(variance_a * variance_b))
    distance = frechet_distance(gaussian(mean_a, np.diag(variance_a)), gaussian(mean_b, np.diag(variance_b)))
    assert distance == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_is_symmetric_and_zero_between_equal_statistics():
    rng = np.random.default_rng(1)
    a = FeatureStatistics.of(rng.normal(size=(40, 8)))
    b = FeatureStatistics.of(rng.normal(1.0, 2.0, size=(40, 8)))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_survives_covariances_of_fewer_samples_than_dimensions():
    rng = np.random.default_rng(2)
    a, b = FeatureStatistics.of(rng.normal(size=(3, 10))), FeatureStatistics.of(rng.normal(size=(4, 10)))
    assert np.isfinite(frechet_distance(a, b))


@pytest.mark.parametrize("samples", [20, 200], ids=["fewer-samples-than-dimensions", "full-rank"])
def test_frechet_distance_agrees_with_the_sqrtm_formula(samples):
    """The reference implementations' ``tr(sqrtm(cov_a @ cov_b))``, at 64-d where sqrtm is quick."""
    rng = np.random.default_rng(samples)
    a = FeatureStatistics.of(rng.gamma(1.0, size=(samples, 64)) @ rng.normal(size=(64, 64)))
    b = FeatureStatistics.of(rng.gamma(2.0, size=(samples, 64)) @ rng.normal(size=(64, 64)))
    root = scipy.linalg.sqrtm(a.covariance @ b.covariance)
    mean_gap = a.mean - b.mean
    expected = mean_gap @ mean_gap + np.trace(a.covariance + b.covariance - 2 * root.real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_statistics_of_different_sizes():
    with pytest.raises(FidError, match="different feature sizes"):
        frechet_distance(gaussian(np.zeros(3), np.eye(3)), gaussian(np.zeros(4), np.eye(4)))


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(CPU, batch_size=7)


@pytest.fixture(scope="module")
def real_images(fmnist_arrays) -> torch.Tensor:
    """20 real images, uint8 [20, 1, 28, 28]: two per class, a class's pair side by side."""
    images, labels = fmnist_arrays["train"]
    keep = np.concatenate([np.flatnonzero(labels == label)[:2] for label in range(10)])
    return torch.from_numpy(images[keep]).unsqueeze(1)


@pytest.fixture(scope="module")
def real_features(inception, real_images) -> np.ndarray:
    return inception(real_images)


def test_features_are_2048_finite_and_independent_of_batching_and_of_grey_as_rgb(
        inception, real_images, real_features, monkeypatch):
    assert real_features.shape == (20, 2048) and real_features.dtype == np.float64
    assert np.isfinite(real_features).all() and real_features.std(axis=0).max() > 0.1
    monkeypatch.setattr(inception, "batch_size", 3)
    np.testing.assert_allclose(inception(real_images[:7]), real_features[:7], atol=1e-4, rtol=1e-4)
    as_rgb = real_images[:3].expand(-1, 3, -1, -1)
    np.testing.assert_allclose(inception(as_rgb), real_features[:3], atol=1e-5, rtol=1e-5)


def test_features_reject_images_that_are_not_uint8_grey_or_rgb(inception):
    with pytest.raises(FidError, match="uint8"):
        inception(torch.zeros(2, 1, 28, 28))
    with pytest.raises(FidError, match="1 or 3 channels"):
        inception(torch.zeros(2, 4, 28, 28, dtype=torch.uint8))


def test_bfloat16_features_stay_close_to_float32_ones(real_images, real_features):
    in_bfloat16 = InceptionFeatures(CPU, batch_size=7, dtype=torch.bfloat16)(real_images[:3])
    change = np.abs(in_bfloat16 - real_features[:3]).max() / np.abs(real_features[:3]).max()
    assert 0 < change < 0.1


def test_features_take_float32_or_bfloat16_only():
    with pytest.raises(FidError, match="dtype"):
        InceptionFeatures(CPU, dtype=torch.float16)


def test_missing_inception_package_says_to_run_setup(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FidError, match="make setup"):
        InceptionFeatures(CPU)


def test_fid_between_real_halves_is_far_below_real_against_noise(inception, real_features):
    first_half = FeatureStatistics.of(real_features[0::2])
    second_half = FeatureStatistics.of(real_features[1::2])
    noise = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    between_halves = frechet_distance(first_half, second_half)
    against_noise = fid(first_half, noise, inception)
    print(f"FID real half vs real half: {between_halves:.1f}, real half vs noise: {against_noise:.1f}")
    assert 0 < between_halves < against_noise / 2


class CountingFeatures:
    """Stands in for Inception: a few pixels as features, and how often it was asked."""

    dtype = torch.float32

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.calls += 1
        return images.flatten(1)[:, 300:308].double().numpy()


def test_real_statistics_are_computed_once_then_read_from_the_cache(real_images, tmp_path, monkeypatch):
    monkeypatch.setenv("TCKR_CACHE", str(tmp_path))
    counting = CountingFeatures()
    computed = real_statistics(real_images, "fmnist-train.v1", counting)
    cached = real_statistics(real_images, "fmnist-train.v1", counting)
    assert counting.calls == 1
    assert sorted(path.name for path in fid_cache_dir().iterdir()) == ["fmnist-train.v1-float32.npz"]
    np.testing.assert_array_equal(cached.mean, computed.mean)
    np.testing.assert_array_equal(cached.covariance, computed.covariance)
    assert cached.count == computed.count == 20


def test_real_statistics_refuse_a_key_that_is_not_a_file_name(real_images):
    with pytest.raises(FidError, match="file name"):
        real_statistics(real_images, "../escape", CountingFeatures())
