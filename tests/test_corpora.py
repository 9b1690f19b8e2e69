"""Each corpus's layout and naming scheme, from fixture trees written as the corpora ship."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sersynth.data import corpora, features, prepare

FEAT = features.FeatureConfig(n_fft=256, hop_length=128, n_mels=8, clip_seconds=0.25)


def _wav(path, seed=0, sr=16000, seconds=0.2, channels=1, subtype="PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.01 * rng.standard_normal(t.size)
    if channels > 1:
        x = np.stack([x] * channels, axis=1)
    sf.write(path, x.astype(np.float32), sr, subtype=subtype)


def _prepare(root, corpus, tmp_path, **kw):
    cfg = prepare.PrepareConfig(corpus=corpus, features=FEAT, workers=1, **kw)
    return prepare.prepare(root, tmp_path / f"cache_{corpus}", cfg, progress=False)


def _labels(fs):
    return {(f["path"], f["label"], f["speaker"]) for f in fs.manifest["files"]}


def test_ravdess(tmp_path):
    root = tmp_path / "RAVDESS"
    for actor in (1, 2, 3):
        for emo in ("01", "05", "08"):
            _wav(root / f"Actor_{actor:02d}" / f"03-01-{emo}-01-01-01-{actor:02d}.wav", actor,
                 sr=48000, channels=2 if actor == 2 else 1)
    _wav(root / "Actor_01" / "03-02-05-01-01-01-01.wav")          # song: not speech
    fs = _prepare(root, "ravdess", tmp_path, emotions=("neutral", "anger", "surprise"))
    assert ("Actor_02/03-01-05-01-01-01-02.wav", "anger", "actor02") in _labels(fs)
    assert fs.x.shape[0] == 9 and fs.classes == ["neutral", "anger", "surprise"]
    assert any("RAVDESS scheme" in s["reason"] for s in fs.manifest["skipped"])
    assert fs.manifest["features"]["sample_rate"] == 16000
    _wav(root / "Actor_03" / "03-01-04-01-01-01-03.wav", 9, sr=44100)             # not RAVDESS's 48 kHz
    fs = _prepare(root, "ravdess", tmp_path, emotions=("neutral", "anger", "surprise", "sadness"))
    odd = fs.manifest["unexpected_sample_rates"]
    assert [o["path"] for o in odd] == ["Actor_03/03-01-04-01-01-01-03.wav"] and "44100 Hz where" in odd[0]["note"]
    assert "1 file(s) at an unexpected sample rate" in prepare.summary(fs) and fs.x.shape[0] == 10


def test_cremad_with_demographics_and_empty_clip(tmp_path):
    root = tmp_path / "CREMA-D"
    for actor in ("1001", "1002", "1003"):
        for emo in ("ANG", "SAD"):
            _wav(root / "AudioWAV" / f"{actor}_IEO_{emo}_HI.wav", int(actor))
    (root / "AudioWAV" / "1076_MTI_SAD_XX.wav").parent.mkdir(exist_ok=True)
    sf.write(root / "AudioWAV" / "1076_MTI_SAD_XX.wav", np.zeros((0,), np.float32), 16000)
    (root / "VideoDemographics.csv").write_text("ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,x,y\n1002,21,Female,x,y\n")
    items, _ = corpora.get("cremad").scan(root)
    assert {it.gender for it in items if it.speaker == "1001"} == {"m"}
    fs = _prepare(root, "cremad", tmp_path, emotions=("anger", "sadness"))
    assert fs.x.shape[0] == 6
    assert {s["path"]: s["reason"] for s in fs.manifest["skipped"]}["AudioWAV/1076_MTI_SAD_XX.wav"] == "zero-length audio"


def test_emodb_tess_savee_emovo_shemo_names():
    cases = {
        "emodb": ("wav/03a01Wa.wav", "anger", "spk03"),
        "tess": ("yaf_Sad/YAF_bath_ps.wav", "surprise", "YAF"),
        "savee": ("AudioData/JK/su07.wav", "surprise", "JK"),
        "emovo": ("f2/gio-f2-b1.wav", "happiness", "f2"),
        "shemo": ("female/F03H12.wav", "happiness", "F03"),
    }
    from pathlib import Path

    parsers = {"emodb": corpora._parse_emodb, "tess": corpora._parse_tess, "savee": corpora._parse_savee,
               "emovo": corpora._parse_emovo, "shemo": corpora._parse_shemo}
    codes = {"emodb": corpora._EMODB_CODES, "tess": corpora._TESS_CODES, "savee": corpora._SAVEE_CODES,
             "emovo": corpora._DEMOS_EMOTION, "shemo": corpora._SHEMO_CODES}
    for name, (path, label, speaker) in cases.items():
        fields = parsers[name](Path(path))
        assert codes[name][fields["code"]] == label and fields["speaker"] == speaker, name


def test_savee_flat_copies_are_deduplicated(tmp_path):
    root = tmp_path / "SAVEE"
    for spk in ("DC", "JE", "JK", "KL"):
        for code in ("a01", "sa01"):
            _wav(root / "AudioData" / spk / f"{code}.wav")
    _wav(root / "AudioData" / "DC_a01.wav")
    items, skipped = corpora.get("savee").scan(root)
    assert len(items) == 8 and skipped == [{"path": "AudioData/DC_a01.wav",
                                            "reason": "duplicate of the same SAVEE recording"}]


def test_tess_two_speakers_get_an_utterance_split(tmp_path):
    root = tmp_path / "TESS"
    for spk, folder in (("OAF", "OAF_angry"), ("YAF", "YAF_Angry")):
        for word in ("back", "bar", "base"):
            _wav(root / folder / f"{spk}_{word}_angry.wav")
            _wav(root / folder.replace("ngry", "ad").replace("Angry", "sad") / f"{spk}_{word}_sad.wav")
    with pytest.raises(ValueError, match="needs >= 3 speakers, the corpus has 2"):
        _prepare(root, "tess", tmp_path, emotions=("anger", "sadness"), protocol="speaker")
    fs = _prepare(root, "tess", tmp_path, emotions=("anger", "sadness"))      # customary: utterance split
    assert fs.manifest["protocol"] == "utterance" and fs.manifest["speaker_independent"] is False
    for c in range(2):
        assert sorted(np.bincount(fs.split[fs.y == c], minlength=3)) == [2, 2, 2]
    assert "NOT speaker-independent" in prepare.summary(fs)
    assert "clips per speaker: min 6 (OAF), median 6, max 6 (OAF)" in prepare.summary(fs)


def test_emodb_24bit_float_and_flac(tmp_path):
    root = tmp_path / "emodb"
    for i, spk in enumerate(("03", "08", "09")):
        _wav(root / "wav" / f"{spk}a01Wa.wav", i, subtype="PCM_24")
        _wav(root / "wav" / f"{spk}a01Ta.wav", i, subtype="FLOAT")
    _wav(root / "wav" / "10a02Fb.flac", 5)
    fs = _prepare(root, "emodb", tmp_path, emotions=("anger", "sadness", "happiness"))
    assert fs.x.shape[0] == 7 and np.all(np.isfinite(fs.x))


def test_csv_manifest(tmp_path):
    root = tmp_path / "mine"
    rows = ["path,label,speaker"]
    for i, spk in enumerate(("a", "b", "c")):
        for lab in ("happy", "angry"):
            _wav(root / "clips" / f"{spk}_{lab}.wav", i)
            rows.append(f"clips/{spk}_{lab}.wav,{lab},{spk}")
    rows.append("clips/gone.wav,happy,a")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    fs = _prepare(root, "csv", tmp_path)
    assert fs.classes == ["anger", "happiness"] and fs.x.shape[0] == 6
    assert fs.manifest["skipped"][0]["path"] == "clips/gone.wav"


def test_csv_paths_outside_the_corpus_folder_are_skipped(tmp_path):
    root = tmp_path / "corpus" / "mine"
    rows = ["path,label,speaker"]
    for i, spk in enumerate(("a", "b", "c")):
        for lab in ("happy", "angry"):
            _wav(root / f"{spk}_{lab}.wav", i)
            rows.append(f"{spk}_{lab}.wav,{lab},{spk}")
    _wav(tmp_path / "outside_root.wav", 9)                       # a real WAV, but not the corpus's
    (root / "link.wav").symlink_to(tmp_path / "outside_root.wav")
    escapes = ["../../outside_root.wav", str(tmp_path / "outside_root.wav"), "../../../../../../etc/passwd",
               "/etc/hostname", "link.wav"]
    rows += [f"{p},happy,a" for p in escapes]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    fs = _prepare(root, "csv", tmp_path)
    assert fs.x.shape[0] == 6
    assert all(not f["path"].startswith(("..", "/")) and f["path"] != "link.wav" for f in fs.manifest["files"])
    reasons = {s["path"]: s["reason"] for s in fs.manifest["skipped"]}
    assert all("outside the corpus folder" in reasons[p] for p in escapes)
    with pytest.raises(ValueError, match="outside the corpus folder"):
        _prepare(root, "csv", tmp_path / "strict", strict=True)


def test_unknown_code_names_the_file(tmp_path):
    _wav(tmp_path / "e" / "wav" / "03a01Xa.wav")
    with pytest.raises(corpora.CorpusError, match=r"wav/03a01Xa.wav: unknown EmoDB emotion code 'X'"):
        corpora.get("emodb").scan(tmp_path / "e")


def test_iemocap_labels_speakers_and_merge(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    lines = {}
    for ses in (1, 2):
        dialog = f"Ses0{ses}F_impro01"
        rows = ["% header line", ""]
        for k, (gender, code) in enumerate([("F", "neu"), ("M", "exc"), ("F", "ang"), ("M", "sad"), ("F", "xxx"),
                                            ("M", "fru")]):
            utt = f"{dialog}_{gender}{k:03d}"
            _wav(root / f"Session{ses}" / "sentences" / "wav" / dialog / f"{utt}.wav", ses * 10 + k)
            rows += [f"[{k}.0000 - {k}.9000]\t{utt}\t{code}\t[2.5000, 2.5000, 2.5000]",
                     "C-E1:\tNeutral state;\t()", "A-E2:\tval 3; act 2; dom  3;\t()", ""]
        lines[ses] = rows
        txt = root / f"Session{ses}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(rows))
    _wav(root / "Session2" / "sentences" / "wav" / "Ses02F_impro01" / "Ses02F_impro01_F099.wav")  # unlabelled
    items, skipped = corpora.get("iemocap").scan(root)
    got = {(Path(it.path).stem, it.label, it.speaker) for it in items}
    assert ("Ses01F_impro01_M001", "happiness", "Ses01M") in got       # exc merged into happiness
    assert ("Ses02F_impro01_F000", "neutral", "Ses02F") in got
    assert {s["reason"] for s in skipped} == {"annotators reached no majority (xxx)",
                                              "no label for this utterance in dialog/EmoEvaluation"}
    assert len({it.speaker for it in items}) == 4
    fs = _prepare(root, "iemocap", tmp_path)
    assert fs.classes == ["anger", "happiness", "neutral", "sadness"] and fs.x.shape[0] == 8
    assert fs.manifest["excluded_other_emotions"] == 2                 # frustration


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_corpus_is_read_as_ravdess(tmp_path):
    from sersynth.data import espeak_corpus

    root = espeak_corpus.generate(tmp_path / "esp", actors=2)
    items, skipped = corpora.get("ravdess").scan(root)
    assert len(items) == 120 and not skipped
    assert {it.label for it in items} == {"neutral", "calm", "happiness", "sadness", "anger", "fear", "disgust",
                                          "surprise"}
    assert {it.speaker for it in items} == {"actor01", "actor02"}
    x, sr = sf.read(next(root.rglob("*.wav")))
    assert sr == 48000 and x.ndim == 1 and np.abs(x).max() > 0.05


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_corpus_is_read_as_emodb(tmp_path):
    from sersynth.data import espeak_corpus

    root = espeak_corpus.generate(tmp_path / "esp", actors=2, layout="emodb")
    items, skipped = corpora.get("emodb").scan(root)
    assert len(items) == 140 and not skipped
    assert {it.label for it in items} == set(corpora.get("emodb").default_emotions)
    assert {it.speaker for it in items} == {"spk03", "spk08"}
    x, sr = sf.read(next(root.rglob("*.wav")))
    assert sr == 16000 and x.ndim == 1 and np.abs(x).max() > 0.05
    with pytest.raises(ValueError, match="at most|1..10"):
        espeak_corpus.generate(tmp_path / "x", actors=11, layout="emodb")
    with pytest.raises(ValueError, match="--layout"):
        espeak_corpus.generate(tmp_path / "x", layout="iemocap")


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_corpus_is_read_as_cremad(tmp_path):
    from sersynth.data import espeak_corpus

    root = espeak_corpus.generate(tmp_path / "esp", actors=2, layout="cremad")
    items, skipped = corpora.get("cremad").scan(root)
    assert len(items) == 164 and not skipped                      # 82 per actor, as CREMA-D
    assert {it.label for it in items} == set(corpora.get("cremad").default_emotions)
    assert {it.speaker for it in items} == {"1001", "1002"}
    assert {it.gender for it in items} == {"m", "f"}               # from VideoDemographics.csv
    assert sum(Path(it.path).stem.endswith(("_LO", "_MD", "_HI")) for it in items) == 2 * 15
    x, sr = sf.read(next(root.rglob("*.wav")))
    assert sr == 16000 and x.ndim == 1 and np.abs(x).max() > 0.05
    with pytest.raises(ValueError, match="1..91"):
        espeak_corpus.generate(tmp_path / "x", actors=92, layout="cremad")
