"""Trajectory-matching distillation (MTT, Cazenavette et al. 2022) of log-Mel spectrograms.

One outer step: sample an expert ``e`` and a start epoch ``min_start_epoch <= s < max_start_epoch``; from the expert's
parameters ``theta_s`` run ``syn_steps`` SGD steps on synthetic minibatches with the learnable
learning rate ``lr``; the loss is the normalised parameter distance to the expert ``expert_epochs``
later::

    L = ||theta_hat_N - theta*_{s+M}||^2 / ||theta*_s - theta*_{s+M}||^2

and its gradient updates the synthetic spectrograms, the inner learning rate and, optionally,
learnable soft labels. As in MTT and the paper, the raw lr is learned by SGD with momentum::

    v <- momentum * v + dL/dlr,    lr <- max(lr - lr_lr * v, lr_min)

(the floor keeps it positive; steps that hit it are counted). ``lr_param="log"`` learns ``log lr``
instead, whose SGD update is scaled by lr^2 and so barely moves a small lr. The whole outer step is
one pure jitted function. The inner loop is a ``lax.scan``; its memory is bounded by
rematerialisation:

  * ``none``: the backward pass keeps every inner step's activations (linear in syn_steps).
  * ``step``: each inner step is ``jax.checkpoint``-ed; one parameter vector per step is kept
    (still linear in syn_steps, with a smaller slope).
  * ``nested``: checkpointed segments of ``segment`` steps, each step checkpointed inside; about
    ``syn_steps / segment + segment`` parameter vectors live at once (~2 sqrt(syn_steps)).
  * ``auto`` (resolved by :func:`distill`): the fastest policy for the backend (:func:`remat_order`)
    whose compiled outer step, by XLA's own memory analysis, fits the device's free memory.

On XLA CPU convolutions inside a rolled while loop run an order of magnitude slower, so the scans
are fully unrolled there (``unroll=0`` picks per backend; see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sersynth import dist
from sersynth.evaluate import herding, kmeans_nearest
from sersynth.io import atomic_save_npz, fingerprint, load_npz, without_added_later
from sersynth.models import FlatModel
from sersynth.train import augment, soft_cross_entropy

REMAT = ("none", "step", "nested")
REMAT_CHOICES = (*REMAT, "auto")
LR_PARAMS = ("raw", "log")
LABEL_INITS = ("onehot", "expert")
SOURCE_INITS = ("real", "herding", "mix", "kmeans")     # starts made from training clips (see init_sources)
MIXED_INITS = ("mix", "kmeans")               # starts that average init_mix clips
INITS = (*SOURCE_INITS, "noise")


class DistillDiverged(RuntimeError):
    """The matching loss or its gradient became NaN/Inf."""


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of MTT (paper defaults in comments)."""
    ipc: int = 10                   # synthetic samples per class (paper: 1..150)
    syn_steps: int = 20             # inner SGD steps per outer step (paper: 20)
    expert_epochs: int = 3          # epochs of expert trajectory to match (paper: 3)
    max_start_epoch: int = 30       # start epoch drawn from [min_start_epoch, max_start_epoch) (paper: 30)
    min_start_epoch: int = 0        # DATM: larger sets match later segments (paper, MTT: 0)
    batch_syn: int = 0              # inner minibatch; 0 = the whole synthetic set
    iterations: int = 60            # outer steps (paper: 60)
    lr_img: float = 1000.0          # SGD step on the synthetic data (paper: 1000)
    momentum: float = 0.5           # momentum of the outer optimisers (MTT: 0.5)
    lr_init: float = 1e-3           # initial learnable inner lr (paper: 1e-3); 0 = measured (measure_lr_init)
    lr_lr: float = 1e-3             # SGD step on the lr (paper: 1e-3 on the raw lr, as MTT)
    lr_param: str = "raw"           # raw (MTT, the paper) | log (SGD on log lr)
    lr_min: float = 1e-6            # raw: floor that keeps the learned lr positive
    learn_labels: bool = False      # learnable soft labels
    lr_labels: float = 2.0          # SGD step on the label logits
    label_init: str = "onehot"      # learned labels start as 5 x one-hot | the experts' logits (DATM)
    init: str = "real"              # real (random real samples of the class) | herding (its herding coreset) |
                                    # mix (means of init_mix) | kmeans (means of init_mix near k-means centres) | noise
    init_mix: int = 8               # mix, kmeans: real samples of the class averaged into each synthetic sample
    init_noise: float = 0.0         # start from clips: Gaussian noise added to it (std: each sample's spread)
    augment: bool = False           # differentiable SpecAugment inside the inner loop
    remat: str = "nested"           # none | step | nested | auto (resolved by distill())
    segment: int = 0                # steps per checkpointed segment (nested); 0 = divisor nearest sqrt
    unroll: int = 0                 # scan unroll; 0 = per backend (full on CPU, 1 elsewhere)

    def validate(self, n_epochs_stored: int | None = None) -> None:
        checks = [
            (self.ipc >= 1, f"--ipc must be >= 1, got {self.ipc}"),
            (self.syn_steps >= 1, f"--syn_steps must be >= 1, got {self.syn_steps}"),
            (self.expert_epochs >= 1, f"--expert_epochs must be >= 1, got {self.expert_epochs}"),
            (self.max_start_epoch >= 1, f"--max_start_epoch must be >= 1, got {self.max_start_epoch}"),
            (0 <= self.min_start_epoch < self.max_start_epoch,
             f"--min_start_epoch must be in [0, --max_start_epoch={self.max_start_epoch}), got {self.min_start_epoch}"),
            (self.batch_syn >= 0, f"--batch_syn must be >= 0, got {self.batch_syn}"),
            (self.iterations >= 1, f"--iterations must be >= 1, got {self.iterations}"),
            (self.lr_img > 0 and self.lr_init >= 0 and self.lr_lr >= 0,
             "--lr_img must be > 0, --lr_init >= 0 (0: auto), --lr_lr >= 0"),
            (self.lr_param in LR_PARAMS, f"--lr_param must be raw or log, got {self.lr_param!r}"),
            (0 < self.lr_min and (self.lr_init == 0 or self.lr_min < self.lr_init),
             f"--lr_min must be in (0, --lr_init={self.lr_init}), got {self.lr_min}"),
            (self.init in INITS, f"--syn_init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (self.init_mix >= 1, f"--syn_init_mix must be >= 1, got {self.init_mix}"),
            (self.label_init in LABEL_INITS and (self.label_init == "onehot" or self.learn_labels),
             f"--label_init must be one of {', '.join(LABEL_INITS)} (expert needs --learn_labels), "
             f"got {self.label_init!r}" + ("" if self.learn_labels else " without --learn_labels")),
            (self.init_noise >= 0 and (self.init_noise == 0 or self.init != "noise"),
             f"--syn_init_noise must be >= 0 and applies to --syn_init={', '.join(SOURCE_INITS)}, "
             f"got {self.init_noise} "
             f"with --syn_init={self.init}"),
            (self.remat in REMAT_CHOICES, f"--remat must be one of {', '.join(REMAT_CHOICES)}, got {self.remat!r}"),
            (self.segment >= 0 and self.unroll >= 0, "--remat_segment and --scan_unroll must be >= 0"),
            (not self.segment or self.syn_steps % self.segment == 0,
             f"--remat_segment={self.segment} must divide --syn_steps={self.syn_steps}"),
        ]
        if n_epochs_stored is not None:
            checks.append((self.max_start_epoch - 1 + self.expert_epochs <= n_epochs_stored,
                           f"--max_start_epoch={self.max_start_epoch} + --expert_epochs={self.expert_epochs} needs "
                           f"{self.max_start_epoch - 1 + self.expert_epochs} trained epochs, the experts store "
                           f"{n_epochs_stored}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def segment_length(self) -> int:
        if self.segment:
            return self.segment
        divisors = [d for d in range(1, self.syn_steps + 1) if self.syn_steps % d == 0]
        return min(divisors, key=lambda d: (abs(d - math.sqrt(self.syn_steps)), d))


@flax.struct.dataclass
class DistillState:
    params: dict                 # {'x': [n_syn, frames, n_mels], 'lr' or 'log_lr': [], ('y': [n_syn, C] logits)}
    opt_state: optax.OptState
    labels: jax.Array            # [n_syn] int32 class of each synthetic sample
    step: jax.Array              # int32 outer steps taken
    n_nonfinite: jax.Array       # int32 outer steps whose loss/gradient was NaN/Inf (skipped)
    n_lr_floor: jax.Array        # int32 outer steps that left the raw lr at its floor lr_min


def _lr_key(cfg: DistillConfig) -> str:
    return "lr" if cfg.lr_param == "raw" else "log_lr"


def _param_names(cfg: DistillConfig) -> dict:
    return {"x": None, _lr_key(cfg): None, **({"y": None} if cfg.learn_labels else {})}


def _tx(cfg: DistillConfig, params: dict) -> optax.GradientTransformation:
    lr_sgd = optax.sgd(cfg.lr_lr, momentum=cfg.momentum or None)
    transforms = {
        "x": optax.sgd(cfg.lr_img, momentum=cfg.momentum or None),
        "lr": lr_sgd, "log_lr": lr_sgd,
        "y": optax.sgd(cfg.lr_labels, momentum=0.9),
    }
    return optax.multi_transform({k: transforms[k] for k in params}, {k: k for k in params})


def inner_lr(params: dict) -> jax.Array:
    """The positive inner learning rate held in ``params`` (raw ``lr`` or ``log_lr``)."""
    return params["lr"] if "lr" in params else jnp.exp(params["log_lr"])


def targets_of(state_params: dict, labels: jax.Array, n_classes: int) -> jax.Array:
    """``[n_syn, C]`` training targets: softmax of learned logits, or one-hot labels."""
    if "y" in state_params:
        return jax.nn.softmax(state_params["y"], axis=-1)
    return jax.nn.one_hot(labels, n_classes, dtype=jnp.float32)


def init_key(seed: int) -> jax.Array:
    """The key :func:`distill` initialises the synthetic set with (see :func:`init_sources`)."""
    return jax.random.fold_in(jax.random.key(seed), 1_000_003)


def init_sources(cfg: DistillConfig, x_train: np.ndarray, y_train: np.ndarray, n_classes: int,
                 key: jax.Array) -> np.ndarray | None:
    """``[n_syn, k]`` indices of the training clips each synthetic sample starts from (``real``: k = 1,
    random clips; ``herding``: k = 1, the herding coreset of each class, the clips the herding baseline
    trains on; ``mix``: k = ``init_mix`` random clips; ``kmeans``: k = ``init_mix``, the clips nearest
    the centres of ``ipc`` k-means clusters of the class); None for ``noise``. The privacy audit asks
    whether they can be told."""
    if cfg.init not in SOURCE_INITS:
        return None
    k = cfg.init_mix if cfg.init in MIXED_INITS else 1
    chosen = []
    for c in range(n_classes):
        pool = np.flatnonzero(np.asarray(y_train) == c)
        if pool.size == 0:
            raise ValueError(f"class {c} has no training samples to initialise the synthetic set from")
        kc = jax.random.fold_in(key, c)
        if cfg.init == "herding":       # a class with fewer clips than ipc repeats them
            picked = pool[herding(np.asarray(x_train)[pool], cfg.ipc)]
            chosen.append(np.resize(picked, cfg.ipc)[:, None])
        elif cfg.init == "kmeans":
            seed = int(jax.random.randint(kc, (), 0, 2**31 - 1))
            chosen.append(pool[kmeans_nearest(np.asarray(x_train)[pool], cfg.ipc, k, seed)])
        elif k == 1:
            chosen.append(np.asarray(jax.random.choice(kc, pool, (cfg.ipc,), replace=pool.size < cfg.ipc))[:, None])
        else:
            keys = jax.random.split(kc, cfg.ipc)
            chosen.append(np.stack([np.asarray(jax.random.choice(kk, pool, (k,), replace=pool.size < k))
                                    for kk in keys]))
    return np.concatenate(chosen)


def expert_label_logits(fm: FlatModel, cfg: DistillConfig, trajectories: np.ndarray, x_syn: jax.Array,
                        labels: jax.Array, n_classes: int) -> jax.Array:
    """``[n_syn, C]`` starting logits of learned labels with ``label_init="expert"`` (DATM's soft
    labels): the experts' mean logits on each starting sample at the farthest epoch the matching
    reaches (``max_start_epoch - 1 + expert_epochs``). A sample the experts' mean misclassifies starts
    from the one-hot logits instead, so every label still names its class first."""
    epoch = cfg.max_start_epoch - 1 + cfg.expert_epochs
    params = jnp.asarray(trajectories[:, epoch], jnp.float32)                       # [E, P]
    x = jnp.asarray(x_syn, jnp.float32)
    logits = jnp.mean(jax.lax.map(lambda p: fm.apply(p, x).astype(jnp.float32), params), axis=0)
    onehot = 5.0 * jax.nn.one_hot(labels, n_classes, dtype=jnp.float32)
    right = jnp.argmax(logits, axis=-1) == labels
    return jnp.where(right[:, None], logits, onehot)


def init_state(cfg: DistillConfig, x_train: np.ndarray, y_train: np.ndarray, n_classes: int,
               key: jax.Array) -> DistillState:
    """Synthetic set of ``ipc`` per class: random real training samples of that class (``real``);
    the class's herding coreset (``herding``: distillation starts where the herding baseline stands);
    the mean of ``init_mix`` of them, rescaled to their average spread (``mix``: no sample starts
    as anyone's recording, see sersynth.privacy); the same mean of the ``init_mix`` clips nearest the
    centre of each of the class's ``ipc`` k-means clusters (``kmeans``: spread over the class like
    herding, yet no one's recording); or noise. With ``init_noise``, a start from clips
    gets Gaussian noise of ``init_noise`` times its own spread added (its sources harder to recover)."""
    labels = np.repeat(np.arange(n_classes, dtype=np.int32), cfg.ipc)
    if cfg.init in SOURCE_INITS:
        idx = init_sources(cfg, x_train, y_train, n_classes, key)       # [n_syn, k]
        k = idx.shape[1]
        idx = idx[:, 0] if k == 1 else idx                               # [n_syn] or [n_syn, k]
        x = np.asarray(x_train)[idx]
        if k > 1:
            spread = x.std(axis=(2, 3)).mean(axis=1)                    # [n_syn]: the clips' average spread
            x = x.mean(axis=1)
            centre = x.mean(axis=(1, 2), keepdims=True)
            x = centre + (x - centre) * (spread / (x.std(axis=(1, 2)) + 1e-6))[:, None, None]
        if cfg.init_noise > 0:
            noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 7_919), x.shape), np.float32)
            x = x + cfg.init_noise * x.std(axis=(1, 2), keepdims=True) * noise
    else:
        x = np.asarray(jax.random.normal(key, (labels.size, *np.asarray(x_train).shape[1:])))
    lr0 = cfg.lr_init if cfg.lr_param == "raw" else math.log(cfg.lr_init)
    params = {"x": jnp.asarray(x, jnp.float32), _lr_key(cfg): jnp.asarray(lr0, jnp.float32)}
    if cfg.learn_labels:
        params["y"] = 5.0 * jax.nn.one_hot(labels, n_classes, dtype=jnp.float32)
    zero = lambda: jnp.zeros((), jnp.int32)        # one buffer each: a donated state may not repeat one
    return DistillState(params=params, opt_state=_tx(cfg, params).init(params), labels=jnp.asarray(labels),
                        step=zero(), n_nonfinite=zero(), n_lr_floor=zero())


