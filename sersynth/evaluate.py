"""Evaluation: train fresh models on a training set (distilled, random subset, full) and measure UAR/WA.

All seeds of one setting are trained by :func:`sersynth.train.fit` (together under ``vmap`` or one
after another, per backend). Model selection uses validation speakers; test speakers are only read
for the final report.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from sersynth import train
from sersynth.models import FlatModel


@dataclasses.dataclass
class Result:
    """Per-seed scores of one training setting."""
    name: str
    uar: dict[str, list[float]]          # split -> [S]
    wa: dict[str, list[float]]
    confusion: dict[str, list]           # split -> [C, C] summed over seeds
    train_seconds: float                 # wall time to train all seeds (compile included)
    n_train: int
    extra: dict = dataclasses.field(default_factory=dict)
    params: object = dataclasses.field(default=None, repr=False)   # trained [S, P] (not written to JSON)

    def mean_std(self, split: str, metric: str = "uar") -> tuple[float, float]:
        v = np.asarray(getattr(self, metric)[split])
        return float(v.mean()), float(v.std())

    def seconds_per_model(self) -> float:
        """``train_seconds`` over the models it counts: every seed at every lr candidate tried."""
        seeds = len(next(iter(self.uar.values())))
        return self.train_seconds / (seeds * max(1, len(self.extra.get("lr_val_uar", {}))))

    def to_json(self) -> dict:
        out = dataclasses.asdict(dataclasses.replace(self, params=None))
        out.pop("params")
        for split in self.uar:
            for metric in ("uar", "wa"):
                m, s = self.mean_std(split, metric)
                out[f"{split}_{metric}_mean"], out[f"{split}_{metric}_std"] = m, s
        return out


def score(fm: FlatModel, params, eval_sets: dict, n_classes: int):
    uar, wa, cm = {}, {}, {}
    for split, (x, y) in eval_sets.items():
        pred = train.predict(fm, params, x)
        uar[split] = [train.uar(y, p, n_classes) for p in pred]
        wa[split] = [train.wa(y, p) for p in pred]
        cm[split] = sum(train.confusion(y, p, n_classes) for p in pred).tolist()
    return uar, wa, cm


class BestOnValidation:
    """Early stopping by model selection: called with ``(epoch, params [S, P])`` during training, it
    keeps each model's parameters at its best validation UAR so far (ties: the later epoch).

    With ``patience`` > 0 it returns True (stop training) once no model has improved its best
    validation UAR strictly for ``patience`` checks in a row."""

    def __init__(self, fm: FlatModel, x_val: np.ndarray, y_val: np.ndarray, n_classes: int, patience: int = 0):
        self.fm, self.x, self.y, self.n_classes, self.patience = fm, x_val, y_val, n_classes, patience
        self.params, self.score, self.epoch = None, None, None
        self.stale = 0                      # checks since any model last improved strictly

    def __call__(self, epoch: int, params: np.ndarray) -> bool:
        scores = np.array([train.uar(self.y, p, self.n_classes) for p in train.predict(self.fm, params, self.x)])
        if self.params is None:
            self.params, self.score, self.epoch = params.copy(), scores, np.full(len(scores), epoch)
            return False
        self.stale = 0 if np.any(scores > self.score) else self.stale + 1
        better = scores >= self.score
        self.params[better], self.score[better], self.epoch[better] = params[better], scores[better], epoch
        return bool(self.patience and self.stale >= self.patience)


def train_and_score(name: str, fm: FlatModel, cfg: train.TrainConfig, x, targets, inits, key, eval_sets: dict,
                    n_classes: int, *, lr: float | None = None, parallel: str | None = None,
                    epoch_mode: str | None = None, progress: bool = False, mesh=None, select_every: int = 0,
                    patience: int = 0, **extra) -> Result:
    """Trains ``len(inits)`` models on ``(x, targets)`` (spread over ``mesh`` if given) and scores
    them on each of ``eval_sets``.

    With ``select_every`` > 0 each model is checked on ``eval_sets["val"]`` every that many epochs
    (and at the end) and kept at its best validation UAR (early stopping by model selection; the
    epochs chosen are in ``extra["selected_epoch"]``); with ``patience`` > 0 training stops once no
    model has improved for that many checks. Test data are never read for either."""
    t0 = time.perf_counter()
    best = BestOnValidation(fm, *eval_sets["val"], n_classes, patience) if select_every else None
    desc = name if lr is None else f"{name} lr {lr:.3g}"
    params, _, _ = train.fit(fm, cfg, x, targets, jax.numpy.asarray(inits), key, lr=lr, parallel=parallel,
                             epoch_mode=epoch_mode, progress=progress, desc=desc, mesh=mesh, on_epochs=best,
                             every=select_every)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    extra = dict(extra)
    if best is not None:
        params = jax.numpy.asarray(best.params)
        extra["selected_epoch"] = best.epoch.tolist()
    uar, wa, cm = score(fm, params, eval_sets, n_classes)
    return Result(name, uar, wa, cm, seconds, int(np.asarray(x).shape[0]), extra, params)


def merge_seeds(name: str, runs: list[Result], n_train: int, extra: dict | None = None) -> Result:
    """One result from single-seed results (e.g. one random subset per seed), seeds in order; the
    epochs each was kept at (``selected_epoch``) are merged too."""
    splits = list(runs[0].uar)
    params = [r.params for r in runs]
    extra = dict(extra or {})
    if all("selected_epoch" in r.extra for r in runs):
        extra["selected_epoch"] = sum((list(r.extra["selected_epoch"]) for r in runs), [])
    return Result(name, {k: sum((r.uar[k] for r in runs), []) for k in splits},
                  {k: sum((r.wa[k] for r in runs), []) for k in splits},
                  {k: np.sum([r.confusion[k] for r in runs], axis=0).tolist() for k in splits},
                  sum(r.train_seconds for r in runs), n_train, extra,
                  None if any(p is None for p in params) else jax.numpy.concatenate(params))


def choose_lr(train_at: Callable[[float], Result], candidates: Sequence[float], extend: int = 0,
              factor: float = 3.0) -> Result:
    """Trains one setting at every candidate lr (``train_at(lr)``) and keeps the one whose models
    have the best mean validation UAR (ties: the earlier candidate). The chosen lr is in
    ``extra["lr"]``, every candidate's mean validation UAR in ``extra["lr_val_uar"]``, and
    ``train_seconds`` counts every candidate's training.

    ``extend``: while the best lr is the largest one tried, up to this many more are tried, each
    ``factor`` times the last, stopping at the first that does not raise validation UAR (a setting
    whose best lr sits at the grid's edge gets to look beyond it); how many were added is in
    ``extra["lr_extended"]``."""
    best, best_lr, tried, seconds = None, None, {}, 0.0

    def attempt(lr):
        nonlocal best, best_lr, seconds
        r = train_at(lr)
        seconds += r.train_seconds
        tried[f"{lr:.6g}"] = r.mean_std("val")[0]
        if best is None or tried[f"{lr:.6g}"] > best.mean_std("val")[0]:
            best, best_lr = r, lr

    for lr in candidates:
        attempt(lr)
    top, added = max(candidates), 0
    while added < extend and best_lr == top:
        top, added = top * factor, added + 1
        attempt(top)
    best.extra.update(lr=float(best_lr), lr_val_uar=tried)
    if extend:
        best.extra["lr_extended"] = added
    best.train_seconds = seconds
    return best


def random_subset(y: np.ndarray, per_class: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples of each class (with replacement only if a class is short)."""
    out = []
    for c in range(n_classes):
        pool = np.flatnonzero(y == c)
        out.append(rng.choice(pool, per_class, replace=pool.size < per_class))
    return np.concatenate(out)


def herding(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy herding (Welling 2009; the coreset baseline of the dataset-distillation literature).

    Picks ``k`` rows of ``features [n, d]`` one at a time so that the mean of the picked rows stays
    closest to the mean of all rows. Returns their indices in order of selection.
    """
    x = features.reshape(features.shape[0], -1).astype(np.float64)
    mu = x.mean(axis=0)
    picked: list[int] = []
    total = np.zeros_like(mu)
    available = np.ones(x.shape[0], bool)
    for t in range(min(k, x.shape[0])):
        dist = np.sum(np.square(mu - (total[None] + x) / (t + 1)), axis=1)
        dist[~available] = np.inf
        j = int(np.argmin(dist))
        picked.append(j)
        available[j] = False
        total += x[j]
    return np.asarray(picked)


def kmeans_nearest(features: np.ndarray, k: int, m: int, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """``[k, m]`` indices: for each of ``k`` k-means clusters of ``features [n, d]`` (k-means++ seeds,
    then Lloyd's iterations), the ``m`` rows nearest its centre, nearest first. The clusters spread
    the ``k`` rows over the data as herding and k-center do, and averaging a cluster's ``m`` nearest
    rows gives a representative sample that is no single row (``--syn_init=kmeans``). With fewer
    than ``k`` distinct rows, clusters share centres; with fewer than ``m`` rows, a row list repeats."""
    x = features.reshape(features.shape[0], -1).astype(np.float64)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    sq = lambda a, c: np.sum(a * a, 1)[:, None] - 2.0 * a @ c.T + np.sum(c * c, 1)[None]   # [n, k] sq. distances
    centres = [x[rng.integers(n)]]
    for _ in range(k - 1):                        # k-means++: the next seed drawn in proportion to d^2
        d2 = np.maximum(sq(x, np.asarray(centres)).min(axis=1), 0.0)
        total = d2.sum()
        centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    c = np.asarray(centres)
    for _ in range(iterations):
        assign = np.argmin(sq(x, c), axis=1)
        new = np.stack([x[assign == j].mean(axis=0) if np.any(assign == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    order = np.argsort(sq(x, c), axis=0, kind="stable").T        # [k, n]: rows by distance to each centre
    return np.stack([np.resize(r, m) for r in order])


def herding_subset(x: np.ndarray, y: np.ndarray, per_class: int, n_classes: int) -> np.ndarray:
    """Indices of ``per_class`` herded samples of each class (in feature space)."""
    return np.concatenate([np.flatnonzero(y == c)[herding(x[y == c], per_class)] for c in range(n_classes)])


def k_center(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-center (farthest-point) coreset (Sener & Savarese 2018): starts from the row nearest
    the mean of ``features [n, d]``, then repeatedly adds the row farthest from every row picked so
    far. Returns the ``k`` indices in order of selection."""
    x = features.reshape(features.shape[0], -1).astype(np.float64)
    first = int(np.argmin(np.sum((x - x.mean(axis=0)) ** 2, axis=1)))
    picked = [first]
    nearest_d = np.sum((x - x[first]) ** 2, axis=1)
    for _ in range(min(k, x.shape[0]) - 1):
        j = int(np.argmax(nearest_d))
        picked.append(j)
        nearest_d = np.minimum(nearest_d, np.sum((x - x[j]) ** 2, axis=1))
    return np.asarray(picked)


def embeddings(fm: FlatModel, params: np.ndarray, x: np.ndarray, chunk: int = 512) -> np.ndarray:
    """``[N, D]`` features one model (``params [P]``) feeds its classifier head, in chunks."""
    f = jax.jit(fm.embed)
    p = jax.numpy.asarray(params, jax.numpy.float32)
    return np.concatenate([np.asarray(f(p, jax.numpy.asarray(x[i:i + chunk]))) for i in range(0, x.shape[0], chunk)])


def k_center_subset(features: np.ndarray, y: np.ndarray, per_class: int, n_classes: int) -> np.ndarray:
    """Indices of a ``per_class`` k-center coreset of each class in ``features [N, D]`` (e.g. a
    trained expert's :func:`embeddings` of the training clips)."""
    return np.concatenate([np.flatnonzero(y == c)[k_center(features[y == c], per_class)] for c in range(n_classes)])
