"""Training loop, metrics, and the vmap/loop and scan/host variants agreeing."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from sersynth import train
from sersynth.models import ModelSpec, flat_model


def test_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2])
    cm = train.confusion(y, p, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert train.uar(y, p, 3) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert train.wa(y, p) == pytest.approx(5 / 7)
    # a class absent from the ground truth does not count in UAR
    assert train.uar(np.array([0, 0]), np.array([0, 1]), 3) == pytest.approx(0.5)


def _toy(n=48, shape=(12, 8), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, :, :classes] += 2.0 * np.eye(classes, dtype=np.float32)[y][:, None, :]
    return x, y


@pytest.fixture(scope="module")
def toy_model():
    return flat_model(ModelSpec(name="convnet", width=4, depth=1, n_classes=3, input_shape=(12, 8)))


def test_training_learns_a_separable_problem(toy_model):
    x, y = _toy()
    cfg = train.TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, epochs=15, batch_size=16)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 2))
    params, losses, traj = train.fit(toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(1), record=True)
    assert losses.shape == (2, 15) and np.all(losses[:, -1] < 0.5 * losses[:, 0])
    assert traj.shape == (2, 16, toy_model.n_params)
    np.testing.assert_allclose(traj[:, 0], init)
    np.testing.assert_allclose(traj[:, -1], params, rtol=1e-6)
    assert min(train.uar(y, p, 3) for p in train.predict(toy_model, params, x)) > 0.9


def test_parallel_and_epoch_modes_agree(toy_model):
    """vmap/loop and scan/host are the same computation. (SGD: Adam's update divides by sqrt of tiny
    second moments early on, which amplifies float reassociation differences between the programs.)"""
    x, y = _toy()
    cfg = train.TrainConfig(optimizer="sgd", momentum=0.9, lr=0.01, epochs=2, batch_size=16, augment=True,
                            lr_decay=0.5, lr_decay_every=1)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 2))
    outs = [train.fit(toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(3), parallel=par,
                      epoch_mode=mode)[0] for par in ("vmap", "loop") for mode in ("scan", "host")]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=2e-4, atol=2e-5)


def test_scoring_models_vmapped_or_one_by_one_agree(toy_model):
    """``logits`` of several models: one vmapped program (accelerators) or one model after another
    (the CPU default), chunked over the data; each model's own logits either way, in model order."""
    x, _ = _toy()
    params = toy_model.init_many(jax.random.split(jax.random.key(5), 3))
    alone = np.stack([np.asarray(toy_model.apply(p, jax.numpy.asarray(x))) for p in params])
    for parallel in ("vmap", "loop"):
        np.testing.assert_allclose(train.logits(toy_model, params, x, chunk=7, parallel=parallel), alone,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="parallel must be one of"):
        train.logits(toy_model, params, x, parallel="pmap")


def test_train_config_validation():
    with pytest.raises(ValueError, match="--expert_optimizer must be sgd or adam"):
        train.TrainConfig(optimizer="lion").validate("expert_")
    with pytest.raises(ValueError, match="lr must be > 0"):
        train.TrainConfig(lr=0).validate()


def test_herding_tracks_the_class_mean():
    from sersynth.evaluate import herding, herding_subset, random_subset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    picked = herding(x, 10)
    assert len(set(picked.tolist())) == 10
    assert picked[0] == np.argmin(np.sum((x - x.mean(0)) ** 2, axis=1))      # nearest to the mean first
    herd_err = np.linalg.norm(x[picked].mean(0) - x.mean(0))
    rand_err = np.mean([np.linalg.norm(x[rng.choice(200, 10, replace=False)].mean(0) - x.mean(0)) for _ in range(50)])
    assert herd_err < 0.5 * rand_err
    y = np.arange(200) % 4
    idx = herding_subset(x, y, 3, 4)
    assert np.array_equal(np.bincount(y[idx]), [3, 3, 3, 3])
    assert np.array_equal(np.bincount(y[random_subset(y, 3, 4, rng)]), [3, 3, 3, 3])