def inner_batch(cfg: DistillConfig, n_syn: int) -> int:
    """Synthetic samples per inner step: ``batch_syn``, or all ``n_syn`` when it is 0 or larger."""
    return cfg.batch_syn if 0 < cfg.batch_syn < n_syn else n_syn


def loss_grad(fm: FlatModel) -> Callable:
    """``grad(theta, x, targets)``: gradient of the soft cross-entropy an inner step descends."""
    return jax.grad(lambda th, xb, tb: soft_cross_entropy(fm.apply(th, xb), tb))


def measure_lr_init(fm: FlatModel, cfg: DistillConfig, trajectories: np.ndarray, x_train: np.ndarray,
                    y_train: np.ndarray, n_classes: int, seed: int, max_segments: int = 64) -> DistillConfig:
    """This config with ``lr_init=0`` (auto) replaced by a measured starting lr; any other is kept.

    The lr at which ``syn_steps`` student steps on the starting synthetic set (as :func:`distill`
    initialises it, one inner minibatch per segment) travel as far as the experts did over
    ``expert_epochs``: the median, over expert segments ``(e, s)`` (at most ``max_segments``, drawn
    with ``seed``), of ``|theta[e, s + M] - theta[e, s]| / (syn_steps * |grad L_syn(theta[e, s])|)``.
    It does not depend on the experts' optimiser: Adam's steps are not lr-scaled gradients, so their
    lr says nothing about the student's (a CNN-6 matched from the paper's lr of 1e-3 kept a matching
    loss of 0.99 for 30 outer steps). ``lr_min`` is kept at most half the result."""
    if cfg.lr_init > 0:
        return cfg
    state = init_state(cfg, x_train, y_train, n_classes, init_key(seed))
    params = state.params
    if cfg.label_init == "expert":
        params = {**params, "y": expert_label_logits(fm, cfg, trajectories, params["x"], state.labels, n_classes)}
    x, targets = params["x"], targets_of(params, state.labels, n_classes)
    n = x.shape[0]
    batch = inner_batch(cfg, n)
    grad = loss_grad(fm)
    grad_norm = jax.jit(lambda th, xb, tb: jnp.linalg.norm(grad(th, xb, tb).astype(jnp.float32)))
    segments = [(e, s) for e in range(trajectories.shape[0]) for s in range(cfg.min_start_epoch, cfg.max_start_epoch)]
    rng = np.random.default_rng(seed)
    if len(segments) > max_segments:
        segments = [segments[i] for i in sorted(rng.choice(len(segments), max_segments, replace=False))]
    ratios = []
    for e, s in segments:
        start = jnp.asarray(trajectories[e, s], jnp.float32)
        travelled = float(jnp.linalg.norm(jnp.asarray(trajectories[e, s + cfg.expert_epochs], jnp.float32) - start))
        ids = rng.permutation(n)[:batch]
        g = float(grad_norm(start, x[ids], targets[ids]))
        if g > 1e-8:              # a vanishing gradient (a dead network) says nothing about the distance
            ratios.append(travelled / (cfg.syn_steps * g))
    lr = float(np.median(ratios)) if ratios else float("nan")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"--lr_init=0: could not measure a starting lr (got {lr}; the experts did not move, or "
                         "the synthetic set's gradient vanished at every start?); give --lr_init")
    return dataclasses.replace(cfg, lr_init=lr, lr_min=min(cfg.lr_min, lr / 2))


