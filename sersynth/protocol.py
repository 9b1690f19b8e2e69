"""How every training setting of the report is trained and scored, alike for all of them.

The full-data reference (the ratios' denominator) and the small sets (the distilled set from fixed
and random initialisations, a random real subset, a herding coreset) are trained by one protocol:
:func:`eval_config` (optimiser, epochs, batches, augmentation), the same learning-rate candidates
for every small set (:func:`lr_candidates`), each choosing on the validation speakers, and early
stopping by model selection on validation. Test speakers are only read to score the kept models.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sersynth import distill as distill_lib
from sersynth import evaluate as eval_lib
from sersynth import train
from sersynth.io import atomic_write_json, fingerprint, hold_dir, read_json

if TYPE_CHECKING:
    from sersynth.experts import Experts
    from sersynth.pipeline import RunConfig

EVAL_OPTIMIZERS = ("learned_sgd", "mtt", "expert")
BASELINES = ("kcenter", "dm")      # run on request, beyond the random subset and herding (always run)
LR_CHOICES = ("each", "shared")    # every setting chooses its lr, or the random subset chooses for all


def eval_config(cfg: RunConfig) -> train.TrainConfig:
    """Training on a small set (distilled or a coreset) for ``eval_epochs`` in minibatches of
    ``eval_batch_size`` (default: the experts'; the last partial batch is kept), with the
    distillation's augmentation, by one of three protocols:

    * ``learned_sgd``: plain SGD at the learned lr, constant (the inner loop's own optimiser);
    * ``mtt``: MTT's evaluation: SGD with momentum 0.9, weight decay 5e-4, the learned lr x0.1 at
      half the epochs;
    * ``expert``: the experts' own optimiser, lr and schedule (the paper's).
    """
    # an epoch of a small set: one pass; plain steps whatever trained the experts
    small = dict(epochs=cfg.eval_epochs, batch_size=cfg.eval_batch_size or cfg.expert_train.batch_size,
                 augment=cfg.distill.augment, min_steps_per_epoch=0, sam_rho=0.0)
    if cfg.eval_optimizer == "expert":
        return dataclasses.replace(cfg.expert_train, **small)
    if cfg.eval_optimizer == "mtt":
        return dataclasses.replace(cfg.expert_train, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                                   lr_decay=0.1, lr_decay_every=max(1, cfg.eval_epochs // 2), **small)
    return dataclasses.replace(cfg.expert_train, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                               lr_decay_every=0, **small)


def syn_lr(cfg: RunConfig, learned_lr: float) -> float | None:
    """The lr to train on the distilled set: the learned one, or None = the experts' (paper)."""
    return None if cfg.eval_optimizer == "expert" else learned_lr


def lr_candidates(cfg: RunConfig, learned_lr: float) -> list[float]:
    """The lrs every small-set setting (distilled or coreset) may train at, each setting choosing
    on validation: the learned lr (except with the experts' own optimiser) and the experts' lr x
    each of ``eval_lr_grid``. The same candidates for every setting, so no setting is favoured. An
    empty grid: the learned lr alone (the experts' lr alone with their own optimiser)."""
    grid = [cfg.expert_train.lr * m for m in cfg.eval_lr_grid]
    if cfg.eval_optimizer == "expert":
        return list(dict.fromkeys(grid or [cfg.expert_train.lr]))
    return list(dict.fromkeys([learned_lr, *grid]))


def train_small(cfg, fm, x, targets, lr, inits, key, eval_sets, n_classes, name):
    """Trains on a small set (distilled or a real subset) with :func:`eval_config` and scores it."""
    return eval_lib.train_and_score(name, fm, eval_config(cfg), x, targets, inits, key, eval_sets,
                                    n_classes, lr=lr, parallel=cfg.parallel or None,
                                    epoch_mode=cfg.epoch_mode or None, mesh=distill_lib.data_mesh(cfg.mesh_devices),
                                    select_every=cfg.eval_select_every, patience=cfg.eval_patience,
                                    progress=cfg.progress)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def train_reference(cfg: RunConfig, fm, x, y, inits, key, eval_sets: dict, n_classes: int,
                    store: Path | None = None) -> eval_lib.Result:
    """The full-data reference: models trained on the whole training split with the experts'
    optimiser for ``reference_epochs`` (default: the experts' epochs), from ``eval_seeds`` of the
    fixed initialisations the distilled set is evaluated from, each kept at its best validation UAR
    (checked 10 times over the run).

    With ``store`` (a folder runs share, e.g. ``sersynth table``'s experts folder) the scores are
    kept there as ``reference_<fingerprint>.json`` and reused by any run with the same model,
    training settings, data, initialisations and key: the reference does not depend on the ipc or
    the distilled set, so one table trains it once per (guide, trained model), not once per cell; runs
    sharing the folder at the same time train it once too (:func:`sersynth.io.hold_dir`)."""
    with hold_dir(store, "full-data reference") if store is not None else contextlib.nullcontext():
        return _reference(cfg, fm, x, y, inits, key, eval_sets, n_classes, store)


def _reference(cfg: RunConfig, fm, x, y, inits, key, eval_sets: dict, n_classes: int,
               store: Path | None) -> eval_lib.Result:
    epochs = cfg.reference_epochs or cfg.expert_train.epochs
    tc = dataclasses.replace(cfg.expert_train, epochs=epochs)
    path = None
    if store is not None:
        tag = fingerprint({"model": fm.spec.to_json(), "train": tc.identity(),
                           "data": _digest(x, y, *(a for split in sorted(eval_sets) for a in eval_sets[split])),
                           "inits": _digest(inits), "key": _digest(jax.random.key_data(key)),
                           "splits": sorted(eval_sets), "parallel": cfg.parallel, "epoch_mode": cfg.epoch_mode})
        path = Path(store) / f"reference_{tag}.json"
        if path.is_file():
            r = read_json(path, advice="delete it to train the reference again")
            r["extra"] = {**r["extra"], "reused_from": path.name}    # its train_seconds were spent by an earlier run
            return eval_lib.Result(**{k: r[k] for k in ("name", "uar", "wa", "confusion", "train_seconds",
                                                        "n_train", "extra")})
    result = eval_lib.train_and_score("full_data_reference", fm, tc, x, train.one_hot(y, n_classes), inits, key,
                                      eval_sets, n_classes, parallel=cfg.parallel or None,
                                      epoch_mode=cfg.epoch_mode or None, mesh=distill_lib.data_mesh(cfg.mesh_devices),
                                      select_every=max(1, epochs // 10), epochs=epochs, progress=cfg.progress)
    if path is not None:
        atomic_write_json(path, result.to_json())
    return result


def small_sets(cfg: RunConfig, fm, ex: Experts, x_tr, y_tr, n_classes: int, x_syn, t_syn
               ) -> tuple[dict[str, list[tuple[np.ndarray, np.ndarray]]], dict]:
    """Every small training set of the report, by setting: ``[(x, targets)]``, one per seed for the
    random subsets (a new subset each seed), one for the others: the distilled set, a herding
    coreset, and on request (``cfg.baselines``) a k-center coreset and a DM-distilled set, all of the
    distilled set's size per class. Also returns facts about them (DM's run)."""
    ipc = x_syn.shape[0] // n_classes
    rng = np.random.default_rng(cfg.seed + 13)
    subsets = [eval_lib.random_subset(y_tr, ipc, n_classes, rng) for _ in range(cfg.eval_seeds)]
    real = lambda idx: (x_tr[idx], train.one_hot(y_tr[idx], n_classes))      # noqa: E731
    out = {"distilled": [(x_syn, t_syn)], "random_subset": [real(idx) for idx in subsets],
           "herding_subset": [real(eval_lib.herding_subset(x_tr, y_tr, ipc, n_classes))]}
    info = {}
    if "kcenter" in cfg.baselines:
        # greedy k-center in the feature space of a trained expert (expert 0 after its last epoch)
        feats = eval_lib.embeddings(fm, ex.params[0, -1], x_tr)
        out["kcenter_subset"] = [real(eval_lib.k_center_subset(feats, y_tr, ipc, n_classes))]
    if "dm" in cfg.baselines:
        from sersynth import dm as dm_lib

        dmc = dataclasses.replace(cfg.dm, ipc=ipc, init=cfg.distill.init, init_mix=cfg.distill.init_mix,
                                  init_noise=cfg.distill.init_noise, augment=cfg.distill.augment)
        x_dm, lab_dm, info["dm"] = dm_lib.distill(fm, dmc, x_tr, y_tr, n_classes, cfg.seed)
        out["dm"] = [(x_dm, train.one_hot(lab_dm, n_classes))]
    return out, info


PER_SEED = ("random_subset",)    # small sets drawn anew for every seed (seed s trains on set s from init s)


def _train_set(cfg, fm, name, pairs, inits, key, sets, n_classes, cands, per_seed: bool, extend: int
               ) -> eval_lib.Result:
    """One setting, choosing its lr on validation (looking ``extend`` candidates beyond the largest:
    :func:`sersynth.evaluate.choose_lr`): every init on the one set, or (``per_seed``) seed s on set s
    from init s."""
    if not per_seed:
        x, t = pairs[0]
        return eval_lib.choose_lr(lambda l: train_small(cfg, fm, x, t, l, inits, key, sets, n_classes, name), cands,
                                  extend)

    def at(lr_):
        return eval_lib.merge_seeds(name, [
            train_small(cfg, fm, x, t, lr_, inits[s % len(inits):s % len(inits) + 1],
                        jax.random.fold_in(key, 100 + s), sets, n_classes, name)
            for s, (x, t) in enumerate(pairs)], int(pairs[0][0].shape[0]))

    return eval_lib.choose_lr(at, cands, extend)


def shared_lr(cfg: RunConfig, train_random_subset: Callable[[list[float]], eval_lib.Result], cands: list[float]
              ) -> tuple[list[float], int, eval_lib.Result | None]:
    """``--eval_lr_choice=shared``: the random subset (the neutral small set) chooses among ``cands``
    on validation (``train_random_subset`` looks beyond them under ``--eval_lr_extend``) and every
    other small set of that model trains at its choice, so one model's settings cost one training
    each plus the random subset's other candidates. Returns ``(the candidates the other settings
    train at, how far beyond them they look, the random subset's result or None)``."""
    if cfg.eval_lr_choice != "shared" or len(cands) == 1:
        return cands, cfg.eval_lr_extend, None
    r = train_random_subset(cands)
    return [float(r.extra["lr"])], 0, r


def _mark_shared(results: dict[str, eval_lib.Result], chooser: str) -> None:
    """Records on every small-set setting but ``chooser`` that it trained at the random subset's lr."""
    for name, r in results.items():
        if name.endswith("_init") and name != chooser:
            r.extra["lr_chosen_by"] = "random_subset"


def fixed_inits(cfg: RunConfig, ex: Experts):
    """The initialisations the fixed-init settings train from: the experts' (the distillation's), the
    first ``--eval_fixed_inits`` of them where that is set."""
    return ex.inits[:cfg.eval_fixed_inits] if cfg.eval_fixed_inits else ex.inits


def train_every_setting(cfg: RunConfig, fm, ex: Experts, x_tr, y_tr, sets: dict, n_classes: int, x_syn, t_syn,
                        lr: float, key, store: Path | None = None) -> tuple[dict[str, eval_lib.Result], list[float], dict]:
    """Trains and scores every setting of the report: the experts (as trained), the full-data
    reference, the distilled set from the experts' and from random initialisations, and every
    other small set of :func:`small_sets` from the experts' initialisations. Returns ``(results,
    lr candidates, small sets)``. ``store``: see :func:`train_reference`."""
    results: dict[str, eval_lib.Result] = {}
    # Full data: the experts are models trained on the whole training split.
    uar, wa, cm = eval_lib.score(fm, jnp.asarray(ex.params[:, -1], jnp.float32), sets, n_classes)
    results["full_data"] = eval_lib.Result("full_data", uar, wa, cm, ex.meta["train_seconds_per_expert"],
                                           int(x_tr.shape[0]), {"epochs": ex.n_epochs, "seeds": "experts"})
    results["full_data_reference"] = train_reference(cfg, fm, x_tr, y_tr, ex.inits[:cfg.eval_seeds],
                                                     jax.random.fold_in(key, 4), sets, n_classes, store)
    # Every small set (distilled, random, herding, ...) chooses its lr on validation from the same candidates.
    cands = lr_candidates(cfg, lr)
    pools, info = small_sets(cfg, fm, ex, x_tr, y_tr, n_classes, x_syn, t_syn)
    random_inits = fm.init_many(jax.random.split(jax.random.fold_in(key, 1), cfg.eval_seeds))
    inits = fixed_inits(cfg, ex)
    coresets = [n for n in pools if n != "distilled"]
    keys = {name: jax.random.fold_in(key, 3 + k) for k, name in enumerate(coresets)}
    use, extend, done = shared_lr(cfg, lambda c: _train_set(cfg, fm, "random_subset_fixed_init", pools["random_subset"],
                                                            inits, keys["random_subset"], sets, n_classes, c, True,
                                                            cfg.eval_lr_extend), cands)
    results["distilled_fixed_init"] = _train_set(cfg, fm, "distilled_fixed_init", pools["distilled"], inits, key,
                                                 sets, n_classes, use, False, extend)
    results["distilled_random_init"] = _train_set(cfg, fm, "distilled_random_init", pools["distilled"], random_inits,
                                                  jax.random.fold_in(key, 2), sets, n_classes, use, False, extend)
    for name in coresets:
        setting = f"{name}_fixed_init"
        results[setting] = done if done is not None and name == "random_subset" else _train_set(
            cfg, fm, setting, pools[name], inits, keys[name], sets, n_classes, use, name in PER_SEED, extend)
    if done is not None:
        _mark_shared(results, "random_subset_fixed_init")
    if "dm" in info:
        results["dm_fixed_init"] = dataclasses.replace(results["dm_fixed_init"],
                                                       extra={**results["dm_fixed_init"].extra, "dm": info["dm"]})
    return results, cands, pools


def train_other_model(cfg: RunConfig, fm_other, x_tr, y_tr, sets: dict, n_classes: int, pools: dict,
                      cands: list[float], key, store: Path | None = None) -> dict[str, eval_lib.Result]:
    """Cross-architecture evaluation: a model family other than the one that guided the distillation,
    trained from its own random initialisations on every small set of :func:`small_sets` (the same
    sets, the same lr candidates) and on the full training split (its reference)."""
    inits = fm_other.init_many(jax.random.split(jax.random.fold_in(key, 7), cfg.eval_seeds))
    out = {"full_data_reference": train_reference(cfg, fm_other, x_tr, y_tr, inits, jax.random.fold_in(key, 8), sets,
                                                  n_classes, store)}
    keys = {name: jax.random.fold_in(key, 9 + k) for k, name in enumerate(pools)}
    use, extend, done = shared_lr(cfg, lambda c: _train_set(cfg, fm_other, "random_subset_random_init",
                                                            pools["random_subset"], inits, keys["random_subset"],
                                                            sets, n_classes, c, True, cfg.eval_lr_extend), cands)
    for name, pairs in pools.items():
        setting = f"{name}_random_init"
        out[setting] = done if done is not None and name == "random_subset" else _train_set(
            cfg, fm_other, setting, pairs, inits, keys[name], sets, n_classes, use, name in PER_SEED, extend)
    if done is not None:
        _mark_shared(out, "random_subset_random_init")
    return out
