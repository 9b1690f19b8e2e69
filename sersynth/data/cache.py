"""The feature cache: what data prep writes and the engine reads (numpy + JSON only, no audio libs).

Layout of a cache folder:
  features.npz   x [N, frames, n_mels] float32 (normalised per Mel bin with train-split statistics),
                 y [N] int32, speaker [N] int32, split [N] int8 (0 train, 1 val, 2 test),
                 mel_mean / mel_std [n_mels] (to undo the normalisation, e.g. for audio renders)
  manifest.json  classes, speakers, files (path, label, speaker, split, seconds), feature and split
                 parameters, skipped files with reasons, ``input_hash`` (audio + parameters) and
                 ``hash`` (the arrays written), which downstream stages record and check.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sersynth.io import load_npz, read_json

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


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

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def n_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == SPLIT_CODES[split]
        return self.x[mask], self.y[mask]


def cache_files(cache_dir: str | Path) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / "features.npz", d / "manifest.json"


def load(cache_dir: str | Path) -> FeatureSet:
    npz, manifest_path = cache_files(cache_dir)
    if not manifest_path.is_file() or not npz.is_file():
        raise CacheError(f"no feature cache in {cache_dir} (need features.npz and manifest.json); run the prepare stage")
    manifest = read_json(manifest_path)
    arrays = load_npz(npz)
    missing = {"x", "y", "speaker", "split", "mel_mean", "mel_std"} - set(arrays)
    if missing:
        raise CacheError(f"{npz} lacks arrays {sorted(missing)}")
    if array_hash(arrays) != manifest.get("hash"):
        raise CacheError(f"{npz} does not match the hash in {manifest_path}; the cache was modified, re-run prepare")
    return FeatureSet(manifest=manifest, **{k: arrays[k] for k in ("x", "y", "speaker", "split", "mel_mean", "mel_std")})


def array_hash(arrays: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
