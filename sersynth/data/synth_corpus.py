"""The embedded default corpus: deterministic emotional speech made locally, no download.

A source-filter voice (glottal sawtooth with jitter, shimmer, breath noise and a spectral tilt,
through cascaded formant resonators per vowel) speaks random syllable strings. Emotion moves
the prosodic and voice-quality correlates reported in the vocal-affect literature (Banse & Scherer
1996; Juslin & Laukka 2003): f0 level, range and contour, speaking rate, energy, spectral tilt,
jitter/shimmer and breathiness. Speakers differ in f0 range, vocal-tract length, voice quality and
in how they express each emotion; every utterance has its own intensity, recording gain and
background noise, so classes overlap (guilt/sadness, anger/happiness, fear/surprise) and a
speaker-independent classifier stays clearly below 100% UAR.

Files are written in the DEMoS layout (``DEMOS/{PR,NP}_<g>_<NN>_<emo><utt>.wav``; neutral under
``NEU/``), so the same corpus parser reads the embedded corpus and the real one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import scipy.signal

from sersynth.data.parallel import map_files
from sersynth.io import LOCK_FILE, atomic_write_json

# DEMoS emotion codes (file name legend of the corpus distribution).
DEMOS_CODES = {
    "anger": "rab", "disgust": "dis", "fear": "pau", "guilt": "col",
    "happiness": "gio", "sadness": "tri", "surprise": "sor", "neutral": "neu",
}
PAPER_EMOTIONS = ("anger", "disgust", "fear", "guilt", "happiness", "sadness", "surprise")


@dataclasses.dataclass(frozen=True)
class EmotionProfile:
    """Offsets an emotion applies to a speaker's neutral voice (at full intensity)."""
    f0_st: float        # mean f0 shift, semitones
    f0_range: float     # multiplier of the accent (pitch movement) range
    contour: float      # global slope over the utterance, semitones (+ rising, - falling)
    final_rise: float   # rise on the last syllable, semitones
    rate: float         # speaking-rate multiplier
    energy_db: float    # level change
    tilt: float         # spectral tilt change: + brighter (flatter), - darker (steeper)
    jitter: float       # relative period perturbation
    shimmer: float      # relative amplitude perturbation
    breath: float       # aspiration noise relative to voicing


PROFILES = {
    "neutral":   EmotionProfile(0.0, 1.0, -2.0, 0.0, 1.00, 0.0, 0.0, 0.005, 0.04, 0.05),
    "anger":     EmotionProfile(4.0, 1.5, -1.5, 0.0, 1.20, 6.0, 0.55, 0.015, 0.08, 0.04),
    "happiness": EmotionProfile(3.5, 1.7, 0.0, 1.0, 1.10, 3.0, 0.30, 0.010, 0.05, 0.06),
    "fear":      EmotionProfile(5.0, 0.8, 0.5, 0.0, 1.25, 0.0, 0.00, 0.030, 0.10, 0.20),
    "sadness":   EmotionProfile(-2.0, 0.5, -3.0, 0.0, 0.75, -6.0, -0.45, 0.012, 0.06, 0.25),
    "disgust":   EmotionProfile(-1.5, 0.9, -2.0, 0.0, 0.80, 0.0, -0.20, 0.020, 0.15, 0.10),
    "surprise":  EmotionProfile(4.0, 2.0, 1.0, 4.0, 1.00, 2.0, 0.20, 0.010, 0.05, 0.08),
    "guilt":     EmotionProfile(-1.0, 0.6, -2.5, 0.0, 0.85, -4.0, -0.35, 0.012, 0.06, 0.20),
}

