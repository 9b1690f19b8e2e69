"""Trajectory matching: gradients, tracing, memory, learning, guards, checkpoints."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sersynth import distill, privacy, train
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
    assert float(jnp.abs(grads["x"]).max()) > 0 and float(grads["lr"]) != 0


def test_gradient_matches_finite_differences(setup):
    """Central differences in float32 through ReLU kinks: tight for the scalar lr, looser along a
    random direction of the synthetic data (the unrolled-reference test above is the exact check)."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=3, expert_epochs=2, max_start_epoch=2, lr_init=0.05)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))
    _, grads = _loss_and_grad(fm, cfg, state, traj, distill.inner_loop)
    for leaf, rtol in (("lr", 5e-2), ("x", 0.25)):
        direction = jax.random.normal(jax.random.key(4), jnp.shape(state.params[leaf]))
        direction = direction / jnp.linalg.norm(direction.ravel())

        def at(t):
            p = dict(state.params)
            p[leaf] = p[leaf] + t * direction
            return _loss_and_grad(fm, cfg, state.replace(params=p), traj, distill.inner_loop)[0]

        eps = 1e-3 if leaf == "lr" else 1e-2
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
    np.testing.assert_allclose(resumed.params["lr"], full.params["lr"], rtol=1e-6)


@pytest.mark.parametrize("kw,stored,message", [
    (dict(ipc=0), None, "--ipc must be >= 1"),
    (dict(syn_steps=0), None, "--syn_steps must be >= 1"),
    (dict(max_start_epoch=30, expert_epochs=3), 20, "the experts store 20"),
    (dict(min_start_epoch=5, max_start_epoch=5), None, r"--min_start_epoch must be in \[0, --max_start_epoch=5\)"),
    (dict(syn_steps=10, segment=3), None, "must divide --syn_steps"),
    (dict(remat="all"), None, "--remat must be one of"),
    (dict(label_init="expert"), None, "expert needs --learn_labels"),
    (dict(learn_labels=True, label_init="teacher"), None, "--label_init must be one of onehot, expert"),
])
def test_config_errors(kw, stored, message):
    with pytest.raises(ValueError, match=message):
        distill.DistillConfig(**kw).validate(stored)


def test_segment_length_near_sqrt():
    assert distill.DistillConfig(syn_steps=16).segment_length() == 4
    assert distill.DistillConfig(syn_steps=20).segment_length() == 4
    assert distill.DistillConfig(syn_steps=7).segment_length() == 1


def _single_start(traj):
    """One expert whose only start epoch is 0: the outer step's draws are then fixed."""
    return jnp.asarray(traj[:1])


def test_start_epochs_are_drawn_from_the_window(setup):
    """``min_start_epoch <= s < max_start_epoch`` (DATM's window for larger sets): every epoch of the
    window is drawn and none outside it."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=1, min_start_epoch=2, max_start_epoch=4,
                                lr_init=0.05, lr_img=10.0)
    cfg.validate(traj.shape[1] - 1)
    step = jax.jit(distill.make_outer_step(fm, cfg, 3))
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))
    drawn = []
    for _ in range(16):
        state, m = step(state, jnp.asarray(traj), jax.random.key(3))
        drawn.append(int(m["start_epoch"]))
    assert set(drawn) == {2, 3}


def test_lr_update_is_mtts_sgd_with_momentum_on_the_raw_lr(setup):
    """Two outer steps' lr updates equal MTT's by hand: v = 0.5 v + dL/dlr, lr -= lr_lr v, with
    dL/dlr from central differences of the unrolled reference loss."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_init=0.05,
                                lr_lr=1e-3, lr_img=10.0)
    traj = _single_start(traj)
    step = jax.jit(distill.make_outer_step(fm, cfg, 3))
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))

    def fd_lr_grad(params, eps=1e-3):
        def at(lr):
            return distill.matching_loss(fm, cfg, {**params, "lr": jnp.float32(lr)}, state.labels, traj[0, 0],
                                         traj[0, cfg.expert_epochs], jax.random.key(0), 3,
                                         loop=distill.unrolled_inner_loop)
        lr = float(params["lr"])
        return (float(at(lr + eps)) - float(at(lr - eps))) / (2 * eps)

    g1 = fd_lr_grad(state.params)
    s1, m1 = step(state, traj, jax.random.key(6))
    assert float(m1["lr_grad"]) == pytest.approx(g1, rel=2e-2)
    assert float(s1.params["lr"]) == pytest.approx(0.05 - 1e-3 * g1, rel=1e-3)
    g2 = fd_lr_grad(s1.params)
    s2, _ = step(s1, traj, jax.random.key(6))
    assert float(s2.params["lr"]) == pytest.approx(float(s1.params["lr"]) - 1e-3 * (0.5 * g1 + g2), rel=1e-3)
    assert abs(float(s2.params["lr"]) - 0.05) > 1e-4        # it moves


