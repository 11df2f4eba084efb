"""The synthetic-set audit on real Fashion-MNIST: a generator that copies members is flagged, one whose images are
fresh draws of the distribution is not, and the tests hold their level over repeated null splits."""

import numpy as np
import pytest
import torch

from tckr.privacy.audit import (
    audit_space,
    audit_synthetic,
    closest_records,
    equal_sized,
    pixel_embedding,
    worst_pairs_figure,
)
from tckr.privacy.config import AuditConfig

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(fmnist_head) -> torch.Tensor:
    """1,500 real 16 px images, uint8 ``[N, 1, 16, 16]``."""
    pixels = torch.tensor(fmnist_head[0]).float().unsqueeze(1)
    return torch.nn.functional.interpolate(pixels, size=16, mode="area").round().to(torch.uint8)


def test_closest_records_are_the_brute_force_nearest():
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(130, 7)), rng.normal(size=(90, 7))
    distances, indices = closest_records(torch.tensor(queries), torch.tensor(references), batch_size=50)
    brute = np.linalg.norm(queries[:, None] - references[None], axis=2)
    np.testing.assert_array_equal(indices, brute.argmin(axis=1))
    np.testing.assert_allclose(distances, brute.min(axis=1), rtol=1e-4)


def test_a_pixel_distance_is_the_rms_difference_in_grey_levels():
    image = torch.full((1, 1, 16, 16), 100, dtype=torch.uint8)
    distance, _ = closest_records(pixel_embedding(image + 3), pixel_embedding(image))
    assert distance[0] == pytest.approx(3 / 255, rel=1e-5)


def test_fresh_images_are_not_flagged_and_copies_are(images):
    train, holdout, fresh = images[:500], images[500:1000], images[1000:1500]
    cfg = AuditConfig(feature_size=32, batch_size=256)
    clean = audit_synthetic(fresh, train, holdout, cfg, CPU)
    for space in ("pixels", "features"):
        figures = clean[space].figures
        assert figures["flagged"] == 0.0, (space, figures)
        assert 0.4 < figures["closer_to_train_share"] < 0.6
        assert figures["near_copy_fraction"] < 0.05

    # Half the "generator's" images are members with their grey levels jittered by at most 2.
    jitter = torch.randint(-2, 3, train[:250].shape, generator=torch.Generator().manual_seed(0))
    copies = (train[:250].int() + jitter).clamp(0, 255).to(torch.uint8)
    copied = audit_synthetic(torch.cat([copies, fresh[:250]]), train, holdout, cfg, CPU)
    for space in ("pixels", "features"):
        figures = copied[space].figures
        assert figures["flagged"] == 1.0, (space, figures)
        assert figures["dcr_pvalue"] == figures["near_copy_pvalue"] == 1 / (1 + cfg.permutations)  # none as extreme
        assert figures["near_copy_fraction"] > 0.45 > 0.05 > figures["near_copy_fraction_holdout"], (space, figures)
        assert figures["dcr_train_median"] < figures["dcr_holdout_median"]
    # The worst pairs are the copies, each matched to the member it copies.
    worst = copied["pixels"].worst(12)
    assert (worst < 250).all()
    np.testing.assert_array_equal(copied["pixels"].nearest_train[worst], worst)


def test_the_tests_hold_their_level_when_nothing_is_copied(images):
    """Over 40 random splits of real images into train, holdout and "synthetic" thirds (the synthetic set
    exchangeable with both), a set is flagged at most alpha of the time: at alpha = 0.05, at most 6 flags
    (Binomial(40, 0.05) exceeds 6 with probability below 0.5%)."""
    cfg = AuditConfig(features="none", alpha=0.05)
    rng = np.random.default_rng(1)
    flagged, pvalues = 0, []
    for _ in range(40):
        order = torch.from_numpy(rng.permutation(1500))
        train, holdout, synthetic = (pixel_embedding(images[order[i:i + 500]]) for i in (0, 500, 1000))
        figures = audit_space("pixels", synthetic, train, holdout, cfg).figures
        flagged += int(figures["flagged"])
        pvalues.append(figures["dcr_pvalue"])
    assert flagged <= 6
    assert 0.2 < np.median(pvalues) < 0.8  # roughly uniform under the null


def test_a_generator_that_crowds_onto_a_few_images_is_not_flagged_by_chance(images):
    """Samples that are jittered copies of six images picked without regard to membership: the matches are as
    lopsided as six coin flips, which a test treating the 300 samples as independent would call a leak half the
    time. Relabelling keeps them together: six hubs all in train happen with probability 1/64, never below alpha."""
    cfg = AuditConfig(features="none")
    train, holdout = images[:500], images[500:1000]
    pool = torch.cat([train, holdout])
    rng = np.random.default_rng(0)
    for _ in range(10):
        hubs = pool[torch.from_numpy(rng.choice(1000, 6, replace=False))].repeat_interleave(50, dim=0)
        jitter = torch.from_numpy(rng.integers(-2, 3, hubs.shape))
        synthetic = (hubs.int() + jitter).clamp(0, 255).to(torch.uint8)
        figures = audit_space("pixels", *map(pixel_embedding, (synthetic, train, holdout)), cfg).figures
        assert figures["flagged"] == 0.0, figures
        assert figures["dcr_pvalue"] >= 1 / 64 - 0.01 and figures["hub_inflation"] == pytest.approx(50, rel=0.1)


def test_train_and_holdout_are_compared_at_the_same_size(images):
    with pytest.raises(ValueError, match="equal-sized"):
        audit_space("pixels", *(pixel_embedding(images[:n]) for n in (10, 20, 30)), AuditConfig())
    train, holdout = equal_sized(1000, 700, limit=0, seed=0)
    assert len(train) == len(holdout) == 700 and len(set(train)) == 700
    train, holdout = equal_sized(1000, 700, limit=300, seed=0)
    assert len(train) == len(holdout) == 300
    assert (train == equal_sized(1000, 700, limit=300, seed=0)[0]).all()


def test_the_worst_pairs_figure_shows_real_images_only_when_asked(images):
    """With the real images: synthetic, nearest member, nearest holdout image per column. Without (the default,
    ``tracking.log_real_images: false``): the synthetic row alone, no pixel of a real image in the figure."""
    train, holdout, synthetic = images[:100], images[100:200], images[200:300]
    audited = audit_space("pixels", *map(pixel_embedding, (synthetic, train, holdout)), AuditConfig())
    worst = audited.worst(5)
    figure = worst_pairs_figure(audited, synthetic, 5, (train, holdout))
    assert len(figure.axes) == 15
    np.testing.assert_array_equal(np.asarray(figure.axes[0].images[0].get_array()), synthetic[worst[0], 0].numpy())
    np.testing.assert_array_equal(np.asarray(figure.axes[5].images[0].get_array()),
                                  train[audited.nearest_train[worst[0]], 0].numpy())
    hidden = worst_pairs_figure(audited, synthetic, 5, None)
    assert len(hidden.axes) == 5 and "real images not shown" in hidden.texts[0].get_text()
    assert all(np.asarray(axis.images[0].get_array()).tolist() in [synthetic[i, 0].tolist() for i in worst]
               for axis in hidden.axes)
