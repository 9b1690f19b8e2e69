"""Trajectory matching: gradients, tracing, memory, learning, guards, checkpoints."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sersynth import distill, train
from sersynth.models import ModelSpec, flat_model
from tests.test_train import _toy

SHAPE = (12, 8)


@pytest.fixture(scope="module")
def setup():
    fm = flat_model(ModelSpec(name="convnet", width=4, depth=1, n_classes=3, input_shape=SHAPE))
    x, y = _toy(n=48, shape=SHAPE)
    cfg = train.TrainConfig(optimizer="sgd", lr=0.05, epochs=6, batch_size=16)
    init = fm.init_many(jax.random.split(jax.random.key(0), 2))
    _, _, traj = train.fit(fm, cfg, x, train.one_hot(y, 3), init, jax.random.key(1), record=True)
    return fm, x, y, traj


def _loss_and_grad(fm, cfg, state, traj, loop):
    start, target = jnp.asarray(traj[0, 1]), jnp.asarray(traj[0, 1 + cfg.expert_epochs])
    return jax.value_and_grad(distill.matching_loss, argnums=2)(
        fm, cfg, state.params, state.labels, start, target, jax.random.key(9), 3, loop=loop)


@pytest.mark.parametrize("remat,batch_syn,augment,learn_labels,unroll", [
    ("none", 0, False, False, 0), ("step", 4, True, False, 0), ("nested", 4, True, True, 0),
    ("nested", 0, False, False, 1)])
def test_scan_gradient_matches_unrolled_reference(setup, remat, batch_syn, augment, learn_labels, unroll):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=6, expert_epochs=2, max_start_epoch=2, batch_syn=batch_syn,
                                augment=augment, learn_labels=learn_labels, remat=remat, lr_init=0.05,
                                unroll=unroll)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))
    loss, grads = _loss_and_grad(fm, cfg, state, traj, distill.inner_loop)
    ref_loss, ref_grads = _loss_and_grad(fm, cfg, state, traj, distill.unrolled_inner_loop)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-3, atol=1e-6 * float(jnp.abs(ref_grads[k]).max()))
    assert float(jnp.abs(grads["x"]).max()) > 0 and float(grads["log_lr"]) != 0


def test_gradient_matches_finite_differences(setup):
    """Central differences in float32 through ReLU kinks: tight for the scalar lr, looser along a
    random direction of the synthetic data (the unrolled-reference test above is the exact check)."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=3, expert_epochs=2, max_start_epoch=2, lr_init=0.05)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))
    _, grads = _loss_and_grad(fm, cfg, state, traj, distill.inner_loop)
    eps = 1e-2
    for leaf, rtol in (("log_lr", 5e-2), ("x", 0.25)):
        direction = jax.random.normal(jax.random.key(4), jnp.shape(state.params[leaf]))
        direction = direction / jnp.linalg.norm(direction.ravel())

        def at(t):
            p = dict(state.params)
            p[leaf] = p[leaf] + t * direction
            return _loss_and_grad(fm, cfg, state.replace(params=p), traj, distill.inner_loop)[0]

        fd = (at(eps) - at(-eps)) / (2 * eps)
        analytic = jnp.vdot(grads[leaf], direction)
        np.testing.assert_allclose(analytic, fd, rtol=rtol, atol=1e-4)


def test_outer_step_traces_once_and_learns(setup):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=4, expert_epochs=2, max_start_epoch=3, lr_img=30.0,
                                lr_init=0.05, lr_lr=0.01, iterations=40)
    step = jax.jit(chex.assert_max_traces(distill.make_outer_step(fm, cfg, 3), n=1))
    state = distill.init_state(cfg, x, y, 3, jax.random.key(5))
    traj = jnp.asarray(traj)
    losses, lrs = [], []
    for _ in range(cfg.iterations):
        state, m = step(state, traj, jax.random.key(6))
        losses.append(float(m["loss"]))
        lrs.append(float(m["lr"]))
    assert int(state.step) == cfg.iterations and int(state.n_nonfinite) == 0
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    assert min(lrs) > 0


def _temp_bytes(fm, cfg, x, y, traj):
    state = distill.init_state(cfg, x, y, 3, jax.random.key(0))
    compiled = jax.jit(distill.make_outer_step(fm, cfg, 3)).lower(state, jnp.asarray(traj), jax.random.key(1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_nested_remat_keeps_memory_flat_in_syn_steps():
    """Rolled scans (unroll=1, the accelerator default). Fully unrolled, XLA CPU schedules the
    recomputation so that nothing is saved; benchmarks/memory_vs_syn_steps.py measures both."""
    fm = flat_model(ModelSpec(name="convnet", width=16, depth=2, n_classes=3, input_shape=(16, 16)))
    x, y = _toy(n=30, shape=(16, 16))
    traj = np.zeros((1, 4, fm.n_params), np.float32)
    mem = {}
    for remat in ("none", "nested"):
        for steps in (10, 40):
            cfg = distill.DistillConfig(ipc=4, syn_steps=steps, expert_epochs=2, max_start_epoch=2, remat=remat,
                                        unroll=1)
            mem[remat, steps] = _temp_bytes(fm, cfg, x, y, traj)
    assert mem["nested", 40] < 2 * mem["nested", 10], mem
    assert mem["none", 40] > 2 * mem["none", 10], mem          # the bound is not trivially met


def test_nonfinite_loss_is_guarded(setup, tmp_path):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=1, max_start_epoch=2, iterations=4)
    bad = np.full_like(traj, np.nan)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(0))
    new, m = jax.jit(distill.make_outer_step(fm, cfg, 3))(state, jnp.asarray(bad), jax.random.key(1))
    assert not np.isfinite(float(m["loss"])) and int(new.n_nonfinite) == 1
    np.testing.assert_array_equal(new.params["x"], state.params["x"])
    with pytest.raises(distill.DistillDiverged, match="NaN/Inf by iteration 2"):
        distill.distill(fm, cfg, bad, x, y, 3, 0, checkpoint_path=tmp_path / "ck.npz", log_every=2, progress=False)
    assert not (tmp_path / "ck.npz").exists()


def test_resume_from_checkpoint_gives_the_same_result(setup, tmp_path):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=2, max_start_epoch=3, iterations=6, lr_img=10.0)
    full, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False)
    half = distill.DistillConfig(**{**cfg.__dict__, "iterations": 3})
    distill.distill(fm, half, traj, x, y, 3, 0, checkpoint_path=tmp_path / "ck.npz", checkpoint_every=3,
                    progress=False)
    resumed, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, checkpoint_path=tmp_path / "ck.npz", progress=False)
    assert int(resumed.step) == 6
    np.testing.assert_allclose(resumed.params["x"], full.params["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(resumed.params["log_lr"], full.params["log_lr"], rtol=1e-6)


@pytest.mark.parametrize("kw,stored,message", [
    (dict(ipc=0), None, "--ipc must be >= 1"),
    (dict(syn_steps=0), None, "--syn_steps must be >= 1"),
    (dict(max_start_epoch=30, expert_epochs=3), 20, "the experts store 20"),
    (dict(syn_steps=10, segment=3), None, "must divide --syn_steps"),
    (dict(remat="all"), None, "--remat must be one of"),
])
def test_config_errors(kw, stored, message):
    with pytest.raises(ValueError, match=message):
        distill.DistillConfig(**kw).validate(stored)


def test_segment_length_near_sqrt():
    assert distill.DistillConfig(syn_steps=16).segment_length() == 4
    assert distill.DistillConfig(syn_steps=20).segment_length() == 4
    assert distill.DistillConfig(syn_steps=7).segment_length() == 1