def test_lr_floor_keeps_the_lr_positive_and_is_counted(setup):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_init=0.05,
                                lr_lr=1e3, lr_min=1e-4, lr_img=10.0)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))
    step = jax.jit(distill.make_outer_step(fm, cfg, 3))
    state, m = step(state, _single_start(traj), jax.random.key(6))
    assert float(m["lr_grad"]) * 1e3 > 0.05     # the loss falls with a smaller lr here: a huge step overshoots 0
    assert float(state.params["lr"]) == pytest.approx(1e-4) and int(state.n_lr_floor) == 1


def test_log_lr_parametrisation_still_available(setup):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_init=0.05,
                                lr_param="log")
    state = distill.init_state(cfg, x, y, 3, jax.random.key(2))
    assert set(state.params) == {"x", "log_lr"}
    new, m = jax.jit(distill.make_outer_step(fm, cfg, 3))(state, _single_start(traj), jax.random.key(1))
    assert float(new.params["log_lr"]) != pytest.approx(float(state.params["log_lr"]), abs=1e-9)
    assert float(m["lr"]) == pytest.approx(float(jnp.exp(new.params["log_lr"])))


def test_inner_loop_trains_on_the_synthetic_labels(setup):
    """Real-initialised samples carry their own class, and the inner loop fits those labels: with the
    labels of the synthetic set shuffled, the same steps fit the shuffled ones instead."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=4, syn_steps=40, expert_epochs=1, max_start_epoch=1, lr_init=0.5)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(3))
    xs = np.asarray(state.params["x"])
    labels = np.asarray(state.labels)
    for xi, li in zip(xs, labels):                       # each sample is a training clip of its class
        assert y[np.flatnonzero(np.all(np.isclose(x, xi), axis=(1, 2)))[0]] == li
    for target_labels in (labels, np.roll(labels, 4)):
        theta = distill.inner_loop(fm, cfg, jnp.asarray(traj[0, 0]), state.params["x"],
                                   train.one_hot(target_labels, 3), distill.inner_lr(state.params), jax.random.key(0))
        pred = np.argmax(np.asarray(fm.apply(theta, state.params["x"])), axis=-1)
        assert np.mean(pred == target_labels) >= 0.9


def _scripted_scores(scores):
    it = iter(scores)
    return lambda state: next(it)


def test_donated_steps_keep_the_best_state(setup, tmp_path):
    """With buffer donation forced on (as on accelerators), a best state from early on must survive
    the later steps that donate the live state; and it is the state of the selected iteration."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=2, max_start_epoch=3, iterations=6, lr_img=10.0)
    ref, _, _ = distill.distill(fm, dataclasses.replace(cfg, iterations=2), traj, x, y, 3, 0, progress=False,
                                donate=False)
    for ckpt in (None, tmp_path / "ck.npz"):
        final, best, evals = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False, donate=True,
                                             evaluate_every=2, evaluate=_scripted_scores([0.1, 0.5, 0.3, 0.2]),
                                             checkpoint_path=ckpt, checkpoint_every=2)
        assert [e["step"] for e in evals] == [0, 2, 4, 6]
        assert int(best.step) == 2 and int(final.step) == 6
        np.testing.assert_allclose(np.asarray(best.params["x"]), np.asarray(ref.params["x"]), rtol=1e-6)


