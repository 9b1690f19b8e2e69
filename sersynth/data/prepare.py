"""Data prep: corpus folder -> feature cache (decode, resample, fixed length, log-Mel, split, normalise).

Run alone with ``python -m sersynth.data.prepare --corpus=demos --root=DIR --out=CACHE_DIR`` or as the
``prepare`` stage of ``experiments/run.py``. Re-running with the same audio and parameters reuses the
cache; the cache is written atomically, so an interrupted run leaves the old cache (or none).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from sersynth.data import cache as cache_lib
from sersynth.data import corpora, features, splits
from sersynth.data.parallel import map_files
from sersynth.io import atomic_save_npz, atomic_write_json, fingerprint

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    corpus: str = "embedded"
    emotions: tuple[str, ...] = ()                  # () -> the corpus's default set
    split_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)
    split_seed: int = 0
    features: features.FeatureConfig = features.FeatureConfig()
    workers: int = 0                                # 0 -> all cores
    strict: bool = False


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()


def _probe(path: str) -> tuple[float, str]:
    """Duration in seconds, or (0, reason) when the file cannot be used."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file skip reason
        return 0.0, f"does not decode: {str(e).splitlines()[0][:120]}"
    if info.frames == 0:
        return 0.0, "zero-length audio"
    return info.frames / info.samplerate, ""


def _extract(args: tuple[str, int, features.FeatureConfig]) -> tuple[np.ndarray | None, str]:
    path, n_samples, cfg = args
    try:
        audio = features.load_audio(path, cfg.sample_rate)
    except Exception as e:  # noqa: BLE001
        return None, f"does not decode: {str(e).splitlines()[0][:120]}"
    if audio.size == 0:
        return None, "zero-length audio"
    if float(np.max(np.abs(audio))) < 1e-5:
        return None, "silent audio"
    return features.log_mel(features.fix_length(audio, n_samples), cfg), ""