def default_unroll(cfg: DistillConfig, steps_in_scan: int) -> int:
    if cfg.unroll:
        return min(cfg.unroll, steps_in_scan)
    return steps_in_scan if jax.default_backend() == "cpu" else 1


def unrolled_inner_loop(fm: FlatModel, cfg: DistillConfig, theta: jax.Array, x: jax.Array, targets: jax.Array,
                        lr: jax.Array, key: jax.Array) -> jax.Array:
    """``syn_steps`` SGD steps from ``theta [P]`` on the synthetic set; a plain Python loop (reference)."""
    step = _inner_step(fm, cfg, x, targets, lr, key)
    for i in range(cfg.syn_steps):
        theta = step(theta, i)
    return theta


def _inner_step(fm: FlatModel, cfg: DistillConfig, x, targets, lr, key) -> Callable:
    n = x.shape[0]
    batch = inner_batch(cfg, n)
    kbatch, kaug = jax.random.split(key)
    grad = loss_grad(fm)

    def step(theta, i):
        if batch < n:
            ids = jax.random.permutation(jax.random.fold_in(kbatch, i), n)[:batch]
            xb, tb = x[ids], targets[ids]
        else:
            xb, tb = x, targets
        if cfg.augment:
            xb = augment(xb, jax.random.fold_in(kaug, i))
        return theta - lr * grad(theta, xb, tb)

    return step


