"""Distribution matching (DM; Zhao & Bilen, WACV 2023): a second distillation method, as a baseline
at the same size as the trajectory-matching set.

Each outer step draws a freshly initialised network; the synthetic set of each class is moved so
that its mean embedding (the features the classifier head reads, :meth:`FlatModel.embed`) matches
the mean embedding of a batch of real clips of the class. No experts and no bi-level loop: one
forward/backward per step, so it is cheap, and it is what MTT must beat to be worth its cost. The
synthetic set starts as the trajectory-matching set does (:func:`sersynth.distill.init_state`).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sersynth import distill as distill_lib
from sersynth import train
from sersynth.models import FlatModel


@dataclasses.dataclass(frozen=True)
class DMConfig:
    ipc: int = 10
    iterations: int = 500
    lr_img: float = 1.0          # SGD on the spectrograms (DM's default for images: 1.0, momentum 0.5)
    momentum: float = 0.5
    batch_real: int = 64         # real clips per class per step
    init: str = "real"           # real | herding | mix | noise, as --syn_init
    init_mix: int = 8
    init_noise: float = 0.0
    augment: bool = True         # the same SpecAugment-style masks and shift as training, drawn per sample

    def validate(self) -> None:
        if self.ipc < 1 or self.iterations < 0 or self.batch_real < 1:
            raise ValueError("DM needs ipc >= 1, iterations >= 0 and batch_real >= 1 (--dm_iterations, "
                             "--dm_batch_real)")
        if not self.lr_img > 0:
            raise ValueError(f"--dm_lr_img must be > 0, got {self.lr_img}")


def matching_loss(fm: FlatModel, params: jax.Array, x_syn: jax.Array, x_real: jax.Array, n_classes: int) -> jax.Array:
    """Sum over classes of the squared distance between the mean embeddings of the synthetic set
    (``[C * ipc, ...]``, class-major) and of a real batch (``[C, B, ...]``)."""
    e_syn = fm.embed(params, x_syn)
    e_syn = e_syn.reshape(n_classes, -1, e_syn.shape[-1]).mean(axis=1)
    b = x_real.shape[1]
    e_real = fm.embed(params, x_real.reshape(n_classes * b, *x_real.shape[2:]))
    e_real = e_real.reshape(n_classes, b, -1).mean(axis=1)
    return jnp.sum((e_real - e_syn) ** 2)


def distill(fm: FlatModel, cfg: DMConfig, x_train: np.ndarray, y_train: np.ndarray, n_classes: int,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Runs DM; returns ``(x [C * ipc, frames, mels], labels [C * ipc], info)``."""
    cfg.validate()
    key = jax.random.key(seed)
    start = distill_lib.DistillConfig(ipc=cfg.ipc, init=cfg.init, init_mix=cfg.init_mix, init_noise=cfg.init_noise)
    init = distill_lib.init_state(start, x_train, y_train, n_classes, distill_lib.init_key(seed))
    x_syn, labels = init.params["x"], np.asarray(init.labels)
    tx = optax.sgd(cfg.lr_img, momentum=cfg.momentum)
    opt_state = tx.init(x_syn)
    pools = [np.flatnonzero(np.asarray(y_train) == c) for c in range(n_classes)]
    x_train = np.asarray(x_train)

    @jax.jit
    def step(x_syn, opt_state, x_real, k):
        k_net, k_aug_s, k_aug_r = jax.random.split(k, 3)
        params = fm.init(k_net)
        xr = x_real
        if cfg.augment:
            xr = train.augment(x_real.reshape(-1, *x_real.shape[2:]), k_aug_r).reshape(x_real.shape)

        def loss_of(x):
            return matching_loss(fm, params, train.augment(x, k_aug_s) if cfg.augment else x, xr, n_classes)

        loss, g = jax.value_and_grad(loss_of)(x_syn)
        updates, opt_state = tx.update(g, opt_state, x_syn)
        return optax.apply_updates(x_syn, updates), opt_state, loss

    rng = np.random.default_rng(seed + 29)
    losses, t0 = [], time.perf_counter()
    for it in range(cfg.iterations):
        idx = np.stack([rng.choice(p, cfg.batch_real, replace=p.size < cfg.batch_real) for p in pools])
        x_syn, opt_state, loss = step(x_syn, opt_state, jnp.asarray(x_train[idx]), jax.random.fold_in(key, it))
        losses.append(loss)
    losses = [float(v) for v in losses]
    if losses and not np.isfinite(losses[-1]):
        raise FloatingPointError(f"DM diverged (loss {losses[-1]}); lower --dm_lr_img (now {cfg.lr_img})")
    return np.asarray(x_syn), labels, {"seconds": round(time.perf_counter() - t0, 3), "loss_first": losses[:1],
                                       "loss_last": losses[-1:], "iterations": cfg.iterations}
