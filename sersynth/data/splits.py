"""Evaluation protocols: which clips train, validate and test, as one split or as cross-validation folds.

Protocols (``--protocol``):
  speaker       seeded speaker-independent split by fractions (the paper: 40/30/30 of DEMoS speakers)
  loso          leave-one-speaker-out folds: fold k tests speaker k
  loso_session  leave-one-session-out folds (IEMOCAP): fold k tests session k
  official      the split the corpus ships (MSP-Podcast ``Split_Set``, a CSV ``split`` column)
  utterance     seeded class-stratified split of clips: NOT speaker-independent (TESS has 2 speakers)
  cross_corpus  several corpora: one (``--test_corpus``) tests, the others' speakers train and validate
  default       the corpus's customary protocol (see ``sersynth.data.corpora``)

In the fold protocols, validation is ``val_speakers`` speakers drawn (per fold, seeded) from the
speakers outside the test group, so every fold stays speaker-independent; the rest train.
"""
from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = ("train", "val", "test")
CODES = {name: i for i, name in enumerate(SPLITS)}
PROTOCOLS = ("default", "speaker", "loso", "loso_session", "official", "utterance", "cross_corpus")


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Split codes per clip: ``folds[k]`` is fold k ([K, N] int8, K = 1 for single-split protocols)."""
    protocol: str
    folds: np.ndarray
    fold_info: list[dict]            # per fold: what it tests / validates on
    speaker_independent: bool


def speaker_split(speakers: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Assigns each distinct speaker to a split; at least one speaker per split.

    Speakers are shuffled with ``seed`` and cut in order at the cumulative fractions (the paper:
    40/30/30 by speaker). Returns ``{speaker: split}``.
    """
    unique = sorted(set(speakers))
    if len(unique) < 3:
        raise ValueError(f"a speaker-independent split needs >= 3 speakers, the corpus has {len(unique)}; "
                         "use --protocol=utterance for a split that is not speaker-independent")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_train, n_val = _cut(len(unique), fractions)
    out = {}
    for rank, idx in enumerate(order):
        out[unique[idx]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def _cut(n: int, fractions) -> tuple[int, int]:
    """How many of ``n`` (>= 3) items train and validate under ``fractions``; at least one each, and
    at least one left to test."""
    f = _fractions(fractions)
    n_train = int(np.clip(round(f[0] * n), 1, n - 2))
    return n_train, int(np.clip(round(f[1] * n), 1, n - n_train - 1))


def _fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or np.any(f <= 0):
        raise ValueError(f"split fractions must be three positive numbers, got {fractions}")
    return f / f.sum()


def utterance_split(labels: list[str], fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Class-stratified seeded split of clips (speakers may appear in several splits)."""
    _fractions(fractions)                               # validated before any class is cut
    out = np.zeros(len(labels), np.int8)
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels)
    for label in sorted(set(labels)):
        idx = np.flatnonzero(arr == label)
        if idx.size < 3:
            raise ValueError(f"class {label!r} has {idx.size} clip(s); an utterance split needs >= 3 per class")
        idx = rng.permutation(idx)
        n_train, n_val = _cut(idx.size, fractions)
        out[idx[n_train:n_train + n_val]] = CODES["val"]
        out[idx[n_train + n_val:]] = CODES["test"]
    return out


def group_folds(groups: list[str], speakers: list[str], val_speakers: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """One fold per distinct group (a speaker or a session): the group tests, ``val_speakers`` of
    the other speakers validate (drawn with ``seed`` and the fold index), the rest train."""
    unique = sorted(set(groups))
    g, s = np.asarray(groups), np.asarray(speakers)
    if len(unique) < 2:
        raise ValueError(f"cross-validation folds need >= 2 groups, the corpus has {len(unique)}")
    if val_speakers < 1:
        raise ValueError(f"--val_speakers must be >= 1, got {val_speakers}")
    folds, info = np.zeros((len(unique), len(groups)), np.int8), []
    for k, group in enumerate(unique):
        rest = sorted(set(s[g != group]))
        if len(rest) < val_speakers + 1:
            raise ValueError(f"fold {k} (test {group}) leaves {len(rest)} speaker(s): too few for {val_speakers} "
                             "validation speaker(s) and at least one training speaker")
        val = sorted(np.random.default_rng([seed, k]).choice(rest, size=val_speakers, replace=False).tolist())
        folds[k, np.isin(s, val)] = CODES["val"]
        folds[k, g == group] = CODES["test"]
        info.append({"fold": k, "test": group, "val_speakers": val})
    return folds, info


def assign(protocol: str, *, speakers: list[str], labels: list[str], sessions: list[str], official: list[str],
           fractions: tuple[float, float, float], seed: int, val_speakers: int = 1) -> Assignment:
    """Applies a protocol (not ``default``: resolve it with the corpus first) to the clips' metadata."""
    if protocol == "speaker":
        of = speaker_split(speakers, fractions, seed)
        return Assignment(protocol, np.array([[CODES[of[s]] for s in speakers]], np.int8),
                          [{"fold": 0, "split_of_speaker": of}], True)
    if protocol == "utterance":
        return Assignment(protocol, utterance_split(labels, fractions, seed)[None], [{"fold": 0}], False)
    if protocol == "official":
        bad = sorted({o for o in official if o not in CODES})
        if bad:
            raise ValueError(f"--protocol=official needs a train/val/test split for every clip; found {bad[:3]} "
                             "(this corpus ships no split, or its split column has other values)")
        return Assignment(protocol, np.array([[CODES[o] for o in official]], np.int8), [{"fold": 0}],
                          _disjoint(speakers, official))
    if protocol == "loso":
        folds, info = group_folds(speakers, speakers, val_speakers, seed)
        return Assignment(protocol, folds, info, True)
    if protocol == "loso_session":
        if any(not x for x in sessions):
            raise ValueError("--protocol=loso_session needs a session per clip; this corpus has none")
        folds, info = group_folds(sessions, speakers, val_speakers, seed)
        return Assignment(protocol, folds, info, True)
    raise ValueError(f"unknown --protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def cross_corpus(speakers: list[str], corpus_of: list[str], test_corpus: str,
                 fractions: tuple[float, float, float], seed: int) -> Assignment:
    """Every clip of ``test_corpus`` tests; the other corpora's speakers are split train : val in the
    ratio of the first two fractions (seeded, at least one speaker each)."""
    f = _fractions(fractions)
    c, s = np.asarray(corpus_of), np.asarray(speakers)
    rest = sorted(set(s[c != test_corpus]))
    if len(rest) < 2:
        raise ValueError(f"the training corpora have {len(rest)} speaker(s); train and val need >= 2")
    order = np.random.default_rng(seed).permutation(len(rest))
    n_val = int(np.clip(round(f[1] / (f[0] + f[1]) * len(rest)), 1, len(rest) - 1))
    val = {rest[i] for i in order[:n_val]}
    fold = np.where(c == test_corpus, CODES["test"], np.where(np.isin(s, sorted(val)), CODES["val"], CODES["train"]))
    return Assignment("cross_corpus", fold.astype(np.int8)[None],
                      [{"fold": 0, "test": test_corpus, "val_speakers": sorted(val)}], True)


def _disjoint(speakers: list[str], split: list[str]) -> bool:
    seen: dict[str, str] = {}
    for s, p in zip(speakers, split):
        if seen.setdefault(s, p) != p:
            return False
    return True