def inner_loop(fm: FlatModel, cfg: DistillConfig, theta: jax.Array, x: jax.Array, targets: jax.Array,
               lr: jax.Array, key: jax.Array) -> jax.Array:
    """The same steps as :func:`unrolled_inner_loop`, as a (nested, rematerialised) ``lax.scan``."""
    step = _inner_step(fm, cfg, x, targets, lr, key)
    body = lambda th, i: (step(th, i), None)
    if cfg.remat == "none":
        return jax.lax.scan(body, theta, jnp.arange(cfg.syn_steps), unroll=default_unroll(cfg, cfg.syn_steps))[0]
    body = jax.checkpoint(body)
    if cfg.remat == "step":
        return jax.lax.scan(body, theta, jnp.arange(cfg.syn_steps), unroll=default_unroll(cfg, cfg.syn_steps))[0]
    seg = cfg.segment_length()
    n_seg = cfg.syn_steps // seg

    @jax.checkpoint
    def segment(th, s):
        steps = s * seg + jnp.arange(seg)
        return jax.lax.scan(body, th, steps, unroll=default_unroll(cfg, seg))[0], None

    return jax.lax.scan(segment, theta, jnp.arange(n_seg), unroll=default_unroll(cfg, n_seg))[0]


def matching_loss(fm: FlatModel, cfg: DistillConfig, params: dict, labels: jax.Array, start: jax.Array,
                  target: jax.Array, key: jax.Array, n_classes: int, loop: Callable = inner_loop) -> jax.Array:
    """Normalised parameter distance after ``syn_steps`` inner steps from ``start`` to ``target``."""
    theta = loop(fm, cfg, start, params["x"], targets_of(params, labels, n_classes), inner_lr(params), key)
    num = jnp.sum(jnp.square(theta - target))
    den = jnp.sum(jnp.square(start - target))
    return num / jnp.maximum(den, 1e-12)


