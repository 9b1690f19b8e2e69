"""Data prep: corpus folder -> feature cache (decode, resample, fixed length, log-Mel, split, normalise).

Run alone with ``sersynth prepare --corpus=demos --root=DIR --out=CACHE_DIR`` or as the ``prepare``
stage of ``sersynth run``. Re-running with the same audio and parameters reuses the
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

CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    corpus: str = "embedded"                        # one name, or several comma-separated (cross-corpus)
    emotions: tuple[str, ...] = ()                  # () -> the corpus's default set (shared set of several)
    protocol: str = "default"                       # see sersynth.data.splits; default: the corpus's customary
    split_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)
    split_seed: int = 0
    val_speakers: int = 1                           # fold protocols: validation speakers per fold
    test_corpus: str = ""                           # several corpora: this one is the test set
    label_map: tuple[str, ...] = ()                 # "from:to" renames applied to every corpus's labels
    features: features.FeatureConfig = features.FeatureConfig()
    workers: int = 0                                # 0 -> all cores
    strict: bool = False
    max_clip_seconds: float = 0.0                   # with clip_seconds 0: cap the longest clip at this (0: no cap)


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()


def _probe(path: str) -> tuple[float, str, int]:
    """(duration in seconds, "", sample rate), or (0, reason, 0) when the file cannot be used."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file skip reason
        return 0.0, f"does not decode: {str(e).splitlines()[0][:120]}", 0
    if info.frames == 0:
        return 0.0, "zero-length audio", 0
    return info.frames / info.samplerate, "", int(info.samplerate)


def _extract(args: tuple[str, int, features.FeatureConfig]) -> tuple[np.ndarray | None, str]:
    return features.clip_features(*args)