def test_fits_share_one_compilation_across_learning_rates(toy_model):
    x, y = _toy()
    t = train.one_hot(y, 3)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 1))
    cfg = train.TrainConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=16, lr_decay=0.5, lr_decay_every=1)
    a = train.fit(toy_model, dataclasses.replace(cfg, lr=0.05), x, t, init, jax.random.key(2), parallel="loop")[0]
    compiled = len(train._COMPILED)
    b = train.fit(toy_model, cfg, x, t, init, jax.random.key(2), parallel="loop", lr=0.05)[0]
    frozen = train.fit(toy_model, dataclasses.replace(cfg, epochs=3), x, t, init, jax.random.key(2),
                       parallel="loop", lr=0.0)[0]
    assert len(train._COMPILED) == compiled
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(frozen, init)
    # scaling the update of a tx built with lr 1 equals building it with the lr (Adam with decay)
    tx = train.make_optimizer(cfg, 3, lr=0.05)
    g = jax.numpy.ones(toy_model.n_params)
    u, _ = tx.update(g, tx.init(init[0]), init[0])
    tx1 = train.make_optimizer(cfg, 3, lr=1.0)
    u1, _ = tx1.update(g, tx1.init(init[0]), init[0])
    np.testing.assert_allclose(u, 0.05 * u1, rtol=1e-6)


def test_epoch_batches_keep_the_partial_batch():
    ids, mask = train.epoch_batches(jax.random.key(0), 10, 4)
    assert ids.shape == mask.shape == (3, 4)
    assert sorted(np.asarray(ids)[np.asarray(mask) > 0].tolist()) == list(range(10))   # each sample once
    assert np.asarray(mask).sum() == 10 and np.asarray(mask)[-1].tolist() == [1, 1, 0, 0]


def test_min_steps_per_epoch_makes_an_epoch_of_several_passes(toy_model):
    """10 samples, batch 4, at least 7 steps: 7 full batches from consecutive permutations (each
    sample seen 2 or 3 times); the epoch trains 7 steps in both epoch modes, and the lr schedule
    counts those steps."""
    cfg = train.TrainConfig(optimizer="sgd", lr=0.1, epochs=2, batch_size=4, min_steps_per_epoch=7)
    assert cfg.steps_per_epoch(10) == 7 and train.TrainConfig(batch_size=4).steps_per_epoch(10) == 3
    assert train.TrainConfig(batch_size=4, min_steps_per_epoch=2).steps_per_epoch(10) == 3
    ids, mask = train.epoch_batches(jax.random.key(0), 10, 4, 7)
    assert ids.shape == (7, 4) and np.asarray(mask).all()
    counts = np.bincount(np.asarray(ids).ravel(), minlength=10)
    assert counts.sum() == 28 and counts.min() >= 2 and counts.max() <= 3
    assert sorted(np.asarray(ids)[:2].ravel().tolist() + np.asarray(ids)[2, :2].tolist()) == list(range(10))
    x, y = _toy(n=10)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 1))
    runs = [train.fit(toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(2), parallel="loop",
                      epoch_mode=mode)[0] for mode in ("scan", "host")]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-6)
    tx = train.make_optimizer(cfg, 7, lr=1.0)
    step = jax.jit(train.make_step(toy_model, tx, use_augment=False))
    p, o = init[0], tx.init(init[0])
    for e in range(2):
        kperm, kaug = jax.random.split(jax.random.fold_in(jax.random.split(jax.random.key(2), 1)[0], e))
        ids, mask = train.epoch_batches(kperm, 10, 4, 7)
        for i in range(7):
            p, o, _ = step(p, o, jax.numpy.asarray(x), jax.numpy.asarray(train.one_hot(y, 3)), ids[i], mask[i],
                           jax.random.fold_in(kaug, i), 0.1)
    np.testing.assert_allclose(runs[0][0], p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="min_steps_per_epoch"):
        train.TrainConfig(min_steps_per_epoch=-1).validate("expert_")


