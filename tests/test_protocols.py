"""Evaluation protocols: folds, official splits, MSP-Podcast, cross-corpus label sets, and the runner on folds."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import soundfile as sf

from sersynth.data import cache as cache_lib
from sersynth.data import corpora, prepare, splits
from tests.test_corpora import FEAT, _prepare, _wav


def _emodb(root, speakers=("03", "08", "09", "10"), emotions="WTF"):
    for i, spk in enumerate(speakers):
        for j, e in enumerate(emotions):
            for text in ("a01", "b02"):
                _wav(root / "wav" / f"{spk}{text}{e}a.wav", 10 * i + j, seconds=0.1 + 0.05 * i)
    return root


def test_loso_folds_are_speaker_independent_and_renormalised(tmp_path):
    fs = _prepare(_emodb(tmp_path / "emodb"), "emodb", tmp_path, emotions=("anger", "sadness", "happiness"))
    m = fs.manifest
    assert m["protocol"] == "loso" and fs.n_folds == 4 and [f["test"] for f in m["fold_info"]] == \
        ["spk03", "spk08", "spk09", "spk10"]
    spk = np.asarray(m["speakers"])[fs.speaker]
    for k in range(4):
        f = fs.select_fold(k)
        assert set(spk[f.split == 2]) == {m["fold_info"][k]["test"]}
        assert set(spk[f.split == 1]) == set(m["fold_info"][k]["val_speakers"]) and len(set(spk[f.split == 1])) == 1
        assert not set(spk[f.split == 0]) & set(spk[f.split != 0])
        train = f.x[f.split == 0]
        np.testing.assert_allclose(train.mean(axis=(0, 1)), 0, atol=1e-4)    # its own training statistics
        assert f.hash == (fs.hash if k == 0 else f"{fs.hash}-fold{k}")
        np.testing.assert_allclose(f.x * f.mel_std + f.mel_mean, fs.x * fs.mel_std + fs.mel_mean, atol=1e-3)
    with pytest.raises(cache_lib.CacheError, match="--fold=4: the cache has 4 fold"):
        fs.select_fold(4)
    again = _prepare(tmp_path / "emodb", "emodb", tmp_path, emotions=("anger", "sadness", "happiness"),
                     split_seed=3)
    assert again.manifest["reused_files"] == fs.x.shape[0]            # a new protocol decodes nothing again


def test_speaker_protocol_and_val_speakers_flag(tmp_path):
    root = _emodb(tmp_path / "emodb", speakers=("03", "08", "09", "10", "11", "12"))
    fs = _prepare(root, "emodb", tmp_path, emotions=("anger",), protocol="loso", val_speakers=2)
    assert all(len(f["val_speakers"]) == 2 for f in fs.manifest["fold_info"])
    fs = _prepare(root, "emodb", tmp_path, emotions=("anger",), protocol="speaker")
    assert fs.n_folds == 1 and fs.manifest["protocol"] == "speaker"
    with pytest.raises(corpora.CorpusError, match="too few for 5 validation speaker"):
        _prepare(root, "emodb", tmp_path, emotions=("anger",), protocol="loso", val_speakers=5)
    with pytest.raises(corpora.CorpusError, match="needs a session per clip"):
        _prepare(root, "emodb", tmp_path, emotions=("anger",), protocol="loso_session")
    with pytest.raises(corpora.CorpusError, match="this corpus ships no split"):
        _prepare(root, "emodb", tmp_path, emotions=("anger",), protocol="official")


def test_iemocap_leave_one_session_out(tmp_path):
    root = tmp_path / "IEMOCAP"
    for ses in (1, 2, 3):
        dialog = f"Ses0{ses}F_impro01"
        rows = []
        for k, (g, code) in enumerate([(g, c) for g in "FM" for c in ("neu", "ang")]):
            utt = f"{dialog}_{g}{k:03d}"
            _wav(root / f"Session{ses}" / "sentences" / "wav" / dialog / f"{utt}.wav", 10 * ses + k)
            rows.append(f"[{k}.0 - {k}.5]\t{utt}\t{code}\t[2.0, 2.0, 2.0]")
        txt = root / f"Session{ses}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(rows))
    fs = _prepare(root, "iemocap", tmp_path, emotions=("anger", "neutral"))
    m = fs.manifest
    assert m["protocol"] == "loso_session" and fs.n_folds == 3
    sessions = np.asarray([f["session"] for f in m["files"]])
    for k in range(3):
        f = fs.select_fold(k)
        assert set(sessions[f.split == 2]) == {f"Session{k + 1}"}
        assert f"Session{k + 1}" not in set(sessions[f.split != 2])


def _msp(root, labels_name="labels_consensus.csv", dev="Development"):
    rows = ["FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"]
    plan = [("1", "A", "Train"), ("1", "N", "Train"), ("2", "H", "Train"), ("2", "S", "Train"),
            ("3", "A", dev), ("3", "N", dev), ("3", "H", dev), ("3", "S", dev),
            ("Unknown", "A", "Test1"), ("4", "N", "Test1"), ("4", "H", "Test1"), ("4", "S", "Test1"),
            ("5", "A", "Test2"), ("2", "X", "Train"), ("2", "C", "Train")]
    for i, (spk, code, split) in enumerate(plan):
        name = f"MSP-PODCAST_0001_{i:04d}.wav"
        _wav(root / "Audios" / name, i)
        rows.append(f"{name},{code},3.0,4.0,3.5,{spk},{'Female' if i % 2 else 'Male'},{split}")
    rows.append("MSP-PODCAST_0002_0000.wav,A,3,3,3,7,Male,Train")               # listed, no audio
    _wav(root / "Audios" / "MSP-PODCAST_0003_0000.wav")                          # audio, no label row
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Labels" / labels_name).write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("labels_name,dev", [("labels_consensus.csv", "Development"),
                                             ("labels_concensus.csv", "Validation")])
def test_msppodcast_official_split(tmp_path, labels_name, dev):
    fs = _prepare(_msp(tmp_path / "MSP", labels_name, dev), "msppodcast", tmp_path)
    m = fs.manifest
    assert m["protocol"] == "official" and fs.classes == ["anger", "happiness", "neutral", "sadness"]
    assert np.bincount(fs.split, minlength=3).tolist() == [4, 4, 4]
    assert m["excluded_other_emotions"] == 1                                    # contempt
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["Audios/MSP-PODCAST_0001_0012.wav"].startswith("Test2 is a separate test set")
    assert reasons["Audios/MSP-PODCAST_0001_0013.wav"] == "annotators reached no agreement (X)"
    assert "but missing" in reasons["Audios/MSP-PODCAST_0002_0000.wav"]
    assert reasons["Audios/MSP-PODCAST_0003_0000.wav"] == f"no row in {labels_name}"
    assert "unknown:MSP-PODCAST_0001_0008" in m["speakers"] and m["speaker_independent"] is True


def test_msppodcast_bad_inputs(tmp_path):
    with pytest.raises(corpora.CorpusError, match="no Labels/labels_consensus.csv"):
        corpora.get("msppodcast").scan(tmp_path)
    root = _msp(tmp_path / "MSP")
    text = (root / "Labels" / "labels_consensus.csv").read_text().replace(",Test2", ",Holdout")
    (root / "Labels" / "labels_consensus.csv").write_text(text)
    with pytest.raises(corpora.CorpusError, match=r"MSP-PODCAST_0001_0012.wav: unknown MSP-Podcast Split_Set 'Holdout'"):
        corpora.get("msppodcast").scan(root)
    (root / "Labels" / "labels_consensus.csv").write_text(text.replace("EmoClass", "Emotion"))
    with pytest.raises(corpora.CorpusError, match=r"missing columns \['EmoClass'\]"):
        corpora.get("msppodcast").scan(root)


def test_csv_with_split_column_uses_it(tmp_path):
    root = tmp_path / "mine"
    rows = ["path,label,speaker,split"]
    for i, (spk, split) in enumerate((("a", "train"), ("b", "dev"), ("c", "test"))):
        for lab in ("happy", "angry"):
            _wav(root / f"{spk}_{lab}.wav", i)
            rows.append(f"{spk}_{lab}.wav,{lab},{spk},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    fs = _prepare(root, "csv", tmp_path)
    assert fs.manifest["protocol"] == "official"
    assert [f["split"] for f in fs.manifest["files"]] == ["train"] * 2 + ["val"] * 2 + ["test"] * 2


def _ravdess(root, actors=(1, 2, 3, 4)):
    for a in actors:
        for emo in ("01", "02", "05", "04"):
            _wav(root / f"Actor_{a:02d}" / f"03-01-{emo}-01-01-01-{a:02d}.wav", a, sr=48000)
    return root


def _cremad(root, actors=("1001", "1002", "1003")):
    for a in actors:
        for emo in ("ANG", "SAD", "NEU", "HAP"):
            _wav(root / "AudioWAV" / f"{a}_IEO_{emo}_HI.wav", int(a))
    return root


def test_cross_corpus_shared_labels_and_test_corpus(tmp_path):
    roots = [_cremad(tmp_path / "CREMA-D"), _ravdess(tmp_path / "RAVDESS")]
    cfg = prepare.PrepareConfig(corpus="cremad,ravdess", features=FEAT, workers=1, test_corpus="ravdess",
                                label_map=("calm:neutral",))
    fs = prepare.prepare(roots, tmp_path / "cache", cfg, progress=False)
    m = fs.manifest
    assert fs.classes == ["anger", "neutral", "sadness"]       # shared (RAVDESS fixture has no happy)
    assert m["protocol"] == "cross_corpus"
    files = m["files"]
    assert {f["split"] for f in files if f["path"].startswith("ravdess/")} == {"test"}
    assert {f["split"] for f in files if f["path"].startswith("cremad/")} == {"train", "val"}
    assert sum(f["label"] == "neutral" for f in files if f["path"].startswith("ravdess/")) == 8   # calm merged
    assert "ravdess/actor01" in m["speakers"] and "cremad/1001" in m["speakers"]
    with pytest.raises(ValueError, match="--test_corpus=emodb must be one of"):
        prepare.prepare(roots, tmp_path / "c2", prepare.PrepareConfig(corpus="cremad,ravdess", features=FEAT,
                                                                      test_corpus="emodb"), progress=False)
    with pytest.raises(ValueError, match="names 2 corpora but 1 folder"):
        prepare.prepare(roots[:1], tmp_path / "c3", prepare.PrepareConfig(corpus="cremad,ravdess", features=FEAT),
                        progress=False)
    with pytest.raises(ValueError, match="from:to"):
        prepare.prepare(roots, tmp_path / "c4", prepare.PrepareConfig(corpus="cremad,ravdess", features=FEAT,
                                                                      label_map=("calm",)), progress=False)


def _with_list_chunk(plain: bytes) -> bytes:
    """The same WAV with a LIST/INFO chunk between fmt and data, as RAVDESS files carry."""
    assert plain[:4] == b"RIFF" and plain[8:12] == b"WAVE"
    pos, chunks = 12, []
    while pos < len(plain):
        cid, size = plain[pos:pos + 4], struct.unpack("<I", plain[pos + 4:pos + 8])[0]
        chunks.append((cid, plain[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    info = b"INFO" + b"ISFT" + struct.pack("<I", 14) + b"Lavf58.29.100\x00"
    out = b""
    for cid, body in chunks:
        if cid == b"data":
            out += b"LIST" + struct.pack("<I", len(info)) + info
        out += cid + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) & 1 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(out)) + b"WAVE" + out


def test_ravdess_extra_riff_chunk_decodes_like_the_plain_file(tmp_path):
    a, b = tmp_path / "a" / "Actor_01", tmp_path / "b" / "Actor_01"
    roots = []
    for base in (a, b):
        for actor in (1, 2, 3):
            _wav(base.parent / f"Actor_{actor:02d}" / f"03-01-05-01-01-01-{actor:02d}.wav", actor, sr=48000)
        roots.append(base.parent)
    target = b / "03-01-05-01-01-01-01.wav"
    target.write_bytes(_with_list_chunk(target.read_bytes()))
    assert b"LIST" in target.read_bytes() and sf.info(target).frames == sf.info(a / target.name).frames
    fa = _prepare(roots[0], "ravdess", tmp_path / "x", emotions=("anger",), protocol="utterance")
    fb = _prepare(roots[1], "ravdess", tmp_path / "y", emotions=("anger",), protocol="utterance")
    assert not fb.manifest["skipped"]
    np.testing.assert_array_equal(fa.x, fb.x)


def test_protocol_flag_choices_are_documented():
    assert set(splits.PROTOCOLS) >= {"speaker", "loso", "loso_session", "official", "utterance", "cross_corpus"}
    assert {c.protocol for c in corpora.REGISTRY.values()} <= set(splits.PROTOCOLS)
    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text()
    for p in splits.PROTOCOLS:
        assert f"`{p}`" in readme, p
    for name in corpora.REGISTRY:
        assert f"`{name}`" in readme, name


def test_runner_runs_every_fold_resumes_and_pools(tmp_path):
    from tests.test_runner import TINY_FLAGS, run_cli

    root = tmp_path / "emodb"
    for i, spk in enumerate(("03", "08", "09")):
        for j, e in enumerate("WTF"):
            for text in ("a01", "b02", "a04"):
                _wav(root / "wav" / f"{spk}{text}{e}a.wav", 10 * i + j, seconds=0.3)
    tiny = [f for f in TINY_FLAGS if not f.startswith(("--corpus=", "--embedded", "--emotions="))]
    flags = ["--flagfile=experiments/flags/emodb.flags", f"--corpus_dir={root}", "--emotions=anger,sadness,happiness",
             *tiny]
    common = [*flags, f"--workdir={tmp_path / 'run'}"]
    run_cli(*common, "--fold=1")
    assert (tmp_path / "run" / "fold1" / "report.json").is_file() and not (tmp_path / "run" / "report.json").exists()
    first = json.loads((tmp_path / "run" / "fold1" / "report.json").read_text())
    assert first["protocol"] == "loso" and first["fold"] == 1
    # every fold, killed with SIGKILL during fold 0's distillation, then the same command again:
    # fold 1 is reused, fold 0 resumes from its checkpoint, fold 2 runs, and the folds are pooled
    from sersynth.io import load_npz
    from tests.test_resume import _kill_when, _results, _start_with

    w = tmp_path / "run"
    _kill_when(_start_with(common), lambda: (w / "fold0" / "distill" / "checkpoint.npz").is_file())
    assert not (w / "fold0" / "report.json").exists()
    proc = run_cli(*common)
    assert "fold 1: evaluated already" in proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n_folds"] == 3 and [f["test"] for f in report["folds"]] == ["spk03", "spk08", "spk09"]
    for name, r in report["results"].items():
        per_fold = [json.loads((tmp_path / "run" / f"fold{k}" / "report.json").read_text())["results"][name]
                    for k in range(3)]
        assert len(r["uar"]["test"]) == sum(len(p["uar"]["test"]) for p in per_fold)
        assert r["test_uar_mean"] == pytest.approx(np.mean([p["test_uar_mean"] for p in per_fold]))
    assert report["folds"][1]["test_uar"] == {n: r["test_uar_mean"] for n, r in first["results"].items()}
    assert (tmp_path / "run" / report["artifacts"]["plots"][0]).stat().st_size > 0
    assert "3 folds pooled" in (tmp_path / "run" / "report.md").read_text()
    # the fold killed mid-distillation and resumed ends exactly as the same fold run uninterrupted
    run_cli(*flags, f"--workdir={tmp_path / 'alone'}", "--fold=0")
    a, b = tmp_path / "alone" / "fold0", w / "fold0"
    x, y = load_npz(a / "distill" / "distilled.npz"), load_npz(b / "distill" / "distilled.npz")
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert _results(a) == _results(b)
    proc = run_cli(*common, "--fold=3", "--stage=evaluate", check=False)
    assert proc.returncode == 2 and "--fold=3: the cache has 3 fold(s)" in proc.stderr.strip().splitlines()[-1]


def test_prepare_command_fails_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for args, message in [(["--corpus=msppodcast", f"--root={tmp_path}"], "error: " + str(tmp_path) + " has no Labels"),
                          (["--corpus=cremad,ravdess", f"--root={tmp_path}"], "error: --corpus names 2 corpora"),
                          (["--corpus=emodb", f"--root={tmp_path}", "--label_map=calm"], "error: --label_map entries")]:
        proc = subprocess.run([sys.executable, "-m", "sersynth.data.prepare", *args, f"--out={tmp_path / 'c'}"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-500:]
        assert not (tmp_path / "c").exists()