def prepare(root: str | Path, out_dir: str | Path, cfg: PrepareConfig = PrepareConfig(),
            progress: bool = True) -> cache_lib.FeatureSet:
    """Builds (or reuses) the feature cache of the corpus under ``root`` in ``out_dir``."""
    cfg.features.validate()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} does not exist")
    corpus = corpora.get(cfg.corpus)
    items, skipped = corpus.scan(root)
    emotions = tuple(cfg.emotions) or corpus.default_emotions or tuple(sorted({it.label for it in items}))
    excluded = sum(it.label not in emotions for it in items)
    items = [it for it in items if it.label in emotions]
    absent = [e for e in emotions if not any(it.label == e for it in items)]
    if absent:
        raise corpora.CorpusError(f"{root}: no usable files for emotions {absent}")

    digests = [_file_digest(root / it.path) for it in items]
    input_record = {
        "version": CACHE_VERSION, "corpus": corpus.name, "emotions": list(emotions),
        "features": dataclasses.asdict(cfg.features), "split_fractions": list(cfg.split_fractions),
        "split_seed": cfg.split_seed, "files": [[it.path, it.label, it.speaker, d] for it, d in zip(items, digests)],
    }
    input_hash = fingerprint(input_record)
    npz_path, manifest_path = cache_lib.cache_files(out_dir)
    existing = None
    if manifest_path.is_file() and npz_path.is_file():
        try:
            existing = cache_lib.load(out_dir)
            if existing.manifest.get("input_hash") == input_hash:
                return existing
        except cache_lib.CacheError:
            existing = None  # broken or foreign cache: rebuild it

    probes = map_files(_probe, [str(root / it.path) for it in items], cfg.workers, "probe", progress)
    keep = []
    for it, (seconds, reason) in zip(items, probes):
        (skipped.append({"path": it.path, "reason": reason}) if reason else keep.append((it, seconds)))
    if not keep:
        raise corpora.CorpusError(f"{root}: none of the {len(items)} files could be decoded")
    clip_seconds = cfg.features.clip_seconds or max(s for _, s in keep)
    n_samples = int(round(clip_seconds * cfg.features.sample_rate))
    # Incremental: rows of an existing cache with the same feature parameters and clip length are
    # reused for unchanged files (same path and content digest); only new or changed files are decoded.
    reusable = _reusable_rows(existing, cfg.features, clip_seconds)
    digest_of = {it.path: d for it, d in zip(items, digests)}
    todo = [i for i, (it, _) in enumerate(keep) if (it.path, digest_of[it.path]) not in reusable]
    extracted = map_files(_extract, [(str(root / keep[i][0].path), n_samples, cfg.features) for i in todo],
                          cfg.workers, "log-Mel", progress)
    results = [(reusable.get((it.path, digest_of[it.path])), "") for it, _ in keep]
    for i, result in zip(todo, extracted):
        results[i] = result

    rows, feats = [], []
    for (it, seconds), (feat, reason) in zip(keep, results):
        if feat is None:
            skipped.append({"path": it.path, "reason": reason})
        else:
            rows.append((it, seconds))
            feats.append(feat)
    if cfg.strict and skipped:
        first = skipped[0]
        raise corpora.CorpusError(f"--strict: {len(skipped)} file(s) skipped, first {first['path']}: {first['reason']}")

    speakers = sorted({it.speaker for it, _ in rows})
    assignment = splits.speaker_split(speakers, cfg.split_fractions, cfg.split_seed)
    x = np.stack(feats).astype(np.float32)
    y = np.array([emotions.index(it.label) for it, _ in rows], dtype=np.int32)
    spk = np.array([speakers.index(it.speaker) for it, _ in rows], dtype=np.int32)
    split = np.array([cache_lib.SPLIT_CODES[assignment[it.speaker]] for it, _ in rows], dtype=np.int8)
    train = x[split == 0]
    if train.shape[0] == 0:
        raise corpora.CorpusError("the training split is empty")
    mean = train.mean(axis=(0, 1))
    std = train.std(axis=(0, 1)) + 1e-5
    x = (x - mean) / std
    arrays = {"x": x, "y": y, "speaker": spk, "split": split,
              "mel_mean": mean.astype(np.float32), "mel_std": std.astype(np.float32)}
    manifest = {
        "version": CACHE_VERSION, "corpus": corpus.name, "root": str(root.resolve()),
        "classes": list(emotions), "speakers": speakers,
        "split_of_speaker": assignment, "split_fractions": list(cfg.split_fractions), "split_seed": cfg.split_seed,
        "features": dataclasses.asdict(cfg.features), "clip_seconds": clip_seconds,
        "frames": int(x.shape[1]), "n_mels": int(x.shape[2]),
        "files": [{"path": it.path, "label": it.label, "speaker": it.speaker, "split": assignment[it.speaker],
                   "seconds": round(s, 4), "bytes": (root / it.path).stat().st_size, "digest": digest_of[it.path]}
                  for it, s in rows],
        "extracted_files": len(todo), "reused_files": len(keep) - len(todo),
        "skipped": skipped, "excluded_other_emotions": excluded,
        "input_hash": input_hash, "hash": cache_lib.array_hash(arrays),
    }
    # Arrays first, manifest last: a manifest on disk always names arrays that are complete.
    manifest_path.unlink(missing_ok=True)
    atomic_save_npz(npz_path, arrays)
    atomic_write_json(manifest_path, manifest)
    return cache_lib.load(out_dir)


def _reusable_rows(existing: cache_lib.FeatureSet | None, feat: features.FeatureConfig,
                   clip_seconds: float) -> dict[tuple[str, str], np.ndarray]:
    """``{(path, digest): un-normalised log-Mel [frames, n_mels]}`` from a compatible existing cache."""
    if existing is None:
        return {}
    m = existing.manifest
    if m.get("features") != dataclasses.asdict(feat) or abs(m.get("clip_seconds", -1) - clip_seconds) > 1e-9:
        return {}
    raw = existing.x * existing.mel_std + existing.mel_mean
    return {(f["path"], f["digest"]): raw[i] for i, f in enumerate(m["files"]) if "digest" in f}