def make_outer_step(fm: FlatModel, cfg: DistillConfig, n_classes: int) -> Callable:
    """``outer_step(state, trajectories [E, T+1, P], root_key) -> (state, metrics)``; pure, jit it.

    The key of step ``k`` is ``fold_in(root_key, k)``, so a resumed run repeats the same draws.
    Steps whose loss or gradient is not finite leave the state unchanged and count in
    ``state.n_nonfinite`` (the driver stops the run on it).
    """
    tx = _tx(cfg, _param_names(cfg))

    def outer_step(state: DistillState, trajectories: jax.Array, root_key: jax.Array):
        key = jax.random.fold_in(root_key, state.step)
        k_expert, k_start, k_inner = jax.random.split(key, 3)
        expert = jax.random.randint(k_expert, (), 0, trajectories.shape[0])
        start_epoch = jax.random.randint(k_start, (), cfg.min_start_epoch, cfg.max_start_epoch)
        start = trajectories[expert, start_epoch].astype(jnp.float32)
        target = trajectories[expert, start_epoch + cfg.expert_epochs].astype(jnp.float32)
        loss, grads = jax.value_and_grad(matching_loss, argnums=2)(
            fm, cfg, state.params, state.labels, start, target, k_inner, n_classes)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        at_floor = jnp.zeros((), bool)
        if "lr" in params:
            at_floor = params["lr"] <= cfg.lr_min
            params = {**params, "lr": jnp.maximum(params["lr"], cfg.lr_min)}
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = DistillState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                                 labels=state.labels, step=state.step + 1,
                                 n_nonfinite=state.n_nonfinite + (~finite).astype(jnp.int32),
                                 n_lr_floor=state.n_lr_floor + (finite & at_floor).astype(jnp.int32))
        metrics = {"loss": loss, "lr": inner_lr(new_state.params), "grad_norm": grad_norm,
                   "lr_grad": grads[_lr_key(cfg)], "expert": expert, "start_epoch": start_epoch}
        return new_state, metrics

    return outer_step


