"""Embedded corpus, corpus parsing, data prep and the feature cache."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from sersynth.data import cache, corpora, features, prepare, splits, synth_corpus
from tests.conftest import TINY_CORPUS, TINY_FEATURES


def test_synthesis_is_deterministic_and_emotion_dependent():
    spk = synth_corpus.make_speakers(TINY_CORPUS)[0]
    a = synth_corpus.synthesize(spk, "anger", 0, 0, TINY_CORPUS)
    b = synth_corpus.synthesize(spk, "anger", 0, 0, TINY_CORPUS)
    c = synth_corpus.synthesize(spk, "sadness", 1, 0, TINY_CORPUS)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and np.max(np.abs(a)) <= 1.0
    assert a.shape != c.shape or not np.allclose(a, c)
    # anger is louder than sadness on average over speakers and takes (energy cue of the literature)
    rms = {e: np.mean([np.sqrt(np.mean(synth_corpus.synthesize(s, e, i, u, TINY_CORPUS) ** 2))
                       for s in synth_corpus.make_speakers(TINY_CORPUS) for u in range(3)])
           for i, e in enumerate(("anger", "sadness"))}
    assert rms["anger"] > 1.5 * rms["sadness"]


def test_generated_layout_parses_as_demos(tiny_corpus):
    items, skipped = corpora.get("demos").scan(tiny_corpus)
    assert not skipped
    assert len(items) == TINY_CORPUS.n_speakers * TINY_CORPUS.utterances * len(TINY_CORPUS.emotions)
    assert {it.label for it in items} == set(TINY_CORPUS.emotions)
    assert len({it.speaker for it in items}) == TINY_CORPUS.n_speakers
    name = items[0].path.split("/")[-1]
    assert name[:3] in ("PR_", "NP_") and items[0].path.startswith("DEMOS/")
    info = sf.info(str(tiny_corpus / items[0].path))
    assert info.samplerate == 16000 and info.channels == 1


def test_speaker_split_is_disjoint_and_seeded():
    spk = [f"s{i}" for i in range(10)]
    a = splits.speaker_split(spk, (0.4, 0.3, 0.3), seed=3)
    assert a == splits.speaker_split(spk, (0.4, 0.3, 0.3), seed=3)
    assert a != splits.speaker_split(spk, (0.4, 0.3, 0.3), seed=4)
    assert sorted(list(a.values()).count(s) for s in splits.SPLITS) == [3, 3, 4]
    with pytest.raises(ValueError, match=">= 3 speakers"):
        splits.speaker_split(["a", "b"], (0.4, 0.3, 0.3), 0)


def test_fix_length_trims_or_repeats():
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(features.fix_length(x, 3), [0, 1, 2])
    np.testing.assert_array_equal(features.fix_length(x, 12), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])


def test_cache_contents(tiny_cache):
    fs, _, _ = tiny_cache
    n = TINY_CORPUS.n_speakers * TINY_CORPUS.utterances * len(TINY_CORPUS.emotions)
    frames = TINY_FEATURES.frames(int(TINY_FEATURES.clip_seconds * TINY_FEATURES.sample_rate))
    assert fs.x.shape == (n, frames, TINY_FEATURES.n_mels) and fs.x.dtype == np.float32
    assert fs.classes == list(TINY_CORPUS.emotions)
    # speaker-independent: no speaker in two splits
    for s in np.unique(fs.speaker):
        assert len(np.unique(fs.split[fs.speaker == s])) == 1
    assert set(np.unique(fs.split)) == {0, 1, 2}
    # normalised with training statistics only
    train = fs.x[fs.split == 0]
    np.testing.assert_allclose(train.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 1)), 1, atol=1e-2)
    assert fs.manifest["files"][0]["bytes"] > 0


def test_cache_reused_and_invalidated(tiny_corpus, tiny_cache, tmp_path):
    fs, out, cfg = tiny_cache
    again = prepare.prepare(tiny_corpus, out, cfg, progress=False)
    assert again.hash == fs.hash and again.manifest["input_hash"] == fs.manifest["input_hash"]
    other = prepare.prepare(tiny_corpus, tmp_path / "c2", prepare.PrepareConfig(
        corpus="embedded", emotions=TINY_CORPUS.emotions, workers=1,
        features=features.FeatureConfig(n_fft=512, hop_length=256, n_mels=8, clip_seconds=0.5)), progress=False)
    assert other.manifest["input_hash"] != fs.manifest["input_hash"] and other.x.shape[2] == 8
    # a tampered cache is refused on load
    npz, _ = cache.cache_files(tmp_path / "c2")
    arrays = dict(np.load(npz))
    arrays["y"] = arrays["y"][::-1].copy()
    np.savez(npz, **arrays)
    with pytest.raises(cache.CacheError, match="does not match the hash"):
        cache.load(tmp_path / "c2")


def test_bad_files_are_skipped_with_reasons(tiny_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    (root / "DEMOS" / "PR_f_01_rab99.wav").write_bytes(b"RIFF not really audio")
    (root / "DEMOS" / "notes_about_take.wav").write_bytes(b"")
    sf.write(root / "DEMOS" / "PR_m_02_tri98.wav", np.zeros(8000, np.float32), 16000)
    cfg = prepare.PrepareConfig(corpus="demos", emotions=TINY_CORPUS.emotions, features=TINY_FEATURES, workers=1)
    fs = prepare.prepare(root, tmp_path / "cache", cfg, progress=False)
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in fs.manifest["skipped"]}
    assert reasons["PR_f_01_rab99.wav"].startswith("does not decode")
    assert "does not match" in reasons["notes_about_take.wav"]
    assert reasons["PR_m_02_tri98.wav"] == "silent audio"
    assert "skipped 3 file(s)" in prepare.summary(fs)
    with pytest.raises(corpora.CorpusError, match="--strict: 3 file"):
        prepare.prepare(root, tmp_path / "cache2", prepare.PrepareConfig(
            corpus="demos", emotions=TINY_CORPUS.emotions, features=TINY_FEATURES, workers=1, strict=True),
            progress=False)
    assert not (tmp_path / "cache2" / "manifest.json").exists()


def test_bad_corpus_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare.prepare(tmp_path / "nope", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(corpora.CorpusError, match="holds no DEMOS"):
        prepare.prepare(tmp_path / "empty", tmp_path / "c", prepare.PrepareConfig(corpus="demos"))
    with pytest.raises(corpora.CorpusError, match="unknown corpus"):
        corpora.get("timit")
    (tmp_path / "bad" / "DEMOS").mkdir(parents=True)
    sf.write(tmp_path / "bad" / "DEMOS" / "PR_f_01_xyz01.wav", np.ones(100, np.float32) * 0.1, 16000)
    with pytest.raises(corpora.CorpusError, match="unknown DEMoS emotion code 'xyz'"):
        prepare.prepare(tmp_path / "bad", tmp_path / "c", prepare.PrepareConfig(corpus="demos"))


def test_generate_is_idempotent_and_refuses_foreign_folders(tmp_path):
    cfg = synth_corpus.CorpusConfig(n_speakers=3, utterances=1, emotions=("anger", "fear"), max_syllables=2,
                                    min_syllables=2)
    out = synth_corpus.generate(tmp_path / "c", cfg, progress=False, workers=1)
    stamp = json.loads((out / "embedded_corpus.json").read_text())
    mtimes = sorted(p.stat().st_mtime_ns for p in out.rglob("*.wav"))
    synth_corpus.generate(tmp_path / "c", cfg, progress=False, workers=1)
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.wav")) == mtimes
    assert stamp["n_speakers"] == 3
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        synth_corpus.generate(tmp_path / "foreign", cfg, progress=False, workers=1)
    with pytest.raises(ValueError, match=">= 3 speakers"):
        synth_corpus.CorpusConfig(n_speakers=2).validate()


def test_incremental_prepare_decodes_only_new_files(tiny_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    extra = sorted((root / "DEMOS").glob("*.wav"))[-1]
    extra.rename(tmp_path / "held_back.wav")
    cfg = prepare.PrepareConfig(corpus="demos", emotions=TINY_CORPUS.emotions, features=TINY_FEATURES, workers=1)
    first = prepare.prepare(root, tmp_path / "cache", cfg, progress=False)
    n = first.x.shape[0]
    assert first.manifest["extracted_files"] == n and first.manifest["reused_files"] == 0
    (tmp_path / "held_back.wav").rename(extra)
    second = prepare.prepare(root, tmp_path / "cache", cfg, progress=False)
    assert second.manifest["extracted_files"] == 1 and second.manifest["reused_files"] == n
    assert second.manifest["input_hash"] != first.manifest["input_hash"]
    # the result equals a cache built from scratch
    fresh = prepare.prepare(root, tmp_path / "fresh", cfg, progress=False)
    np.testing.assert_allclose(second.x, fresh.x, atol=1e-4)
    np.testing.assert_array_equal(second.y, fresh.y)


def test_two_builds_give_identical_caches(tiny_corpus, tiny_cache, tmp_path):
    fs, out, cfg = tiny_cache
    again = prepare.prepare(tiny_corpus, tmp_path / "again", cfg, progress=False)
    a, b = np.load(cache.cache_files(out)[0]), np.load(cache.cache_files(tmp_path / "again")[0])
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    assert again.hash == fs.hash and again.manifest["fold_info"] == fs.manifest["fold_info"]


def test_short_clips_are_counted_and_untrained_classes_refused(tiny_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    t = np.arange(800) / 16000                                     # 0.05 s: repeated 10x to the 0.5 s clip
    sf.write(root / "DEMOS" / "PR_f_01_rab97.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    cfg = prepare.PrepareConfig(corpus="demos", emotions=TINY_CORPUS.emotions, features=TINY_FEATURES, workers=1)
    fs = prepare.prepare(root, tmp_path / "cache", cfg, progress=False)
    assert [c["path"].split("/")[-1] for c in fs.manifest["short_clips"]] == ["PR_f_01_rab97.wav"]
    assert "1 clip(s) shorter than half the clip length" in prepare.summary(fs)
    # a class whose only speaker lands outside the training split cannot be learned: said, named
    lonely = tmp_path / "lonely"
    shutil.copytree(tiny_corpus, lonely)
    speakers = sorted({p.name.split("_")[2] for p in (lonely / "DEMOS").glob("*.wav")})
    for p in (lonely / "DEMOS").glob("*_tri*.wav"):                # sadness: keep one speaker's clips only
        if p.name.split("_")[2] != speakers[0]:
            p.unlink()
    warned = []
    for seed in range(20):          # some split seed puts that speaker in val or test
        fs = prepare.prepare(lonely, tmp_path / f"c{seed}", prepare.PrepareConfig(
            corpus="demos", emotions=TINY_CORPUS.emotions, features=TINY_FEATURES, workers=1, split_seed=seed),
            progress=False)
        train_has_sadness = np.any((fs.y == fs.classes.index("sadness")) & (fs.split == 0))
        assert (fs.manifest["classes_without_training_clips"] == {"0": ["sadness"]}) == (not train_has_sadness)
        if not train_has_sadness:
            warned.append(prepare.summary(fs))
    assert warned and "WARNING: fold 0 has no training clips of sadness" in warned[0]


def _blas_threads(_job) -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info()]


def test_prep_workers_run_one_blas_thread_each():
    """Every worker process of the per-file map runs its numerical libraries on one thread: with a
    thread per core in each of a core's worth of workers, data prep ran 2-3x slower."""
    from sersynth.data.parallel import map_files

    pytest.importorskip("threadpoolctl")        # comes with librosa (through scikit-learn)
    threads = map_files(_blas_threads, list(range(8)), workers=2, progress=False, min_parallel=1)
    assert all(t for t in threads), "no BLAS library found in the workers"
    assert {n for t in threads for n in t} == {1}
