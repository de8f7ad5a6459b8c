"""Metrics against brute force and known cases."""
from __future__ import annotations

import numpy as np
import pytest

from ciar.training.metrics import auroc, frechet_distance, precision_recall


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(4000, 3)) + np.array([2.0, 0, 0])
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.3)
    c = rng.normal(size=(4000, 3)) * 2.0  # same mean, std 2: 3 * (1 + 4 - 2*2) = 3
    assert frechet_distance(a, c) == pytest.approx(3.0, abs=0.3)


def test_precision_recall():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 4))
    same = rng.normal(size=(300, 4))
    p, r, f = precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    collapsed = rng.normal(size=(300, 4)) * 0.1  # inside the real manifold, covering little of it
    p, r, _ = precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.5
    far = rng.normal(size=(300, 4)) + 20
    p, r, f = precision_recall(real, far)
    assert p == 0 and r == 0 and f == 0


def test_auroc_against_brute_force():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, size=200).astype(float)
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(brute)
    assert auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    with pytest.raises(ValueError):
        auroc(np.ones(3), np.ones(3, bool))


def test_paired_quality_bootstrap_separates_a_real_difference_from_none():
    from ciar.training.evaluate import QualitySample, paired_quality_bootstrap

    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    close = QualitySample(real + 0.1 * rng.normal(size=real.shape), real, np.full(200, 0.9))
    far = QualitySample(real + 1.0 * rng.normal(size=real.shape), real, np.full(200, 0.7))
    twin = QualitySample(close.features.copy(), real, close.adherence.copy())
    boot = paired_quality_bootstrap({"close": close, "far": far, "twin": twin}, "close", 200, seed=1)
    assert boot["reference"] == "close" and set(boot["minus"]) == {"far", "twin"}
    far_d, twin_d = boot["minus"]["far"], boot["minus"]["twin"]
    assert far_d["fd"]["ci95"][1] < 0 and far_d["adherence"]["mean"] == pytest.approx(0.2)
    assert twin_d["fd"]["ci95"] == [0.0, 0.0] and twin_d["adherence"]["mean"] == 0.0
    # the same seed resamples the same prompts
    assert paired_quality_bootstrap({"close": close, "far": far}, "close", 50, 3) == \
        paired_quality_bootstrap({"close": close, "far": far}, "close", 50, 3)
    with pytest.raises(ValueError, match="same prompts"):
        paired_quality_bootstrap({"close": close, "short": QualitySample(real[:10], real[:10], np.ones(10))},
                                 "close", 10, 0)
    with pytest.raises(ValueError, match="no images of 'ciar'"):
        paired_quality_bootstrap({"close": close}, "ciar", 10, 0)