def default_donate() -> bool:
    """Donate the state's buffers to the outer step on accelerators (it is updated in place there);
    XLA CPU gains nothing from it."""
    return jax.default_backend() != "cpu"


def jit_outer_step(fm: FlatModel, cfg: DistillConfig, n_classes: int, donate: bool | None = None) -> Callable:
    """The jitted outer step; with ``donate`` (default: on accelerators) the input state's buffers are
    reused for the output, so the caller must not read a state after passing it in (see
    :func:`snapshot`)."""
    donate = default_donate() if donate is None else donate
    return jax.jit(make_outer_step(fm, cfg, n_classes), donate_argnums=(0,) if donate else ())


def snapshot(state: DistillState) -> DistillState:
    """A copy of ``state`` in buffers of its own, safe to keep while the original is donated."""
    return jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)


def _available_bytes(device) -> int | None:
    """Free memory of ``device``: the allocator's limit less what is in use on accelerators, the
    machine's physical memory on CPU; ``None`` if unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def compiled_bytes(compiled) -> int | None:
    """Device bytes an executable needs (arguments, outputs and temporaries, donated aliases
    counted once), from XLA's memory analysis; ``None`` where the backend gives none."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def remat_order() -> tuple[str, ...]:
    """Remat policies, fastest first, as measured (benchmarks/RESULTS.md): on an H100 none, then step
    (1.3x faster than nested at the paper's sizes); on XLA CPU, with the inner loop unrolled, step
    was the fastest at 20 inner steps (none 1.9x slower) and all three were within noise at 10."""
    return ("step", "nested") if jax.default_backend() == "cpu" else ("none", "step", "nested")


def choose_remat(fm: FlatModel, cfg: DistillConfig, n_classes: int, args: tuple, donate: bool,
                 available: int | None = None, headroom: float = 0.9,
                 order: tuple[str, ...] | None = None) -> tuple[DistillConfig, Callable, list[dict]]:
    """Resolves ``remat="auto"``: compiles the outer step with each policy of ``order`` (default
    :func:`remat_order`, fastest first) and keeps the first whose memory, by XLA's analysis of the
    compiled step, fits ``headroom`` of the free device memory (the last one otherwise: it needs the
    least). Returns ``(config with remat set, the compiled step, what was tried)``."""
    order = order or remat_order()
    if available is None:
        available = _available_bytes(jax.local_devices()[0])
    tried, compiled = [], {}
    for remat in order:
        compiled[remat] = jit_outer_step(fm, dataclasses.replace(cfg, remat=remat), n_classes, donate).lower(
            *args).compile()
        need = compiled_bytes(compiled[remat])
        tried.append({"remat": remat, "bytes": need})
        if need is None or available is None or need <= headroom * available:
            break
    chosen = tried[-1]["remat"]
    if jax.process_count() > 1:       # every process must run the same program: process 0's choice
        from jax.experimental import multihost_utils
        chosen = order[int(multihost_utils.broadcast_one_to_all(np.int32(order.index(chosen))))]
    if chosen not in compiled:
        compiled[chosen] = jit_outer_step(fm, dataclasses.replace(cfg, remat=chosen), n_classes, donate).lower(
            *args).compile()
    return dataclasses.replace(cfg, remat=chosen), compiled[chosen], tried