def summary(fs: cache_lib.FeatureSet) -> str:
    """A table of clips per class and split, speakers per split, and skipped files."""
    m = fs.manifest
    lines = [f"corpus {m['corpus']}: {len(m['files'])} clips ({m.get('extracted_files', '?')} decoded, "
             f"{m.get('reused_files', 0)} reused), {len(m['speakers'])} speakers, "
             f"{sum(f['seconds'] for f in m['files']) / 3600:.2f} h of audio, "
             f"features [{m['frames']} frames x {m['n_mels']} mels], clip {m['clip_seconds']:.2f} s"]
    header = f"{'class':<12}" + "".join(f"{s:>8}" for s in cache_lib.SPLIT_CODES)
    lines.append(header)
    for c, name in enumerate(fs.classes):
        counts = [int(np.sum((fs.y == c) & (fs.split == code))) for code in cache_lib.SPLIT_CODES.values()]
        lines.append(f"{name:<12}" + "".join(f"{n:>8}" for n in counts))
    spk = [sum(1 for s in m["split_of_speaker"].values() if s == name) for name in cache_lib.SPLIT_CODES]
    lines.append(f"{'speakers':<12}" + "".join(f"{n:>8}" for n in spk))
    if m["skipped"]:
        lines.append(f"skipped {len(m['skipped'])} file(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in m["skipped"][:20]]
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    cfg = PrepareConfig(
        corpus=f.corpus, emotions=tuple(f.emotions or ()), split_fractions=tuple(float(v) for v in f.split),
        split_seed=f.split_seed, workers=f.workers, strict=f.strict,
        features=features.FeatureConfig(sample_rate=f.sample_rate, n_fft=f.n_fft, hop_length=f.hop_length,
                                        n_mels=f.n_mels, fmin=f.fmin, fmax=f.fmax, clip_seconds=f.clip_seconds))
    print(summary(prepare(f.root, f.out, cfg)))


def define_flags(flags_module, root_required: bool = True) -> None:
    """Data-prep flags, shared by this command and the experiment runner."""
    F = flags_module
    F.DEFINE_string("corpus", "embedded", f"corpus layout: {', '.join(sorted(corpora.REGISTRY))}")
    F.DEFINE_list("emotions", [], "emotions to keep, in class order (empty: the corpus's default set)")
    F.DEFINE_list("split", ["0.4", "0.3", "0.3"], "train,val,test fractions of speakers")
    F.DEFINE_integer("split_seed", 0, "seed of the speaker split")
    F.DEFINE_integer("workers", 0, "decode processes (0: all cores)")
    F.DEFINE_bool("strict", False, "fail instead of skipping files that cannot be used")
    F.DEFINE_integer("sample_rate", 16000, "target sample rate (Hz)")
    F.DEFINE_integer("n_fft", 512, "STFT window (samples)")
    F.DEFINE_integer("hop_length", 256, "STFT hop (samples)")
    F.DEFINE_integer("n_mels", 64, "Mel bins")
    F.DEFINE_float("fmin", 0.0, "lowest Mel frequency (Hz)")
    F.DEFINE_float("fmax", 0.0, "highest Mel frequency (Hz, 0: sample_rate/2)")
    F.DEFINE_float("clip_seconds", 0.0, "clip length; clips are trimmed or repeated (0: longest clip)")


if __name__ == "__main__":
    from absl import app, flags as absl_flags

    define_flags(absl_flags)
    absl_flags.DEFINE_string("root", None, "corpus folder as the corpus ships it")
    absl_flags.DEFINE_string("out", None, "feature cache folder to write")
    absl_flags.mark_flags_as_required(["root", "out"])
    app.run(main)
