"""Speaker-independent splits: no speaker appears in more than one of train / validation / test."""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def speaker_split(speakers: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Assigns each distinct speaker to a split; at least one speaker per split.

    Speakers are shuffled with ``seed`` and cut in order at the cumulative fractions (the paper:
    40/30/30 by speaker). Returns ``{speaker: split}``.
    """
    unique = sorted(set(speakers))
    if len(unique) < 3:
        raise ValueError(f"a speaker-independent split needs >= 3 speakers, the corpus has {len(unique)}")
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or np.any(f <= 0):
        raise ValueError(f"split fractions must be three positive numbers, got {fractions}")
    f = f / f.sum()
    order = np.random.default_rng(seed).permutation(len(unique))
    n = len(unique)
    n_train = int(np.clip(round(f[0] * n), 1, n - 2))
    n_val = int(np.clip(round(f[1] * n), 1, n - n_train - 1))
    out = {}
    for rank, idx in enumerate(order):
        out[unique[idx]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out
