"""Self-describing artifacts: a distilled set and a trained model, each one ``.npz`` that carries
everything needed to use it without the run directory, the feature cache or the recordings.

Each file holds its arrays plus ``meta_json`` (a JSON string): ``format``, ``format_version``,
``sersynth_version``, the class names, the feature settings the spectrograms were made with
(sample rate, STFT, Mel bins and range, clip length), the per-Mel-bin normalisation, the source
corpus and its cache hash. Loading checks the format and that the arrays agree with the metadata.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sersynth.io import CorruptFile, as_json, atomic_save_npz, load_npz

SET_FORMAT = "sersynth.distilled_set"
MODEL_FORMAT = "sersynth.model"
FORMAT_VERSION = 1


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("sersynth")
    except Exception:  # noqa: BLE001 - not installed (PYTHONPATH=. on an accelerator machine)
        return "(source tree)"


def feature_settings(manifest: dict) -> dict:
    """The feature settings of a cache's manifest, with the clip length it resolved (clip_seconds 0
    means 'the longest clip' when preparing; a file needs the number)."""
    feats = dict(manifest["features"])
    feats["clip_seconds"] = float(manifest["clip_seconds"])
    feats["n_samples"] = int(round(feats["clip_seconds"] * feats["sample_rate"]))
    feats["frames"] = int(manifest["frames"])
    return feats


def _save(path: str | Path, kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    meta = {"format": kind, "format_version": FORMAT_VERSION, "sersynth_version": version(), **meta}
    return atomic_save_npz(path, {**arrays, "meta_json": np.array(json.dumps(as_json(meta), sort_keys=True))})


def _load(path: str | Path, kind: str, advice: str) -> tuple[dict, dict[str, np.ndarray]]:
    arrays = load_npz(path, advice)
    if "meta_json" not in arrays:
        raise CorruptFile(f"{path} has no sersynth metadata (written by an older sersynth, or not a {kind} file); "
                          f"{advice}")
    try:
        meta = json.loads(str(arrays.pop("meta_json")))
    except ValueError as e:
        raise CorruptFile(f"{path}: its metadata is not valid JSON ({e}); {advice}") from None
    if not isinstance(meta, dict) or meta.get("format") != kind:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CorruptFile(f"{path} is a {found or 'unknown'} file, not a {kind} file")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CorruptFile(f"{path} was written by a newer sersynth ({meta.get('sersynth_version')}, format "
                          f"{meta['format_version']}); upgrade sersynth to read it")
    return meta, arrays


def _check_features(path, meta: dict, arrays: dict, frames_axis: bool) -> None:
    feats, n_mels = meta["features"], meta["features"]["n_mels"]
    for key in ("mel_mean", "mel_std"):
        if arrays[key].shape != (n_mels,):
            raise CorruptFile(f"{path}: {key} has shape {arrays[key].shape}, the metadata says {n_mels} Mel bins")
    if frames_axis and arrays["x"].shape[1:] != (feats["frames"], n_mels):
        raise CorruptFile(f"{path}: samples are {arrays['x'].shape[1:]} (frames, mels), the metadata says "
                          f"({feats['frames']}, {n_mels})")


@dataclasses.dataclass(frozen=True)
class DistilledSet:
    x: np.ndarray            # [N, frames, n_mels] normalised log-Mel spectrograms
    labels: np.ndarray       # [N] int class of each sample
    targets: np.ndarray      # [N, C] training targets (one-hot, or the learned soft labels)
    lr: float                # the learned inner learning rate
    mel_mean: np.ndarray     # [n_mels] to undo the normalisation (dB = x * std + mean)
    mel_std: np.ndarray
    meta: dict               # classes, features, corpus, cache_hash, model, train, distill, ...

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def save_set(path: str | Path, ds: DistilledSet) -> Path:
    return _save(path, SET_FORMAT, ds.meta, {"x": ds.x, "labels": ds.labels, "targets": ds.targets,
                                             "lr": np.asarray(ds.lr, np.float32), "mel_mean": ds.mel_mean,
                                             "mel_std": ds.mel_std})


def load_set(path: str | Path) -> DistilledSet:
    """A distilled set, checked: format, arrays present, shapes as the metadata says."""
    advice = "re-run the distill stage to rewrite it"
    meta, a = _load(path, SET_FORMAT, advice)
    missing = sorted({"x", "labels", "targets", "lr", "mel_mean", "mel_std"} - set(a)) + \
        sorted({"classes", "features", "model", "train"} - set(meta))
    if missing:
        raise CorruptFile(f"{path} lacks {', '.join(missing)}; {advice}")
    n, c = a["x"].shape[0], len(meta["classes"])
    if a["x"].ndim != 3 or a["labels"].shape != (n,) or a["targets"].shape != (n, c):
        raise CorruptFile(f"{path}: x {a['x'].shape}, labels {a['labels'].shape} and targets {a['targets'].shape} "
                          f"do not agree with {c} classes")
    if n and not (0 <= a["labels"].min() and a["labels"].max() < c):
        raise CorruptFile(f"{path}: labels outside 0..{c - 1}")
    _check_features(path, meta, a, frames_axis=True)
    lr = float(a["lr"])
    if not np.isfinite(lr) or lr <= 0:
        raise CorruptFile(f"{path}: learned lr {lr} is not a positive number; {advice}")
    return DistilledSet(a["x"].astype(np.float32), a["labels"].astype(np.int32), a["targets"].astype(np.float32), lr,
                        a["mel_mean"].astype(np.float32), a["mel_std"].astype(np.float32), meta)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    params: np.ndarray       # [P] flat float32 parameters
    mel_mean: np.ndarray
    mel_std: np.ndarray
    meta: dict               # model (ModelSpec json), classes, features, trained_on, train, ...

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def save_model(path: str | Path, m: TrainedModel) -> Path:
    return _save(path, MODEL_FORMAT, m.meta, {"params": m.params, "mel_mean": m.mel_mean, "mel_std": m.mel_std})


def load_model(path: str | Path) -> TrainedModel:
    """A trained model, checked: format, and a parameter count that fits its model spec."""
    from sersynth.models import ModelSpec, flat_model

    advice = "train it again with sersynth train"
    meta, a = _load(path, MODEL_FORMAT, advice)
    missing = sorted({"params", "mel_mean", "mel_std"} - set(a)) + sorted({"model", "classes", "features"} - set(meta))
    if missing:
        raise CorruptFile(f"{path} lacks {', '.join(missing)}; {advice}")
    _check_features(path, meta, a, frames_axis=False)
    spec = ModelSpec.from_json(meta["model"])
    if spec.n_classes != len(meta["classes"]):
        raise CorruptFile(f"{path}: the model has {spec.n_classes} outputs for {len(meta['classes'])} classes")
    n = flat_model(spec).n_params
    if a["params"].shape != (n,):
        raise CorruptFile(f"{path}: {a['params'].shape} parameters, a {spec.name} of this shape has {n}; {advice}")
    return TrainedModel(a["params"].astype(np.float32), a["mel_mean"].astype(np.float32),
                        a["mel_std"].astype(np.float32), meta)


def describe(meta: dict[str, Any]) -> str:
    """One line about an artifact: what, classes, features, source."""
    f = meta["features"]
    return (f"{meta['format']} from corpus {meta.get('corpus', '?')} (cache {meta.get('cache_hash', '?')}), "
            f"{len(meta['classes'])} classes, {f['n_mels']} Mel bins x {f['frames']} frames "
            f"({f['clip_seconds']:.2f} s at {f['sample_rate']} Hz), sersynth {meta.get('sersynth_version')}")
