"""Emotional speech from another synthesiser (espeak-ng), laid out as RAVDESS or EmoDB ship.

A corpus nobody tuned sersynth for: formant speech from espeak-ng (a Debian/Ubuntu package, not a
Python dependency), with emotions acted through speaking rate, pitch level, loudness and pauses,
and speakers that differ in voice variant, base pitch and rate. Three layouts:

* ``ravdess``: English, 8 classes, two intensities, ``Actor_NN/03-01-EE-II-SS-RR-AA.wav`` at 48 kHz
  (60 clips per actor, as RAVDESS's speech set), read by ``--corpus=ravdess``;
* ``emodb``: German, 7 classes (boredom instead of calm and surprise), EmoDB's speaker numbers and
  ten sentence codes, ``wav/SSTTTEV.wav`` at 16 kHz (70 clips per speaker), read by ``--corpus=emodb``;
* ``cremad``: English, 6 classes, CREMA-D's twelve sentences and levels (the first sentence at low,
  medium and high intensity, the rest unspecified), ``AudioWAV/AAAA_SSS_EMO_LL.wav`` at 16 kHz plus
  ``VideoDemographics.csv`` (82 clips per actor; ``--actors=91`` for CREMA-D's size, 7,462 clips), read
  by ``--corpus=cremad``: large enough that 5 samples per class are 1% of a 40% training split.

Used to measure distillation against coresets on data other than the embedded corpus
(benchmarks/RESULTS.md):

    python -m sersynth.data.espeak_corpus --out=data/espeak_ravdess --actors=8
    python -m sersynth.data.espeak_corpus --out=data/espeak_emodb --layout=emodb --actors=10
    python -m sersynth.data.espeak_corpus --out=data/espeak_cremad --layout=cremad --actors=91
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from sersynth.io import atomic_write_bytes

# RAVDESS emotion codes -> (rate factor, pitch offset, amplitude, word gap in 10 ms units)
PROFILES = {
    "01": (1.00, 0, 100, 0),     # neutral
    "02": (0.88, -6, 85, 2),     # calm
    "03": (1.12, 12, 120, 0),    # happy
    "04": (0.78, -10, 75, 4),    # sad
    "05": (1.18, 5, 165, 0),     # angry
    "06": (1.28, 16, 95, 1),     # fearful
    "07": (0.86, -4, 115, 3),    # disgust
    "08": (1.04, 20, 140, 1),    # surprised
}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}

# EmoDB emotion letters -> the same kind of profile, acted a little differently (German speakers)
EMODB_PROFILES = {
    "N": (1.00, 0, 100, 0),      # neutral
    "L": (0.80, -9, 80, 3),      # boredom
    "F": (1.10, 14, 125, 0),     # happiness
    "T": (0.76, -8, 70, 5),      # sadness
    "W": (1.22, 6, 170, 0),      # anger
    "A": (1.30, 18, 90, 1),      # fear
    "E": (0.84, -3, 120, 4),     # disgust
}
# EmoDB's speaker numbers (male: 03 10 11 12 15) and ten sentence codes with short German sentences
EMODB_SPEAKERS = ("03", "08", "09", "10", "11", "12", "13", "14", "15", "16")
EMODB_SENTENCES = {
    "a01": "Der Lappen liegt auf dem Eisschrank", "a02": "Das will sie am Mittwoch abgeben",
    "a04": "Heute abend könnte ich es ihm sagen", "a05": "Das schwarze Papier liegt da oben",
    "a07": "In sieben Stunden wird es soweit sein", "b01": "Was sind denn das für Tüten",
    "b02": "Sie haben es gerade hochgetragen", "b03": "An den Wochenenden bin ich gefahren",
    "b09": "Ich will das eben wegbringen", "b10": "Die wird auf dem Platz sein",
}
# CREMA-D emotion codes -> profile (American English actors, acted a little differently again)
CREMAD_PROFILES = {
    "NEU": (1.00, 0, 100, 0),
    "HAP": (1.10, 13, 130, 0),
    "SAD": (0.80, -9, 72, 4),
    "ANG": (1.16, 7, 160, 0),
    "FEA": (1.24, 17, 92, 1),
    "DIS": (0.88, -5, 112, 3),
}
# CREMA-D's twelve sentence codes and texts; intensity levels -> the profile's scale (XX: unspecified)
CREMAD_SENTENCES = {
    "IEO": "It's eleven o'clock", "TIE": "That is exactly what happened", "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about", "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold", "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment", "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before", "TSI": "The surface is slick", "WSI": "We'll stop in a couple of minutes",
}
CREMAD_LEVELS = {"LO": 0.6, "MD": 1.0, "HI": 1.5, "XX": 1.0}
CREMAD_ACTORS = 91
LAYOUTS = ("ravdess", "emodb", "cremad")


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed."""