def prepare(root: str | Path, out_dir: str | Path, cfg: PrepareConfig = PrepareConfig(),
            progress: bool = True) -> cache_lib.FeatureSet:
    """Builds (or reuses) the feature cache of the corpus under ``root`` in ``out_dir``."""
    cfg.features.validate()
    names = [n.strip() for n in cfg.corpus.split(",") if n.strip()]
    roots = [Path(r) for r in (root if isinstance(root, (list, tuple)) else str(root).split(","))]
    if len(names) != len(roots):
        raise ValueError(f"--corpus names {len(names)} corpora but {len(roots)} folder(s) were given")
    label_map = _label_map(cfg.label_map)
    items, skipped, where, protocols, native = [], [], {}, [], {}
    for name, r in zip(names, roots):
        if not r.is_dir():
            raise FileNotFoundError(f"corpus folder {r} does not exist")
        corpus = corpora.get(name)
        found, skips = corpus.scan(r)
        prefix = f"{name}/" if len(names) > 1 else ""
        for it in found:
            it = dataclasses.replace(it, path=prefix + it.path, label=label_map.get(it.label, it.label),
                                     speaker=prefix + it.speaker, session=it.session and prefix + it.session)
            items.append(it)
            where[it.path] = r / it.path[len(prefix):]
            native[it.path] = corpus.sample_rate
        skipped += [{**sk, "path": prefix + sk["path"]} for sk in skips]
        protocols.append(corpus.protocol)
    emotions = tuple(cfg.emotions) or _default_emotions(names, items, label_map)
    excluded = sum(it.label not in emotions for it in items)
    items = [it for it in items if it.label in emotions]
    absent = [e for e in emotions if not any(it.label == e for it in items)]
    if absent:
        raise corpora.CorpusError(f"{','.join(map(str, roots))}: no usable files for emotions {absent}")
    protocol = _resolve_protocol(cfg, names, protocols, items)

    digests = [_file_digest(where[it.path]) for it in items]
    input_record = {
        "version": CACHE_VERSION, "corpus": cfg.corpus, "emotions": list(emotions), "protocol": protocol,
        "features": dataclasses.asdict(cfg.features), "split_fractions": list(cfg.split_fractions),
        "split_seed": cfg.split_seed, "val_speakers": cfg.val_speakers, "test_corpus": cfg.test_corpus,
        "max_clip_seconds": cfg.max_clip_seconds,
        "files": [[it.path, it.label, it.speaker, it.session, it.split, d] for it, d in zip(items, digests)],
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

    probes = map_files(_probe, [str(where[it.path]) for it in items], cfg.workers, "probe", progress)
    keep, odd_rates = [], []
    for it, (seconds, reason, rate) in zip(items, probes):
        (skipped.append({"path": it.path, "reason": reason}) if reason else keep.append((it, seconds)))
        if not reason and native[it.path] and rate != native[it.path]:
            odd_rates.append({"path": it.path, "note": f"{rate} Hz where the corpus ships {native[it.path]} Hz; "
                                                       f"resampled to {cfg.features.sample_rate} Hz like the rest"})
    if not keep:
        raise corpora.CorpusError(f"{','.join(map(str, roots))}: none of the {len(items)} files could be decoded")
    longest = max(s for _, s in keep)
    clip_seconds = cfg.features.clip_seconds or (min(longest, cfg.max_clip_seconds) if cfg.max_clip_seconds
                                                 else longest)
    n_samples = int(round(clip_seconds * cfg.features.sample_rate))
    # Incremental: rows of an existing cache with the same feature parameters and clip length are
    # reused for unchanged files (same path and content digest); only new or changed files are decoded.
    reusable = _reusable_rows(existing, cfg.features, clip_seconds)
    digest_of = {it.path: d for it, d in zip(items, digests)}
    todo = [i for i, (it, _) in enumerate(keep) if (it.path, digest_of[it.path]) not in reusable]
    extracted = map_files(_extract, [(str(where[keep[i][0].path]), n_samples, cfg.features) for i in todo],
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
    try:
        assignment = _assign(protocol, [it for it, _ in rows], cfg, names)
    except ValueError as e:
        raise corpora.CorpusError(f"--protocol={protocol}: {e}") from None
    x = np.stack(feats).astype(np.float32)
    y = np.array([emotions.index(it.label) for it, _ in rows], dtype=np.int32)
    short = [{"path": it.path, "seconds": round(sec, 3)} for it, sec in rows if sec < 0.5 * clip_seconds]
    spk = np.array([speakers.index(it.speaker) for it, _ in rows], dtype=np.int32)
    folds = assignment.folds
    for k, fold in enumerate(folds):
        empty = [name for name, code in splits.CODES.items() if not np.any(fold == code)]
        if empty:
            raise corpora.CorpusError(f"--protocol={protocol}: fold {k} has no {'/'.join(empty)} clips")
    # a class no model of a fold can learn: said in the manifest and the summary (not an error: small
    # fold protocols can leave a rare class out of one fold's training speakers)
    untrained = {str(k): [e for c, e in enumerate(emotions) if not np.any((y == c) & (fold == splits.CODES["train"]))]
                 for k, fold in enumerate(folds)}
    untrained = {k: v for k, v in untrained.items() if v}
    x, mean, std = cache_lib.normalise(x, folds[0] == splits.CODES["train"])
    arrays = {"x": x, "y": y, "speaker": spk, "split": folds[0], "folds": folds, "mel_mean": mean, "mel_std": std}
    manifest = {
        "version": CACHE_VERSION, "corpus": cfg.corpus, "root": ",".join(str(r.resolve()) for r in roots),
        "classes": list(emotions), "speakers": speakers,
        "protocol": protocol, "n_folds": int(folds.shape[0]), "fold": 0, "fold_info": assignment.fold_info,
        "speaker_independent": assignment.speaker_independent, "test_corpus": cfg.test_corpus,
        "split_fractions": list(cfg.split_fractions), "split_seed": cfg.split_seed, "val_speakers": cfg.val_speakers,
        "label_map": list(cfg.label_map),
        "features": dataclasses.asdict(cfg.features), "clip_seconds": clip_seconds,
        "frames": int(x.shape[1]), "n_mels": int(x.shape[2]),
        "files": [{"path": it.path, "label": it.label, "speaker": it.speaker, "session": it.session,
                   "split": splits.SPLITS[folds[0, i]], "seconds": round(s, 4),
                   "bytes": where[it.path].stat().st_size, "digest": digest_of[it.path]}
                  for i, (it, s) in enumerate(rows)],
        "extracted_files": len(todo), "reused_files": len(keep) - len(todo),
        "skipped": skipped, "excluded_other_emotions": excluded, "unexpected_sample_rates": odd_rates,
        "short_clips": short, "classes_without_training_clips": untrained,
        "input_hash": input_hash, "hash": cache_lib.array_hash(arrays),
    }
    # Arrays first, manifest last: a manifest on disk always names arrays that are complete.
    manifest_path.unlink(missing_ok=True)
    atomic_save_npz(npz_path, arrays)
    atomic_write_json(manifest_path, manifest)
    return cache_lib.load(out_dir)


def _label_map(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        src, sep, dst = pair.partition(":")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--label_map entries are from:to, got {pair!r}")
        out[src.strip().lower()] = dst.strip().lower()
    return out


def _default_emotions(names: list[str], items: list[corpora.Item], label_map: dict[str, str]) -> tuple[str, ...]:
    """One corpus: its default set. Several: the labels of their default sets (mapped) that every
    corpus actually has, in the first corpus's order."""
    if len(names) == 1:
        return corpora.get(names[0]).default_emotions or tuple(sorted({it.label for it in items}))
    sets = []
    for name in names:
        defaults = corpora.get(name).default_emotions
        have = {it.label for it in items if it.path.startswith(f"{name}/")}
        sets.append([e for e in dict.fromkeys(label_map.get(e, e) for e in defaults) if e in have]
                    if defaults else sorted(have))
    shared = [e for e in dict.fromkeys(sets[0]) if all(e in s for s in sets[1:])]
    if not shared:
        raise corpora.CorpusError(f"corpora {names} share no emotion; map labels with --label_map=from:to")
    return tuple(shared)


def _resolve_protocol(cfg: PrepareConfig, names: list[str], customary: list[str], items: list[corpora.Item]) -> str:
    if cfg.test_corpus:
        if cfg.test_corpus not in names or len(names) < 2:
            raise ValueError(f"--test_corpus={cfg.test_corpus} must be one of several --corpus names ({cfg.corpus})")
        if cfg.protocol not in ("default", "cross_corpus"):
            raise ValueError(f"--test_corpus needs --protocol=cross_corpus (or default), got {cfg.protocol}")
        return "cross_corpus"
    if cfg.protocol == "cross_corpus":
        raise ValueError("--protocol=cross_corpus needs --test_corpus (one of the --corpus names)")
    if cfg.protocol != "default":
        return cfg.protocol
    if len(set(customary)) == 1 and len(names) == 1:
        if customary[0] == "speaker" and items and all(it.split for it in items):
            return "official"          # a CSV manifest that ships its split
        return customary[0]
    return "speaker"                   # several corpora pooled: a speaker split over all of them


def _assign(protocol: str, items: list[corpora.Item], cfg: PrepareConfig, names: list[str]) -> splits.Assignment:
    if protocol == "cross_corpus":
        corpus_of = [it.path.split("/", 1)[0] for it in items]
        return splits.cross_corpus([it.speaker for it in items], corpus_of, cfg.test_corpus, cfg.split_fractions,
                                   cfg.split_seed)
    return splits.assign(protocol, speakers=[it.speaker for it in items], labels=[it.label for it in items],
                         sessions=[it.session for it in items], official=[it.split for it in items],
                         fractions=cfg.split_fractions, seed=cfg.split_seed, val_speakers=cfg.val_speakers)


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
    spk = [len(np.unique(fs.speaker[fs.split == code])) for code in cache_lib.SPLIT_CODES.values()]
    lines.append(f"{'speakers':<12}" + "".join(f"{n:>8}" for n in spk))
    per_speaker = np.bincount(fs.speaker, minlength=len(m["speakers"]))
    lo, hi = int(per_speaker.argmin()), int(per_speaker.argmax())
    lines.append(f"clips per speaker: min {per_speaker[lo]} ({m['speakers'][lo]}), median "
                 f"{int(np.median(per_speaker))}, max {per_speaker[hi]} ({m['speakers'][hi]})")
    protocol = m.get("protocol", "speaker")
    note = f"protocol {protocol}"
    if fs.n_folds > 1:
        note += f": {fs.n_folds} folds, table shows fold {m.get('fold', 0)}"
    if not m.get("speaker_independent", True):
        note += "; NOT speaker-independent (speakers appear in several splits)"
    lines.append(note)
    odd = m.get("unexpected_sample_rates", [])
    if odd:
        lines.append(f"{len(odd)} file(s) at an unexpected sample rate (resampled), e.g. {odd[0]['path']}: "
                     f"{odd[0]['note']}")
    for k, missing in m.get("classes_without_training_clips", {}).items():
        lines.append(f"WARNING: fold {k} has no training clips of {', '.join(missing)}: its models cannot learn "
                     f"{'that class' if len(missing) == 1 else 'those classes'}")
    short = m.get("short_clips", [])
    if short:
        shortest = min(short, key=lambda c: c["seconds"])
        lines.append(f"{len(short)} clip(s) shorter than half the clip length ({m['clip_seconds']:.2f} s) are repeated "
                     f"to fill it; shortest {shortest['path']}: {shortest['seconds']} s")
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
        split_seed=f.split_seed, workers=f.workers, strict=f.strict, protocol=f.protocol,
        max_clip_seconds=f.max_clip_seconds,
        val_speakers=f.val_speakers, test_corpus=f.test_corpus, label_map=tuple(f.label_map or ()),
        features=features.FeatureConfig(sample_rate=f.sample_rate, n_fft=f.n_fft, hop_length=f.hop_length,
                                        n_mels=f.n_mels, fmin=f.fmin, fmax=f.fmax, clip_seconds=f.clip_seconds))
    try:
        print(summary(prepare(f.root, f.out, cfg)))
    except (ValueError, FileNotFoundError) as e:   # CorpusError / CacheError are ValueErrors
        import sys

        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def define_flags(flags_module, root_required: bool = True) -> None:
    """Data-prep flags, shared by this command and the experiment runner."""
    F = flags_module
    F.DEFINE_string("corpus", "embedded", f"corpus layout, or several comma-separated: {', '.join(sorted(corpora.REGISTRY))}")
    F.DEFINE_list("emotions", [], "emotions to keep, in class order (empty: the corpus's default set)")
    F.DEFINE_enum("protocol", "default", list(splits.PROTOCOLS),
                  "evaluation protocol (default: the corpus's customary one; see the README's corpus table)")
    F.DEFINE_list("split", ["0.4", "0.3", "0.3"], "train,val,test fractions (of speakers; of clips for utterance)")
    F.DEFINE_integer("split_seed", 0, "seed of the split / of each fold's validation speakers")
    F.DEFINE_integer("val_speakers", 1, "loso / loso_session: validation speakers per fold")
    F.DEFINE_string("test_corpus", "", "several --corpus names: the one that tests (cross-corpus protocol)")
    F.DEFINE_list("label_map", [], "from:to label renames applied to every corpus, e.g. calm:neutral")
    F.DEFINE_integer("workers", 0, "decode processes (0: all cores)")
    F.DEFINE_bool("strict", False, "fail instead of skipping files that cannot be used")
    F.DEFINE_integer("sample_rate", 16000, "target sample rate (Hz)")
    F.DEFINE_integer("n_fft", 512, "STFT window (samples)")
    F.DEFINE_integer("hop_length", 256, "STFT hop (samples)")
    F.DEFINE_integer("n_mels", 64, "Mel bins")
    F.DEFINE_float("fmin", 0.0, "lowest Mel frequency (Hz)")
    F.DEFINE_float("fmax", 0.0, "highest Mel frequency (Hz, 0: sample_rate/2)")
    F.DEFINE_float("clip_seconds", 0.0, "clip length; clips are trimmed or repeated (0: the longest clip, as the "
                   "paper, capped by --max_clip_seconds)")
    F.DEFINE_float("max_clip_seconds", 0.0, "with --clip_seconds=0: cap on the corpus's longest clip (0: no cap)")


def cli(argv: list[str] | None = None) -> None:
    """``sersynth prepare`` (also ``python -m sersynth.data.prepare``)."""
    import sys

    from absl import app, flags as absl_flags

    from sersynth.cli import short_help

    argv = list(sys.argv if argv is None else argv)
    define_flags(absl_flags)
    absl_flags.DEFINE_string("root", None, "corpus folder as the corpus ships it (several: comma-separated, as --corpus)")
    absl_flags.DEFINE_string("out", None, "feature cache folder to write")
    short_help(argv, ("corpus", "root", "out", "emotions", "protocol", "clip_seconds", "n_mels"), __doc__)
    absl_flags.mark_flags_as_required(["root", "out"])
    app.run(main, argv=argv)


if __name__ == "__main__":
    cli()
