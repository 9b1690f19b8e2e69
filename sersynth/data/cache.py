"""The feature cache: what data prep writes and the engine reads (numpy + JSON only, no audio libs).

Layout of a cache folder:
  features.npz   x [N, frames, n_mels] float32 (normalised per Mel bin with fold 0's train statistics),
                 y [N] int32, speaker [N] int32, split [N] int8 (0 train, 1 val, 2 test: fold 0),
                 folds [K, N] int8 (the split of each cross-validation fold; K = 1 for one split),
                 mel_mean / mel_std [n_mels] (to undo the normalisation, e.g. for audio renders)
  manifest.json  classes, speakers, protocol, fold_info, files (path, label, speaker, split, seconds),
                 feature and split parameters, skipped files with reasons, ``input_hash`` (audio +
                 parameters) and ``hash`` (the arrays written), which downstream stages record and check.

:meth:`FeatureSet.select_fold` gives fold k's view: its split, features re-normalised with its own
training statistics, and a hash of its own, so experts of one fold are never reused for another.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sersynth.data import splits
from sersynth.io import CorruptFile, load_npz, read_json

SPLIT_CODES = splits.CODES      # {"train": 0, "val": 1, "test": 2}


class CacheError(ValueError):
    """A feature cache is missing, incomplete or not what the run asked for."""


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    x: np.ndarray            # [N, frames, n_mels] float32
    y: np.ndarray            # [N] int32
    speaker: np.ndarray      # [N] int32
    split: np.ndarray        # [N] int8
    mel_mean: np.ndarray     # [n_mels]
    mel_std: np.ndarray      # [n_mels]
    manifest: dict
    folds: np.ndarray | None = None   # [K, N] int8; None: one split (``split``)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def n_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def n_folds(self) -> int:
        return 1 if self.folds is None else int(self.folds.shape[0])

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == SPLIT_CODES[split]
        return self.x[mask], self.y[mask]

    def select_fold(self, k: int) -> "FeatureSet":
        """Fold ``k`` of a cross-validation protocol (fold 0 is the view the cache loads as)."""
        if not 0 <= k < self.n_folds:
            raise CacheError(f"--fold={k}: the cache has {self.n_folds} fold(s) (protocol "
                             f"{self.manifest.get('protocol', 'speaker')}), choose 0..{self.n_folds - 1} or all")
        if k == self.manifest.get("fold", 0):
            return self
        split = self.folds[k]
        m = dict(self.manifest, fold=k, hash=f"{self.manifest['hash']}-fold{k}",
                 files=[dict(f, split=splits.SPLITS[c]) for f, c in zip(self.manifest["files"], split)])
        return self.with_split(split, m)

    def with_split(self, split: np.ndarray, manifest: dict) -> "FeatureSet":
        """The same clips under another split (and ``manifest``), standardised again with the
        statistics of the new training rows, so no clip outside them shapes the features."""
        x, mean, std = normalise(self.x * self.mel_std + self.mel_mean, split == SPLIT_CODES["train"])
        return dataclasses.replace(self, x=x, split=split, mel_mean=mean, mel_std=std, manifest=manifest)


def normalise(x: np.ndarray, train_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-Mel-bin standardisation with the statistics of the training rows: (x', mean, std)."""
    train = x[train_mask]
    if train.shape[0] == 0:
        raise CacheError("the training split is empty")
    mean = train.mean(axis=(0, 1)).astype(np.float32)
    std = (train.std(axis=(0, 1)) + 1e-5).astype(np.float32)
    return ((x - mean) / std).astype(np.float32), mean, std


def cache_files(cache_dir: str | Path) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / "features.npz", d / "manifest.json"


def load(cache_dir: str | Path) -> FeatureSet:
    npz, manifest_path = cache_files(cache_dir)
    if not manifest_path.is_file() or not npz.is_file():
        raise CacheError(f"no feature cache in {cache_dir} (need features.npz and manifest.json); run the prepare stage")
    try:
        manifest = read_json(manifest_path, advice="re-run prepare to rebuild the cache")
        arrays = load_npz(npz, advice="re-run prepare to rebuild the cache")
    except CorruptFile as e:
        raise CacheError(str(e)) from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{manifest_path} is not a cache manifest; re-run prepare to rebuild the cache")
    missing = {"x", "y", "speaker", "split", "mel_mean", "mel_std"} - set(arrays)
    if missing:
        raise CacheError(f"{npz} lacks arrays {sorted(missing)}")
    if array_hash(arrays) != manifest.get("hash"):
        raise CacheError(f"{npz} does not match the hash in {manifest_path}; the cache was modified, re-run prepare")
    return FeatureSet(manifest=manifest, folds=arrays.get("folds"),
                      **{k: arrays[k] for k in ("x", "y", "speaker", "split", "mel_mean", "mel_std")})


def array_hash(arrays: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
