"""Privacy audit of a distilled set: how close it stays to the real training clips, and how much a
model trained on it gives away about who was in the training data.

Two measurements, both reported next to a reference that shows what "no leak" looks like:

* **Distance to closest record (DCR)**: for every synthetic spectrogram, the RMS distance (in the
  normalised log-Mel units of the cache) to its nearest real training clip, against the same
  distance for real clips of held-out speakers (clips that were never trained on). A synthetic
  sample much closer to a training clip than unseen real speech ever gets is a near-copy. Sharing a
  real coreset (random or herding subset) is the extreme: every DCR is 0.
* **Membership inference (loss threshold, Yeom et al. 2018)**: the attacker guesses "member" when
  a model's loss on a clip is low. The ROC AUC over equal numbers of training clips (members) and
  held-out clips (non-members) is 0.5 when the model reveals nothing; it is computed for the
  full-data models and for models trained on the distilled set.

Held-out clips come from other speakers (the splits are speaker-independent), so part of any gap is
speaker shift rather than memorisation; the comparison between full-data and distilled models is
what the audit is for. Numpy and JAX only (runs on an accelerator machine without audio libraries).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sersynth import train
from sersynth.models import FlatModel


def nearest(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a`` the RMS distance to its nearest row of ``b`` and that row's index."""
    a2 = np.asarray(a, np.float32).reshape(a.shape[0], -1)
    b2 = np.asarray(b, np.float32).reshape(b.shape[0], -1)
    bb = np.sum(b2.astype(np.float64) ** 2, axis=1)
    dist, idx = np.empty(a2.shape[0]), np.empty(a2.shape[0], np.int64)
    for s in range(0, a2.shape[0], chunk):
        block = a2[s:s + chunk]
        # float32 products (BLAS speed), float64 sums: RMS error ~1e-4 for unit-scale features
        d2 = np.sum(block.astype(np.float64) ** 2, axis=1)[:, None] - 2.0 * (block @ b2.T) + bb[None]
        j = np.argmin(d2, axis=1)
        idx[s:s + chunk] = j
        dist[s:s + chunk] = np.sqrt(np.maximum(d2[np.arange(j.size), j], 0.0) / a2.shape[1])
    return dist, idx


def dcr(x_syn: np.ndarray, x_train: np.ndarray, x_holdout: np.ndarray, max_holdout: int = 2000,
        seed: int = 0) -> dict:
    """Distances to the closest training clip, synthetic vs held-out real (at most ``max_holdout``
    of them, drawn with ``seed``), with summary figures."""
    d_syn, nn = nearest(x_syn, x_train)
    if x_holdout.shape[0] > max_holdout:
        x_holdout = x_holdout[np.random.default_rng(seed).choice(x_holdout.shape[0], max_holdout, replace=False)]
    d_hold, _ = nearest(x_holdout, x_train)
    p1, p5 = np.percentile(d_hold, [1, 5])
    return {"synthetic": d_syn.tolist(), "holdout": d_hold.tolist(), "nearest_train_index": nn.tolist(),
            "median_synthetic": float(np.median(d_syn)), "median_holdout": float(np.median(d_hold)),
            "min_synthetic": float(d_syn.min()), "holdout_p1": float(p1), "holdout_p5": float(p5),
            "frac_synthetic_below_holdout_p1": float(np.mean(d_syn < p1)),
            "frac_synthetic_below_holdout_p5": float(np.mean(d_syn < p5)),
            "distinct_nearest_train_clips": int(np.unique(nn).size)}


def per_clip_loss(fm: FlatModel, params: jax.Array, x: np.ndarray, y: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Cross-entropy ``[S, N]`` of each of ``S`` models (stacked flat params) on each clip."""
    z = train.logits(fm, jnp.asarray(params, jnp.float32), x, chunk).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_p, np.asarray(y)[None, :, None], axis=-1)[..., 0]


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U / (n_pos n_neg))."""
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # average ranks of ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = positive.size, negative.size
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def membership_auc(fm: FlatModel, params: jax.Array, members: tuple, nonmembers: tuple, n: int,
                   seed: int = 0) -> dict:
    """Loss-threshold attack: AUC of "member" for ``n`` members vs ``n`` non-members, per model."""
    rng = np.random.default_rng(seed)
    im = rng.choice(members[0].shape[0], min(n, members[0].shape[0]), replace=False)
    inn = rng.choice(nonmembers[0].shape[0], min(n, nonmembers[0].shape[0]), replace=False)
    lm = per_clip_loss(fm, params, members[0][im], members[1][im])
    ln = per_clip_loss(fm, params, nonmembers[0][inn], nonmembers[1][inn])
    per_model = [auc(-lm[s], -ln[s]) for s in range(lm.shape[0])]   # low loss -> member
    return {"auc_mean": float(np.mean(per_model)), "auc_std": float(np.std(per_model)), "per_model": per_model,
            "n_members": int(im.size), "n_nonmembers": int(inn.size),
            "loss_gap": float(np.mean(ln) - np.mean(lm))}


def audit(fm: FlatModel, x_syn: np.ndarray, x_train: np.ndarray, y_train: np.ndarray, x_holdout: np.ndarray,
          y_holdout: np.ndarray, models: dict[str, jax.Array], n_mia: int = 2000, seed: int = 0) -> dict:
    """DCR of the synthetic set and the membership-inference AUC of each named model stack."""
    return {"dcr": dcr(x_syn, x_train, x_holdout, seed=seed),
            "membership_inference": {name: membership_auc(fm, p, (x_train, y_train), (x_holdout, y_holdout), n_mia,
                                                          seed) for name, p in models.items()}}