def test_padding_of_a_partial_batch_does_not_train(toy_model):
    """One step on a batch of 4 padded to 8 equals one step on the 4 alone."""
    x, y = _toy(n=8)
    t = train.one_hot(y, 3)
    tx = train.make_optimizer(train.TrainConfig(optimizer="sgd"), 1, lr=1.0)
    step = jax.jit(train.make_step(toy_model, tx, use_augment=False))
    p0 = toy_model.init(jax.random.key(0))
    padded = step(p0, tx.init(p0), x, t, jax.numpy.arange(8), jax.numpy.array([1.0] * 4 + [0.0] * 4),
                  jax.random.key(1), 0.1)
    alone = step(p0, tx.init(p0), x, t, jax.numpy.arange(4), jax.numpy.ones(4), jax.random.key(1), 0.1)
    np.testing.assert_allclose(padded[0], alone[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(padded[2], alone[2], rtol=1e-5)


def test_sharpness_aware_step_applies_the_gradient_of_the_ascent_point(toy_model):
    """SAM: the update is the gradient at p + rho * g / |g| (g the gradient at p), applied at p."""
    x, y = _toy(n=8)
    t = train.one_hot(y, 3)
    tx = train.make_optimizer(train.TrainConfig(optimizer="sgd"), 1, lr=1.0)
    p0 = toy_model.init(jax.random.key(0))
    f = lambda p: train.loss_fn(toy_model, p, jax.numpy.asarray(x), jax.numpy.asarray(t))
    g = jax.grad(f)(p0)
    expected = p0 - 0.1 * jax.grad(f)(p0 + 0.5 * g / jax.numpy.linalg.norm(g))
    args = (x, t, jax.numpy.arange(8), jax.numpy.ones(8), jax.random.key(1), 0.1)
    sam = jax.jit(train.make_step(toy_model, tx, use_augment=False, sam_rho=0.5))(p0, tx.init(p0), *args)[0]
    plain = jax.jit(train.make_step(toy_model, tx, use_augment=False))(p0, tx.init(p0), *args)[0]
    np.testing.assert_allclose(sam, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain, p0 - 0.1 * g, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(sam) - np.asarray(plain)).max() > 1e-4
    with pytest.raises(ValueError, match="expert_sam_rho"):
        train.TrainConfig(sam_rho=-1).validate("expert_")


def test_small_sets_get_every_sample_each_epoch(toy_model):
    """10 samples in batches of 4: 3 steps an epoch (a dropped partial batch would give 2)."""
    x, y = _toy(n=10)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 1))
    cfg = train.TrainConfig(optimizer="sgd", lr=0.1, epochs=1, batch_size=4)
    one_epoch = train.fit(toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(2), parallel="loop",
                          epoch_mode="scan")[0]
    tx = train.make_optimizer(cfg, 3, lr=1.0)
    step = jax.jit(train.make_step(toy_model, tx, use_augment=False))
    ek = jax.random.fold_in(jax.random.split(jax.random.key(2), 1)[0], 0)
    kperm, kaug = jax.random.split(ek)
    ids, mask = train.epoch_batches(kperm, 10, 4)
    p, o = init[0], tx.init(init[0])
    for i in range(3):
        p, o, _ = step(p, o, jax.numpy.asarray(x), jax.numpy.asarray(train.one_hot(y, 3)), ids[i], mask[i],
                       jax.random.fold_in(kaug, i), 0.1)
    np.testing.assert_allclose(one_epoch[0], p, rtol=1e-5, atol=1e-6)


def test_default_parallel_follows_backend_and_model_size(monkeypatch):
    assert train.default_parallel(1000) == "loop"                       # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert train.default_parallel(7_600) == "vmap"
    assert train.default_parallel(1_817_991) == "loop"


def test_best_on_validation_keeps_each_models_best_epoch(toy_model):
    from sersynth.evaluate import BestOnValidation, train_and_score

    x, y = _toy()
    cfg = train.TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, epochs=10, batch_size=16)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 2))
    trained = np.asarray(train.fit(toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(1))[0])
    best = BestOnValidation(toy_model, x, y, 3)
    best(1, np.stack([trained[0], np.asarray(init[1])]))
    best(2, np.stack([np.asarray(init[0]), trained[1]]))            # model 0 got worse, model 1 better
    np.testing.assert_array_equal(best.params, trained)
    assert best.epoch.tolist() == [1, 2]
    r = train_and_score("t", toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(1),
                        {"val": (x, y), "test": (x[:6], y[:6])}, 3, select_every=3)
    assert all(e in (3, 6, 9, 10) for e in r.extra["selected_epoch"])