def data_mesh(n_devices: int) -> jax.sharding.Mesh | None:
    """A 1-D ``('data',)`` mesh over the first ``n_devices`` devices (all processes' devices in a
    multi-host run); ``None`` for ``n_devices <= 1``."""
    if n_devices <= 1:
        return None
    devices = jax.devices()
    if n_devices > len(devices):
        raise ValueError(f"--mesh_devices={n_devices} but only {len(devices)} device(s) are visible")
    return jax.sharding.Mesh(np.asarray(devices[:n_devices]), ("data",))


def shard_state(state: DistillState, mesh: jax.sharding.Mesh) -> DistillState:
    """Splits the synthetic set (and its optimiser moments and labels) along samples over ``mesh``;
    everything else is replicated. ``jit`` then partitions the outer step (GSPMD): each device runs
    the inner steps' forward/backward on its share of the synthetic batch."""
    n_dev = mesh.devices.size
    n_syn = state.params["x"].shape[0]
    if n_syn % n_dev:
        raise ValueError(f"the synthetic set ({n_syn} samples) must divide evenly over --mesh_devices={n_dev}")
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda a: jax.device_put(a, rows if jnp.ndim(a) >= 1 and jnp.shape(a)[0] == n_syn else replicated)
    return jax.tree.map(place, state)


def save_checkpoint(path: str | Path, state: DistillState, extra: dict[str, np.ndarray] | None = None) -> None:
    leaves = jax.tree.leaves(state)
    arrays = {f"leaf_{i:04d}": dist.to_host(leaf) for i, leaf in enumerate(leaves)}
    atomic_save_npz(path, {**arrays, **(extra or {})})


def checkpoint_seconds(path: str | Path) -> float:
    """Wall seconds of distillation recorded in a checkpoint, summed over every resumed part."""
    return float(load_npz(path).get("seconds", 0.0))


def load_checkpoint(path: str | Path, like: DistillState) -> tuple[DistillState, dict[str, np.ndarray]]:
    """Restores a state saved by :func:`save_checkpoint` into the structure of ``like``."""
    arrays = load_npz(path, advice="delete it (and its .best.npz) to restart the distillation from scratch")
    leaves, treedef = jax.tree.flatten(like)
    restored = []
    for i, leaf in enumerate(leaves):
        a = arrays.get(f"leaf_{i:04d}")
        if a is None or a.shape != np.shape(leaf):
            raise ValueError(f"checkpoint {path} does not match this configuration (leaf {i})")
        restored.append(jnp.asarray(a, dtype=jnp.asarray(leaf).dtype))
    extra = {k: v for k, v in arrays.items() if not k.startswith("leaf_")}
    return jax.tree.unflatten(treedef, restored), extra


def run_fingerprint(cfg: DistillConfig, *parts) -> str:
    """What a checkpoint was made from: the configuration (iterations and the remat policy aside:
    they change neither the steps nor their results) and ``parts`` (model, cache and experts)."""
    same = dataclasses.replace(cfg, iterations=0, remat="nested", segment=0, unroll=0)
    return fingerprint([settings_json(same), *parts])


# fields added after runs were made with their default behaviour: at that default they are left out of
# the recorded settings, so a run made before a field existed is still the same run
ADDED_LATER = {"label_init": "onehot", "init_noise": 0.0, "min_start_epoch": 0}


def settings_json(cfg: DistillConfig) -> dict:
    """``cfg`` as a dict for provenance and run identity (see :data:`ADDED_LATER`)."""
    return without_added_later(dataclasses.asdict(cfg), ADDED_LATER)