def test_resume_keeps_a_best_state_from_before_the_stop(setup, tmp_path):
    """A run stopped after its best iteration (never beaten afterwards) resumes with that state as
    its best: the one in checkpoint.best.npz, not the state it resumed from."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=2, max_start_epoch=3, iterations=6, lr_img=10.0)
    ref, _, _ = distill.distill(fm, dataclasses.replace(cfg, iterations=2), traj, x, y, 3, 0, progress=False)
    ck = tmp_path / "ck.npz"
    distill.distill(fm, dataclasses.replace(cfg, iterations=4), traj, x, y, 3, 0, progress=False, evaluate_every=2,
                    evaluate=_scripted_scores([0.1, 0.9, 0.3]), checkpoint_path=ck, checkpoint_every=2)
    final, best, evals = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False, evaluate_every=2,
                                         evaluate=_scripted_scores([0.2, 0.4]), checkpoint_path=ck, checkpoint_every=2)
    assert [e["step"] for e in evals] == [0, 2, 4, 6] and int(final.step) == 6
    assert int(best.step) == 2
    np.testing.assert_allclose(np.asarray(best.params["x"]), np.asarray(ref.params["x"]), rtol=1e-6)


def test_tied_scores_keep_the_later_state(setup):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=2, max_start_epoch=3, iterations=4, lr_img=10.0)
    _, best, evals = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False, evaluate_every=2,
                                     evaluate=_scripted_scores([0.4, 0.6, 0.6]))
    assert int(best.step) == 4 == max(e["step"] for e in evals if e["score"] == 0.6)


def test_checkpoint_from_other_inputs_is_not_resumed(setup, tmp_path):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=1, syn_steps=2, expert_epochs=2, max_start_epoch=3, iterations=4, lr_img=10.0)
    ck = tmp_path / "ck.npz"
    distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False, checkpoint_path=ck, provenance="old")
    again, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False, checkpoint_path=ck, provenance="old")
    assert int(again.step) == 4                          # same inputs: the finished checkpoint is reused
    fresh, _, _ = distill.distill(fm, dataclasses.replace(cfg, iterations=2), traj, x, y, 3, 0, progress=False,
                                  checkpoint_path=ck, provenance="new")
    assert int(fresh.step) == 2                          # other inputs: started afresh, not resumed at 4


def test_remat_auto_picks_the_fastest_policy_that_fits(setup):
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=2, syn_steps=8, expert_epochs=2, max_start_epoch=3, remat="auto", unroll=1)
    state = distill.init_state(cfg, x, y, 3, jax.random.key(0))
    args = (state, jnp.asarray(traj), jax.random.key(1))
    order = ("none", "step", "nested")                        # the accelerator order
    roomy, _, _ = distill.choose_remat(fm, cfg, 3, args, donate=False, available=1 << 40, order=order)
    assert roomy.remat == "none"
    chosen, compiled, tried = distill.choose_remat(fm, cfg, 3, args, donate=False, available=1, order=order)
    assert chosen.remat == "nested" and [t["remat"] for t in tried] == ["none", "step", "nested"]
    new, _ = compiled(*args)
    assert int(new.step) == 1


def test_measured_lr_init_lets_the_student_travel_as_far_as_the_experts(setup, monkeypatch):
    """--lr_init=0: experts whose every epoch is one step of ``syn_steps * eta`` along the gradient of
    the starting synthetic set are matched from exactly ``eta``, whatever lr they were trained with;
    an explicit lr_init is kept; distill() refuses an unresolved 0; experts that never moved are an error."""
    fm, x, y, _ = setup
    eta, n_classes = 0.037, int(y.max()) + 1
    cfg = distill.DistillConfig(ipc=2, syn_steps=5, expert_epochs=1, max_start_epoch=3, lr_init=0, lr_min=0.05)
    state = distill.init_state(cfg, x, y, n_classes, distill.init_key(0))
    targets = distill.targets_of(state.params, state.labels, n_classes)
    grad = jax.jit(jax.grad(lambda th: train.soft_cross_entropy(fm.apply(th, state.params["x"]), targets)))
    traj = []
    for e in range(2):
        theta = [fm.init(jax.random.key(e))]
        for _ in range(cfg.max_start_epoch + cfg.expert_epochs):
            theta.append(theta[-1] - cfg.syn_steps * eta * grad(theta[-1]))
        traj.append(np.stack(theta))
    traj = np.stack(traj)
    r = distill.measure_lr_init(fm, cfg, traj, x, y, n_classes, seed=0)
    assert r.lr_init == pytest.approx(eta, rel=1e-4) and r.lr_min == pytest.approx(r.lr_init / 2)
    assert distill.measure_lr_init(fm, dataclasses.replace(cfg, lr_init=0.02), traj, x, y, n_classes, 0).lr_init == 0.02
    with pytest.raises(ValueError, match="resolved"):
        distill.distill(fm, cfg, traj, x, y, n_classes, 0)
    with pytest.raises(ValueError, match="could not measure"):
        distill.measure_lr_init(fm, cfg, np.repeat(traj[:, :1], traj.shape[1], axis=1), x, y, n_classes, 0)
    # experts at which the synthetic set's gradient vanishes (dead networks) cannot set the lr: an error,
    # not the astronomical distance / ~0 ratio (1e27 from a table slice's untrained VGG-15 experts)
    monkeypatch.setattr(distill, "loss_grad", lambda fm_: lambda th, xb, tb: 1e-20 * jnp.ones_like(th))
    with pytest.raises(ValueError, match="could not measure"):
        distill.measure_lr_init(fm, cfg, traj, x, y, n_classes, 0)


def test_expert_label_init_starts_from_the_experts_logits(setup):
    """label_init=expert (DATM): the learned labels start as the experts' mean logits on each starting
    sample at the farthest matched epoch; a sample they misclassify starts one-hot (5 x)."""
    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=4, syn_steps=2, expert_epochs=1, max_start_epoch=3, iterations=1,
                                learn_labels=True, label_init="expert", lr_labels=0.0, lr_img=1e-9)
    final, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False)
    start = distill.init_state(cfg, x, y, 3, distill.init_key(0))
    logits = np.mean([np.asarray(fm.apply(jnp.asarray(traj[e, 3]), start.params["x"])) for e in range(2)], axis=0)
    labels = np.asarray(start.labels)
    right = logits.argmax(-1) == labels
    assert right.sum() >= 6                                   # the toy experts know most of their classes
    expected = np.where(right[:, None], logits, 5.0 * np.eye(3)[labels])
    np.testing.assert_allclose(final.params["y"], expected, rtol=1e-5, atol=1e-5)
    later = np.mean([np.asarray(fm.apply(jnp.asarray(traj[e, 6]), start.params["x"])) for e in range(2)], axis=0)
    assert np.abs(later - logits).max() > 1e-3                # the epoch matters
    # labels the experts disagree with start one-hot
    wrong = np.roll(labels, 4)
    y0 = np.asarray(distill.expert_label_logits(fm, cfg, traj, start.params["x"], jnp.asarray(wrong), 3))
    miss = logits.argmax(-1) != wrong
    assert miss.any()
    np.testing.assert_allclose(y0[miss], 5.0 * np.eye(3)[wrong[miss]])
    np.testing.assert_allclose(y0[~miss], logits[~miss], rtol=1e-5, atol=1e-5)


def test_a_setting_added_later_at_its_default_leaves_older_runs_the_same():
    """Runs and checkpoints made before label_init existed keep their identity: at its default it is
    left out of the recorded settings; set otherwise it changes the provenance."""
    cfg = distill.DistillConfig()
    older = dataclasses.asdict(cfg)
    older.pop("label_init"), older.pop("init_noise"), older.pop("min_start_epoch")
    assert distill.settings_json(cfg) == older
    # a run's recorded settings, written before those settings existed or after, are the same run
    from sersynth import pipeline
    run = pipeline.RunConfig(workdir="w")
    experts_then = {k: v for k, v in dataclasses.asdict(run.expert_train).items() if k != "sam_rho"}
    recorded_then = {**run.to_json(), "distill": older, "expert_train": experts_then}
    recorded_since = {**run.to_json(), "distill": dataclasses.asdict(cfg), "mia_holdout": 0.0,
                      "select_lr": "learned", "eval_lr_choice": "each",
                      "dm": {**run.to_json()["dm"], "init_noise": 0.0},
                      "expert_train": dataclasses.asdict(run.expert_train)}
    assert pipeline.run_identity(recorded_then) == pipeline.run_identity(recorded_since) == run.to_json()
    assert pipeline.run_identity({**recorded_since, "mia_holdout": 0.1}) != run.to_json()
    assert pipeline.run_identity({**recorded_since, "select_lr": "candidates"}) != run.to_json()
    assert pipeline.run_identity({**recorded_since, "eval_lr_choice": "shared"}) != run.to_json()
    sam = {**recorded_since, "expert_train": {**experts_then, "sam_rho": 0.05}}
    assert pipeline.run_identity(sam) != run.to_json()
    assert run.expert_train.identity() == experts_then          # experts' and references' fingerprints too
    other = dataclasses.replace(cfg, learn_labels=True)
    assert distill.run_fingerprint(other) != distill.run_fingerprint(dataclasses.replace(other, label_init="expert"))


def test_herding_init_starts_from_the_herding_baselines_clips(setup):
    """--syn_init=herding: each class starts as exactly the clips the herding baseline trains on (a class
    short of clips repeats them), and the distillation then moves them."""
    from sersynth import evaluate

    fm, x, y, traj = setup
    cfg = distill.DistillConfig(ipc=4, init="herding", syn_steps=2, expert_epochs=1, max_start_epoch=3,
                                iterations=2, lr_img=10.0)
    start = distill.init_state(cfg, x, y, 3, distill.init_key(0))
    baseline = evaluate.herding_subset(x, y, 4, 3)
    np.testing.assert_array_equal(start.params["x"], x[baseline])
    np.testing.assert_array_equal(start.labels, y[baseline])
    np.testing.assert_array_equal(distill.init_sources(cfg, x, y, 3, distill.init_key(5))[:, 0], baseline)
    final, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False)
    assert np.abs(np.asarray(final.params["x"]) - x[baseline]).max() > 1e-4
    # a class with fewer clips than ipc repeats its herded clips
    few = np.concatenate([np.flatnonzero(y == 0)[:2], np.flatnonzero(y != 0)])
    short = distill.init_sources(dataclasses.replace(cfg, ipc=3), x[few], y[few], 3, distill.init_key(0))
    assert short.shape == (9, 1) and (y[few][short[:3, 0]] == 0).all() and len(set(short[:3, 0])) == 2


def test_kmeans_init_starts_spread_over_the_class_from_no_single_recording():
    """--syn_init=kmeans: each sample is the rescaled mean of the init_mix clips nearest one of its
    class's k-means centres (the sources the audit is given), so a class's samples lie in different
    parts of it, unlike --syn_init=mix's means of random clips, which blend the class's modes."""
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(2), 60).astype(np.int32)
    modes = rng.normal(scale=4.0, size=(2, 3, 6, 5))                 # three modes per class
    x = (modes[y, np.arange(120) % 3] + rng.normal(size=(120, 6, 5))).astype(np.float32)
    cfg = distill.DistillConfig(ipc=3, init="kmeans", init_mix=4)
    src = distill.init_sources(cfg, x, y, 2, distill.init_key(0))
    assert src.shape == (6, 4) and (y[src] == np.repeat([0, 1], 3)[:, None]).all()
    for c in range(2):                                               # one start per mode, each from one mode only
        mode = src[3 * c:3 * c + 3] % 3
        assert (mode == mode[:, :1]).all() and sorted(mode[:, 0].tolist()) == [0, 1, 2]
    start = np.asarray(distill.init_state(cfg, x, y, 2, distill.init_key(0)).params["x"])
    mean = x[src].mean(axis=1)                                       # the sources' mean, rescaled to their spread
    for s, m in zip(start, mean):
        assert np.corrcoef(s.ravel(), m.ravel())[0, 1] > 0.999
    assert privacy.dcr(start, x, x[:5])["min_synthetic"] > 0.1                      # no clip copied
    mixed = np.asarray(distill.init_state(dataclasses.replace(cfg, init="mix"), x, y, 2,
                                          distill.init_key(0)).params["x"])
    def nearest_mode(starts):                                        # [n_syn] best correlation with a mode
        m = modes.reshape(6, -1)
        return np.array([np.corrcoef(s.ravel(), m[3 * (i // 3):3 * (i // 3) + 3])[0, 1:].max()
                         for i, s in enumerate(starts)])
    assert nearest_mode(start).min() > 0.98 and nearest_mode(mixed).mean() < 0.9