def test_patience_stops_training_once_validation_stalls(toy_model):
    """With patience 2 and checks every epoch, a model trained at lr 0 (never improves) stops after
    3 epochs (the first check sets the best, two stale checks follow) instead of 20; a learning one
    keeps going while it improves."""
    from sersynth.evaluate import BestOnValidation, train_and_score

    x, y = _toy()
    cfg = train.TrainConfig(optimizer="sgd", lr=0.05, epochs=20, batch_size=16)
    init = toy_model.init_many(jax.random.split(jax.random.key(0), 2))
    sets = {"val": (x, y), "test": (x, y)}
    seen = []
    stalled = BestOnValidation(toy_model, x, y, 3, patience=2)
    train.fit(toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(1), lr=0.0, every=1,
              on_epochs=lambda e, p: seen.append(e) or stalled(e, p))
    assert seen == [1, 2, 3]
    r = train_and_score("t", toy_model, cfg, x, train.one_hot(y, 3), init, jax.random.key(1), sets, 3,
                        select_every=1, patience=2)
    assert max(r.extra["selected_epoch"]) > 3


def test_choose_lr_keeps_the_best_validation_lr():
    from sersynth.evaluate import Result, choose_lr

    def train_at(lr):
        v = {0.01: 0.4, 0.1: 0.7, 1.0: 0.7}[lr]                   # tie: the earlier candidate
        return Result("s", {"val": [v, v], "test": [0.0, 0.0]}, {"val": [v, v], "test": [0, 0]}, {}, 2.0, 5)

    r = choose_lr(train_at, [0.01, 0.1, 1.0])
    assert r.extra["lr"] == 0.1 and r.extra["lr_val_uar"] == {"0.01": 0.4, "0.1": 0.7, "1": 0.7}
    assert r.train_seconds == 6.0


def test_choose_lr_looks_beyond_the_largest_candidate_while_validation_rises():
    from sersynth.evaluate import Result, choose_lr

    def setting(scores):
        seen = []

        def train_at(lr):
            seen.append(lr)
            v = scores(lr)
            return Result("s", {"val": [v], "test": [0.0]}, {"val": [v], "test": [0]}, {}, 1.0, 5)
        return seen, train_at

    seen, at = setting(lambda lr: -abs(lr - 0.2))                          # rises up to lr 0.2, then falls
    r = choose_lr(at, [0.05, 0.01, 0.03], extend=3)
    assert seen == pytest.approx([0.05, 0.01, 0.03, 0.15, 0.45]) and r.extra["lr"] == pytest.approx(0.15)
    assert r.extra["lr_extended"] == 2 and r.train_seconds == 5.0 and len(r.extra["lr_val_uar"]) == 5
    seen, at = setting(lambda lr: lr)                                      # rises for ever: at most `extend` more
    assert choose_lr(at, [0.1, 0.3], extend=2).extra["lr"] == pytest.approx(2.7) and len(seen) == 4
    seen, at = setting(lambda lr: -lr)                                     # the best is inside the grid: no more
    r = choose_lr(at, [0.1, 0.3], extend=2)
    assert seen == [0.1, 0.3] and r.extra["lr"] == 0.1 and r.extra["lr_extended"] == 0
    seen, at = setting(lambda lr: lr)
    assert "lr_extended" not in choose_lr(at, [0.1, 0.3]).extra and seen == [0.1, 0.3]


def test_merge_seeds_keeps_scores_and_selected_epochs_in_seed_order():
    from sersynth.evaluate import Result, merge_seeds

    eye = [[1, 0], [0, 1]]
    runs = [Result("s", {"val": [v], "test": [v / 2]}, {"val": [v], "test": [v]}, {"val": eye, "test": eye},
                   1.5, 5, {"selected_epoch": [e]}) for v, e in ((0.2, 50), (0.6, 100))]
    m = merge_seeds("subset", runs, 5, {"lr": 0.1})
    assert m.uar == {"val": [0.2, 0.6], "test": [0.1, 0.3]} and m.train_seconds == 3.0
    assert m.extra == {"lr": 0.1, "selected_epoch": [50, 100]}
    assert m.confusion["val"] == [[2, 0], [0, 2]]