def _speak(text: str, voice: str, rate: int, pitch: int, amplitude: int, gap: int, sample_rate: int) -> np.ndarray:
    import soundfile as sf
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "x.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-a", str(amplitude),
                        "-g", str(gap), "-w", str(wav), text], check=True, capture_output=True)
        x, sr = sf.read(wav, dtype="float32")
    g = np.gcd(sample_rate, sr)
    return resample_poly(x, sample_rate // g, sr // g).astype(np.float32)


def _write(path: Path, x: np.ndarray, sample_rate: int, rng: np.random.Generator) -> None:
    import soundfile as sf

    x = x + 0.003 * rng.standard_normal(x.size).astype(np.float32)   # room noise
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.wav")
    sf.write(tmp, x, sample_rate, subtype="PCM_16")
    os.replace(tmp, path)


def generate(out: str | os.PathLike, actors: int = 8, seed: int = 0, sample_rate: int | None = None,
             layout: str = "ravdess") -> Path:
    """Writes ``actors`` speakers' clips under ``out`` in ``layout`` (see the module docstring), at
    the layout's corpus rate unless ``sample_rate`` is given; returns ``out``. Clips already there
    are kept, so an interrupted generation continues."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if shutil.which("espeak-ng") is None:
        raise EspeakMissing("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    out = Path(out)
    rng = np.random.default_rng(seed)
    if layout == "emodb":
        if not 1 <= actors <= len(EMODB_SPEAKERS):
            raise ValueError(f"--actors must be 1..{len(EMODB_SPEAKERS)} in the emodb layout (EmoDB's speakers)")
        return _generate_emodb(out, actors, rng, sample_rate or 16000)
    if layout == "cremad":
        if not 1 <= actors <= CREMAD_ACTORS:
            raise ValueError(f"--actors must be 1..{CREMAD_ACTORS} in the cremad layout (CREMA-D's actors)")
        return _generate_cremad(out, actors, rng, sample_rate or 16000)
    sample_rate = sample_rate or 48000
    for a in range(1, actors + 1):
        variant = f"{'m' if a % 2 else 'f'}{(a - 1) // 2 % 4 + 1}"
        base_pitch, base_rate = rng.integers(-8, 9), rng.uniform(0.88, 1.12)
        for emo, (rate_f, dp, amp, gap) in PROFILES.items():
            for intensity in (("01",) if emo == "01" else ("01", "02")):
                k = 1.0 if intensity == "01" else 1.6
                for statement, text in STATEMENTS.items():
                    for rep in ("01", "02"):
                        path = out / f"Actor_{a:02d}" / f"03-01-{emo}-{intensity}-{statement}-{rep}-{a:02d}.wav"
                        if path.is_file():
                            continue
                        rate = int(175 * base_rate * (1 + k * (rate_f - 1)) * rng.uniform(0.93, 1.07))
                        pitch = int(np.clip(50 + base_pitch + k * dp + rng.integers(-4, 5), 0, 99))
                        amplitude = int(np.clip(100 + k * (amp - 100) + rng.integers(-10, 11), 20, 200))
                        x = _speak(text, f"en-us+{variant}", rate, pitch, amplitude, int(k * gap), sample_rate)
                        _write(path, x, sample_rate, rng)
    return out


def _generate_emodb(out: Path, speakers: int, rng: np.random.Generator, sample_rate: int) -> Path:
    male = ("03", "10", "11", "12", "15")
    for i, spk in enumerate(EMODB_SPEAKERS[:speakers]):
        variant = f"{'m' if spk in male else 'f'}{i % 5 + 1}"
        base_pitch, base_rate = rng.integers(-10, 11), rng.uniform(0.85, 1.15)
        for emo, (rate_f, dp, amp, gap) in EMODB_PROFILES.items():
            for code, text in EMODB_SENTENCES.items():
                path = out / "wav" / f"{spk}{code}{emo}a.wav"
                if path.is_file():
                    continue
                rate = int(160 * base_rate * rate_f * rng.uniform(0.92, 1.08))
                pitch = int(np.clip(50 + base_pitch + dp + rng.integers(-5, 6), 0, 99))
                amplitude = int(np.clip(amp + rng.integers(-12, 13), 20, 200))
                x = _speak(text, f"de+{variant}", rate, pitch, amplitude, gap, sample_rate)
                _write(path, x, sample_rate, rng)
    return out


def _generate_cremad(out: Path, actors: int, rng: np.random.Generator, sample_rate: int) -> Path:
    sexes = []
    for i in range(actors):
        actor = 1001 + i
        male = i % 2 == 0
        sexes.append((actor, "Male" if male else "Female"))
        variant = f"m{i // 2 % 7 + 1}" if male else f"f{i // 2 % 5 + 1}"
        base_pitch, base_rate = rng.integers(-10, 11), rng.uniform(0.85, 1.15)
        for emo, (rate_f, dp, amp, gap) in CREMAD_PROFILES.items():
            for code, text in CREMAD_SENTENCES.items():
                levels = ("XX",) if code != "IEO" or emo == "NEU" else ("LO", "MD", "HI")
                for level in levels:
                    path = out / "AudioWAV" / f"{actor}_{code}_{emo}_{level}.wav"
                    if path.is_file():
                        continue
                    k = CREMAD_LEVELS[level]
                    rate = int(170 * base_rate * (1 + k * (rate_f - 1)) * rng.uniform(0.92, 1.08))
                    pitch = int(np.clip(50 + base_pitch + k * dp + rng.integers(-5, 6), 0, 99))
                    amplitude = int(np.clip(100 + k * (amp - 100) + rng.integers(-12, 13), 20, 200))
                    x = _speak(text, f"en-us+{variant}", rate, pitch, amplitude, int(k * gap), sample_rate)
                    _write(path, x, sample_rate, rng)
    atomic_write_bytes(out / "VideoDemographics.csv",
                       ("ActorID,Sex\n" + "".join(f"{a},{s}\n" for a, s in sexes)).encode())
    return out


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    try:
        path = generate(f.out, f.actors, f.seed, layout=f.layout)
    except (EspeakMissing, ValueError) as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{sum(1 for _ in path.rglob('*.wav'))} clips in {path} ({f.layout} layout)")


if __name__ == "__main__":
    from absl import app, flags as absl_flags

    absl_flags.DEFINE_string("out", None, "folder to write")
    absl_flags.DEFINE_enum("layout", "ravdess", list(LAYOUTS), "ravdess: English, 8 classes, 60 clips per actor; "
                           "emodb: German, 7 classes, 70 clips per speaker; cremad: English, 6 classes, "
                           "82 clips per actor")
    absl_flags.DEFINE_integer("actors", 8, "speakers (at most 10 in the emodb layout, 91 in the cremad layout)")
    absl_flags.DEFINE_integer("seed", 0, "random seed of the actors' voices and each clip's variation")
    absl_flags.mark_flag_as_required("out")
    app.run(main)