# Formants (Hz) of five vowels for an adult male vocal tract (Peterson & Barney style values).
VOWELS = np.array([
    [730.0, 1090.0, 2440.0], [530.0, 1840.0, 2480.0], [270.0, 2290.0, 3010.0],
    [570.0, 840.0, 2410.0], [300.0, 870.0, 2240.0],
])
BANDWIDTHS = np.array([80.0, 100.0, 120.0])


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Size and seed of the embedded corpus (defaults: small enough for a 2-core CPU)."""
    n_speakers: int = 30
    utterances: int = 10             # per speaker and emotion
    emotions: tuple[str, ...] = PAPER_EMOTIONS
    sample_rate: int = 16000
    seed: int = 0
    min_syllables: int = 5
    max_syllables: int = 9

    def validate(self) -> None:
        if self.n_speakers < 3:
            raise ValueError(f"embedded corpus needs >= 3 speakers for a train/val/test split, got {self.n_speakers}")
        if self.utterances < 1:
            raise ValueError(f"embedded corpus needs >= 1 utterance per speaker and emotion, got {self.utterances}")
        unknown = [e for e in self.emotions if e not in PROFILES]
        if unknown:
            raise ValueError(f"embedded corpus has no profile for emotions {unknown}; known: {sorted(PROFILES)}")
        if not 2 <= self.min_syllables <= self.max_syllables:
            raise ValueError("embedded corpus needs 2 <= min_syllables <= max_syllables")


@dataclasses.dataclass(frozen=True)
class Speaker:
    index: int
    gender: str
    f0_hz: float
    vtl: float              # formant scale (shorter tract -> higher formants)
    rate: float             # syllables per second
    tilt: float
    breath: float
    jitter: float
    expression: np.ndarray  # [n_emotions, 4] idiosyncratic scaling of f0 shift, rate, energy, tilt


def make_speakers(cfg: CorpusConfig) -> list[Speaker]:
    rng = np.random.default_rng([cfg.seed, 1])
    speakers = []
    for i in range(cfg.n_speakers):
        gender = "f" if i % 2 == 0 else "m"
        f0 = rng.uniform(175, 250) if gender == "f" else rng.uniform(95, 145)
        vtl = rng.uniform(1.08, 1.22) if gender == "f" else rng.uniform(0.9, 1.05)
        speakers.append(Speaker(
            index=i + 1, gender=gender, f0_hz=float(f0), vtl=float(vtl),
            rate=float(rng.uniform(4.0, 5.0)), tilt=float(rng.uniform(0.87, 0.93)),
            breath=float(rng.uniform(0.02, 0.15)), jitter=float(rng.uniform(0.003, 0.012)),
            expression=rng.uniform(0.75, 1.25, size=(len(cfg.emotions), 4)),
        ))
    return speakers


def _resonator_cascade(x: np.ndarray, formants: np.ndarray, sr: int) -> np.ndarray:
    for f, bw in zip(formants, BANDWIDTHS):
        r = np.exp(-np.pi * bw / sr)
        theta = 2.0 * np.pi * min(f, 0.45 * sr) / sr
        x = scipy.signal.lfilter([1.0 - r], [1.0, -2.0 * r * np.cos(theta), r * r], x)
    return x


def _smooth_noise(rng: np.random.Generator, n: int, hop: int) -> np.ndarray:
    """Piecewise-linear random curve with one knot every ``hop`` samples (unit variance)."""
    knots = rng.standard_normal(n // hop + 2)
    return np.interp(np.arange(n) / hop, np.arange(knots.size), knots)


def synthesize(speaker: Speaker, emotion: str, emotion_index: int, utterance: int,
               cfg: CorpusConfig) -> np.ndarray:
    """One utterance, float32 mono in [-1, 1] at ``cfg.sample_rate``. Deterministic in its arguments."""
    sr = cfg.sample_rate
    rng = np.random.default_rng([cfg.seed, 2, speaker.index, emotion_index, utterance])
    p = PROFILES[emotion]
    neutral = PROFILES["neutral"]
    lam = rng.uniform(0.55, 1.0)                   # intensity of this rendition
    ex = speaker.expression[emotion_index]

    def mix(field, scale=1.0):
        a, b = getattr(neutral, field), getattr(p, field)
        return a + lam * scale * (b - a)

    f0_st = lam * ex[0] * p.f0_st + rng.normal(0, 0.7)
    rate = speaker.rate * (1.0 + lam * ex[1] * (p.rate - 1.0)) * rng.uniform(0.9, 1.1)
    energy_db = lam * ex[2] * p.energy_db + rng.normal(0, 1.5)
    tilt = np.clip(speaker.tilt - 0.12 * lam * ex[3] * p.tilt + rng.normal(0, 0.01), 0.5, 0.98)
    jitter = speaker.jitter + mix("jitter") - neutral.jitter
    shimmer = mix("shimmer")
    breath = speaker.breath + mix("breath") - neutral.breath

    n_syl = int(rng.integers(cfg.min_syllables, cfg.max_syllables + 1))
    syl_len = rng.uniform(0.75, 1.25, n_syl) / rate
    bounds = np.concatenate([[0.0], np.cumsum(syl_len)])
    lead, tail = rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.2)
    n = int((bounds[-1] + lead + tail) * sr)
    t = np.arange(n) / sr - lead
    pos = np.clip(t / bounds[-1], 0.0, 1.0)
    syl = np.clip(np.searchsorted(bounds, t, side="right") - 1, 0, n_syl - 1)
    within = np.clip((t - bounds[syl]) / syl_len[syl], 0.0, 1.0)
    active = (t >= 0) & (t < bounds[-1])

    # f0 contour in semitones: level + declination/global slope + syllable accents + final rise.
    accents = rng.normal(0, 1.8 * mix("f0_range"), n_syl)
    st = (f0_st + mix("contour") * (pos - 0.5) + accents[syl] * np.sin(np.pi * within)
          + mix("final_rise") * (syl == n_syl - 1) * within)
    f0 = speaker.f0_hz * 2.0 ** (st / 12.0) * (1.0 + jitter * _smooth_noise(rng, n, sr // 200))
    phase = np.cumsum(f0 / sr)
    voice = 2.0 * (phase % 1.0) - 1.0
    voice = scipy.signal.lfilter([1.0 - tilt], [1.0, -tilt], voice)   # spectral tilt
    voice /= np.std(voice) + 1e-8

    # Syllable = short unvoiced onset + voiced nucleus with a raised-cosine envelope.
    onset = rng.uniform(0.15, 0.35, n_syl)
    voiced = within >= onset[syl]
    nucleus = np.where(voiced, (within - onset[syl]) / (1.0 - onset[syl]), 0.0)
    env = np.sin(np.pi * nucleus) ** 0.7 * voiced * active
    env *= np.exp(shimmer * _smooth_noise(rng, n, max(1, sr // 100)))
    breath_noise = rng.standard_normal(n) * breath
    excitation = env * (voice + breath_noise)

    vowel_of_syl = rng.integers(0, len(VOWELS), n_syl)
    formant_scale = speaker.vtl * (1.0 + 0.04 * lam * (emotion == "happiness"))
    out = np.zeros(n)
    for v in np.unique(vowel_of_syl):
        mask = (vowel_of_syl[syl] == v).astype(float)
        out += _resonator_cascade(excitation * mask, VOWELS[v] * formant_scale, sr)
    out /= np.std(out[active]) + 1e-8
    # Fricative/plosive onsets: high-passed noise bursts.
    burst = (~voiced) & active & (within < onset[syl])
    fric = scipy.signal.lfilter([1.0, -0.95], [1.0], rng.standard_normal(n)) * burst
    out += fric * rng.uniform(0.2, 0.6)

    gain = 0.05 * 10.0 ** ((energy_db + rng.normal(0, 2.0)) / 20.0)
    out *= gain
    snr_db = rng.uniform(12.0, 35.0)
    noise = scipy.signal.lfilter([1.0], [1.0, -0.9], rng.standard_normal(n))
    noise *= np.sqrt(np.mean(out[active] ** 2) / (np.mean(noise ** 2) * 10 ** (snr_db / 10)))
    return np.tanh(out + noise).astype(np.float32)


def file_name(speaker: Speaker, emotion: str, utterance: int, prototypical: bool) -> str:
    folder = "NEU" if emotion == "neutral" else "DEMOS"
    tag = "PR" if prototypical else "NP"
    return f"{folder}/{tag}_{speaker.gender}_{speaker.index:02d}_{DEMOS_CODES[emotion]}{utterance + 1:02d}.wav"


def _write_clip(job) -> None:
    import soundfile as sf

    out, cfg, speaker, emotion, ei, u, proto = job
    path = out / file_name(speaker, emotion, u, proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.wav")   # unique: two generators may race
    sf.write(tmp, synthesize(speaker, emotion, ei, u, cfg), cfg.sample_rate, subtype="PCM_16")
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, cfg: CorpusConfig = CorpusConfig(), progress: bool = True,
             workers: int = 0) -> Path:
    """Writes the embedded corpus as 16-bit WAVs in the DEMoS layout under ``out_dir``.

    Re-running with the same config into the same folder is a no-op (the config is recorded in
    ``embedded_corpus.json``, written last, so an interrupted generation is redone). Returns the folder.
    """
    cfg.validate()
    out = Path(out_dir)
    stamp = out / "embedded_corpus.json"
    record = {"generator": "sersynth.embedded", "version": 1, **dataclasses.asdict(cfg)}
    record["emotions"] = list(cfg.emotions)
    if stamp.exists():
        if json.loads(stamp.read_text()) == record:
            return out
        for sub in ("DEMOS", "NEU"):          # ours: written by an earlier, different config
            shutil.rmtree(out / sub, ignore_errors=True)
        stamp.unlink()
    elif out.exists() and any(p.name not in ("DEMOS", "NEU", LOCK_FILE) for p in out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no embedded corpus; pick another folder")
    speakers = make_speakers(cfg)
    rng = np.random.default_rng([cfg.seed, 3])
    jobs = [(s, e, ei, u) for s in speakers for ei, e in enumerate(cfg.emotions) for u in range(cfg.utterances)]
    prototypical = rng.uniform(size=len(jobs)) < 0.8
    map_files(_write_clip, [(out, cfg, *job, bool(p)) for job, p in zip(jobs, prototypical)],
              workers, "embedded corpus", progress)
    atomic_write_json(stamp, record)
    return out