def test_k_center_picks_farthest_points_by_hand():
    from sersynth import evaluate

    pts = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 3.0], [4.9, 0.1], [-0.1, 0.1]])
    # starts nearest the mean (1.65, 0.53): [0.1, 0]; then the farthest from it, [5, 0]; then [0, 3]
    assert evaluate.k_center(pts, 3).tolist() == [1, 2, 3]
    y = np.array([0, 0, 0, 1, 1, 1])
    idx = evaluate.k_center_subset(pts, y, 2, 2)
    assert sorted(y[idx].tolist()) == [0, 0, 1, 1] and len(set(idx.tolist())) == 4


def test_embeddings_feed_the_head():
    from sersynth import evaluate

    for name in ("convnet", "cnn6"):
        fm = flat_model(ModelSpec(name=name, n_classes=3, input_shape=(16, 8), width=4, width_mult=0.0625, depth=1))
        p = fm.init(jax.random.key(0))
        x = np.random.default_rng(0).normal(size=(5, 16, 8)).astype(np.float32)
        e = evaluate.embeddings(fm, p, x, chunk=2)
        assert e.shape[0] == 5 and np.isfinite(e).all() and e.std() > 0
        # a different clip gives a different embedding, the same clip the same
        np.testing.assert_allclose(e[0], evaluate.embeddings(fm, p, x[:1])[0], rtol=1e-5, atol=1e-6)


def test_dm_moves_class_means_towards_the_real_ones():
    """DM from noise on a toy problem with class-dependent spectra: the synthetic set's class means
    end nearer the real class means than they started, and its matching loss falls."""
    import jax

    from sersynth import dm

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 30).astype(np.int32)
    x = (rng.normal(size=(90, 16, 8)) + 1.5 * np.linspace(-1, 1, 8)[None, None] * (y[:, None, None] - 1)).astype(np.float32)
    fm = flat_model(ModelSpec(name="convnet", n_classes=3, input_shape=(16, 8), width=8, depth=1, norm="none"))
    cfg = dm.DMConfig(ipc=2, iterations=60, lr_img=1.0, batch_real=16, init="noise", augment=False)
    x0 = dm.distill(fm, dataclasses.replace(cfg, iterations=0), x, y, 3)[0]
    xs, labels, info = dm.distill(fm, cfg, x, y, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and info["iterations"] == 60

    def gap(s):
        return sum(np.abs(s[labels == c].mean(axis=(0, 1)) - x[y == c].mean(axis=(0, 1))).mean() for c in range(3))

    assert gap(xs) < 0.7 * gap(x0)
    key = jax.random.key(3)
    params = fm.init(key)
    real = np.stack([x[y == c][:16] for c in range(3)])
    assert float(dm.matching_loss(fm, params, xs, real, 3)) < float(dm.matching_loss(fm, params, x0, real, 3))
    with pytest.raises(ValueError, match="--dm_lr_img must be > 0"):
        dm.DMConfig(lr_img=0).validate()


def test_kmeans_nearest_finds_each_cluster_and_its_nearest_rows():
    from sersynth.evaluate import kmeans_nearest

    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres])       # three blobs of 30, in order
    rows = kmeans_nearest(x, 3, 5, seed=1)
    assert rows.shape == (3, 5)
    blobs = rows // 30
    assert sorted(blobs[:, 0].tolist()) == [0, 1, 2]                  # one cluster per blob
    assert (blobs == blobs[:, :1]).all()                              # each cluster's rows from its own blob
    for r in rows:                                                    # the rows nearest the blob's mean, in order
        mean = x[r[0] // 30 * 30:(r[0] // 30 + 1) * 30].mean(0)
        d = np.sum((x - mean) ** 2, axis=1)
        np.testing.assert_array_equal(r, np.argsort(d)[:5])
    np.testing.assert_array_equal(kmeans_nearest(x, 3, 5, seed=1), rows)         # deterministic per seed
    few = kmeans_nearest(x[:4], 2, 6, seed=0)                      # fewer rows than m: each list repeats
    assert few.shape == (2, 6)
    for r in few:
        assert sorted(r[:4].tolist()) == [0, 1, 2, 3] and (r[4:] == r[:2]).all()
