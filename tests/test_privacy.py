"""Privacy audit: distances to the closest training clip and the membership-inference AUC."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from sersynth import privacy, train
from sersynth.models import ModelSpec, flat_model


def test_auc_by_hand():
    assert privacy.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert privacy.auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert privacy.auc(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert privacy.auc(np.array([2.0]), np.array([2.0])) == 0.5                # a tie counts half
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 400), rng.normal(0, 1, 300)
    brute = np.mean(a[:, None] > b[None]) + 0.5 * np.mean(a[:, None] == b[None])
    assert privacy.auc(a, b) == pytest.approx(brute)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(37, 5, 4)), rng.normal(size=(300, 5, 4))
    d, i = privacy.nearest(a, b, chunk=8)
    full = np.sqrt(((a.reshape(37, 1, -1) - b.reshape(1, 300, -1)) ** 2).mean(-1))
    np.testing.assert_array_equal(i, full.argmin(1))
    np.testing.assert_allclose(d, full.min(1), rtol=1e-6)


def test_dcr_flags_near_copies():
    rng = np.random.default_rng(2)
    train_x, hold = rng.normal(size=(200, 6, 4)), rng.normal(size=(100, 6, 4))
    copies = train_x[:10] + 0.01 * rng.normal(size=(10, 6, 4))
    fresh = rng.normal(size=(10, 6, 4))
    near = privacy.dcr(copies, train_x, hold)
    far = privacy.dcr(fresh, train_x, hold)
    assert near["frac_synthetic_below_holdout_p1"] == 1.0 and near["nearest_train_index"] == list(range(10))
    assert far["frac_synthetic_below_holdout_p1"] <= 0.2
    assert near["median_synthetic"] < 0.05 < far["median_synthetic"]


def test_membership_auc_detects_a_memorising_model():
    """A model that fit random labels on its members assigns them low loss: AUC near 1; before
    training, members and non-members look alike: AUC near 0.5."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(160, 8, 6)).astype(np.float32)
    y = rng.integers(0, 4, 160).astype(np.int32)
    fm = flat_model(ModelSpec(name="convnet", n_classes=4, input_shape=(8, 6), width=32, depth=1, norm="none"))
    init = fm.init_many(jax.random.split(jax.random.key(0), 2))
    cfg = train.TrainConfig(optimizer="adam", lr=3e-3, epochs=150, batch_size=80, augment=False)
    trained, _, _ = train.fit(fm, cfg, x[:80], train.one_hot(y[:80], 4), init, jax.random.key(1))
    before = privacy.membership_auc(fm, init, (x[:80], y[:80]), (x[80:], y[80:]), n=80)
    after = privacy.membership_auc(fm, trained, (x[:80], y[:80]), (x[80:], y[80:]), n=80)
    assert abs(before["auc_mean"] - 0.5) < 0.15
    assert after["auc_mean"] > 0.9 and after["loss_gap"] > 0


def test_mix_initialisation_starts_from_no_single_recording():
    from sersynth import distill

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 40).astype(np.int32)
    x = (rng.normal(size=(120, 10, 6)) + y[:, None, None]).astype(np.float32)   # class-dependent offset
    real = distill.init_state(distill.DistillConfig(ipc=5, init="real"), x, y, 3, jax.random.key(0))
    mix = distill.init_state(distill.DistillConfig(ipc=5, init="mix", init_mix=8), x, y, 3, jax.random.key(0))
    d_real = privacy.dcr(np.asarray(real.params["x"]), x, x[:10])
    d_mix = privacy.dcr(np.asarray(mix.params["x"]), x, x[:10])
    assert d_real["median_synthetic"] == pytest.approx(0, abs=1e-3)                   # copies of clips
    assert d_mix["min_synthetic"] > 0.5                                              # no clip is near
    xm, lab = np.asarray(mix.params["x"]), np.asarray(mix.labels)
    for c in range(3):                                   # still class-typical: nearest class mean is its own
        means = np.stack([x[y == k].mean(0) for k in range(3)])
        d = ((xm[lab == c][:, None] - means[None]) ** 2).mean(axis=(2, 3))
        assert np.all(d.argmin(1) == c)
    np.testing.assert_allclose(xm.std(axis=(1, 2)), x.std(axis=(1, 2)).mean(), rtol=0.35)
    with pytest.raises(ValueError, match="--syn_init_mix must be >= 1"):
        distill.DistillConfig(init="mix", init_mix=0).validate()
