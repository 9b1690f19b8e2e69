"""Emotional speech from another synthesiser (espeak-ng), laid out as RAVDESS ships.

A corpus nobody tuned sersynth for: formant speech from espeak-ng (a Debian/Ubuntu package, not a
Python dependency), with emotions acted through speaking rate, pitch level, loudness and pauses, two
intensities, and actors that differ in voice variant, base pitch and rate. It is written as
``Actor_NN/03-01-EE-II-SS-RR-AA.wav`` at RAVDESS's 48 kHz, so ``--corpus=ravdess`` reads it and
``experiments/flags/ravdess.flags`` applies. Used to measure distillation against coresets on data
other than the embedded corpus (benchmarks/RESULTS.md):

    python -m sersynth.data.espeak_corpus --out=data/espeak_ravdess --actors=8
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

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


def generate(out: str | os.PathLike, actors: int = 8, seed: int = 0, sample_rate: int = 48000) -> Path:
    """Writes ``actors`` x 60 clips (RAVDESS's speech set per actor) under ``out``; returns it."""
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        raise EspeakMissing("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    out = Path(out)
    rng = np.random.default_rng(seed)
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
                        x = x + 0.003 * rng.standard_normal(x.size).astype(np.float32)   # room noise
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_suffix(f".{os.getpid()}.tmp.wav")
                        sf.write(tmp, x, sample_rate, subtype="PCM_16")
                        os.replace(tmp, path)
    return out


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    try:
        path = generate(f.out, f.actors, f.seed)
    except EspeakMissing as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{sum(1 for _ in path.rglob('*.wav'))} clips in {path} (RAVDESS layout)")


if __name__ == "__main__":
    from absl import app, flags as absl_flags

    absl_flags.DEFINE_string("out", None, "folder to write (RAVDESS layout)")
    absl_flags.DEFINE_integer("actors", 8, "actors (60 clips each)")
    absl_flags.DEFINE_integer("seed", 0, "random seed of the actors' voices and each clip's variation")
    absl_flags.mark_flag_as_required("out")
    app.run(main)