def distill(fm: FlatModel, cfg: DistillConfig, trajectories: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
            n_classes: int, seed: int, *, checkpoint_path: str | Path | None = None, checkpoint_every: int = 50,
            log_every: int = 10, on_log: Callable[[dict], None] | None = None,
            evaluate_every: int = 0, evaluate: Callable[[DistillState], float] | None = None,
            progress: bool = True, mesh: jax.sharding.Mesh | None = None, donate: bool | None = None,
            provenance: str = "") -> tuple[DistillState, DistillState, list[dict]]:
    """Runs ``cfg.iterations`` outer steps (resuming from ``checkpoint_path`` when it exists).

    ``evaluate(state) -> score`` (validation UAR) runs every ``evaluate_every`` steps and at the end;
    the best-scoring state is kept (on ties the later one), and ``best.step`` is its iteration.
    Returns ``(final_state, best_state, evaluations)``.
    Raises :class:`DistillDiverged` as soon as a non-finite loss is seen (at the next log point).
    With ``mesh`` (see :func:`data_mesh`) the synthetic set is sharded over its devices.
    ``donate`` (default: on accelerators) reuses the state's buffers in place; the best state is
    then kept as a copy. ``provenance`` (e.g. :func:`run_fingerprint`) is stored in the checkpoint;
    a checkpoint made from anything else is not resumed but started afresh (logged).
    ``cfg.remat="auto"`` is resolved by :func:`choose_remat` and logged.
    """
    from absl import logging
    from tqdm import tqdm

    cfg.validate(trajectories.shape[1] - 1)
    if cfg.lr_init <= 0:
        raise ValueError("--lr_init=0 (auto) must be resolved first (measure_lr_init)")
    donate = default_donate() if donate is None else donate
    root = jax.random.key(seed)
    state = init_state(cfg, x_train, y_train, n_classes, init_key(seed))
    if cfg.label_init == "expert":
        params = {**state.params, "y": expert_label_logits(fm, cfg, trajectories, state.params["x"], state.labels,
                                                           n_classes)}
        state = dataclasses.replace(state, params=params, opt_state=_tx(cfg, params).init(params))
    best, evaluations, seconds_before, t0 = snapshot(state), [], 0.0, time.perf_counter()
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    best_path = ckpt.with_suffix(".best.npz") if ckpt is not None else None
    if ckpt is not None and ckpt.is_file():
        restored, extra = load_checkpoint(ckpt, state)
        made_from = str(extra.get("provenance", ""))
        if made_from != provenance:
            logging.warning("distillation checkpoint %s was made from other data, experts or settings "
                            "(%s, now %s); starting afresh", ckpt, made_from or "unrecorded", provenance)
        else:
            state = restored
            best = load_checkpoint(best_path, state)[0] if best_path.is_file() else snapshot(state)
            evaluations = [dict(zip(("step", "score"), map(float, row))) for row in extra.get("evaluations", [])]
            seconds_before = float(extra.get("seconds", 0.0))
    trajectories = jnp.asarray(trajectories)
    if mesh is not None:
        state = shard_state(state, mesh)
        trajectories = jax.device_put(trajectories, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    start = int(state.step)
    if start >= cfg.iterations:                  # finished already (e.g. a tuning trial continued): nothing to compile
        step_fn = None
    elif cfg.remat == "auto":
        cfg, step_fn, tried = choose_remat(fm, cfg, n_classes, (state, trajectories, root), donate)
        logging.info("remat=auto chose %s (compiled step bytes tried: %s)", cfg.remat, tried)
    else:
        step_fn = jit_outer_step(fm, cfg, n_classes, donate)
    pending = []

    def check_and_log(step_no: int):
        nonlocal pending
        if int(state.n_nonfinite):
            raise DistillDiverged(
                f"distillation loss became NaN/Inf by iteration {step_no}; lower --lr_img or --lr_lr "
                f"(now {cfg.lr_img}, {cfg.lr_lr}) or --syn_steps; the last checkpoint is kept")
        for i, m in pending:
            row = {"iteration": i, **{k: float(v) for k, v in m.items()}}
            if on_log:
                on_log(row)
        pending = []

    def maybe_evaluate(step_no: int):
        nonlocal best
        if evaluate is None:
            return
        score = float(evaluate(state))
        evaluations.append({"step": step_no, "score": score})
        if score >= max(e["score"] for e in evaluations):     # ties: the later state
            best = snapshot(state)
            if ckpt is not None:
                save_checkpoint(best_path, best)
        if on_log:
            on_log({"iteration": step_no, "val_uar": score})

    if start == 0 and evaluate is not None and not evaluations:
        maybe_evaluate(0)
    bar = tqdm(range(start, cfg.iterations), desc="distill", unit="it", disable=not progress,
               initial=start, total=cfg.iterations)
    for it in bar:
        state, metrics = step_fn(state, trajectories, root)
        pending.append((it + 1, metrics))
        last = it + 1 == cfg.iterations
        if (it + 1) % log_every == 0 or last:
            check_and_log(it + 1)
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['lr']):.2e}")
        if evaluate_every and ((it + 1) % evaluate_every == 0 or last):
            maybe_evaluate(it + 1)
        if ckpt is not None and ((it + 1) % checkpoint_every == 0 or last):
            check_and_log(it + 1)
            ev = np.array([[e["step"], e["score"]] for e in evaluations], np.float64).reshape(-1, 2)
            save_checkpoint(ckpt, state, {"evaluations": ev, "provenance": np.array(provenance),
                                          "seconds": np.array(seconds_before + time.perf_counter() - t0)})
    if int(state.n_lr_floor):
        logging.warning("the learned lr hit its floor --lr_min=%g in %d of %d iterations; consider a smaller "
                        "--lr_lr", cfg.lr_min, int(state.n_lr_floor), int(state.step))
    if evaluate is None:
        best = state
    return state, best, evaluations
