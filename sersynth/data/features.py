"""Audio decode, fixed-length clips and log-Mel features (the only feature code that needs librosa)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Log-Mel parameters (paper defaults: 16 kHz, window 512, hop 256, 64 bins)."""
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 0.0            # 0 -> sample_rate / 2
    clip_seconds: float = 0.0    # 0 -> the longest clip of the corpus (the paper's choice)

    def validate(self) -> None:
        if self.sample_rate < 1000:
            raise ValueError(f"sample_rate must be >= 1000 Hz, got {self.sample_rate}")
        if self.n_fft < 16 or self.hop_length < 1 or self.hop_length > self.n_fft:
            raise ValueError(f"need n_fft >= 16 and 1 <= hop_length <= n_fft, got {self.n_fft}/{self.hop_length}")
        if not 1 <= self.n_mels <= self.n_fft // 2 + 1:
            raise ValueError(f"n_mels must be in [1, n_fft/2+1], got {self.n_mels}")
        if self.fmax and not self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need fmin < fmax <= sample_rate/2, got {self.fmin}/{self.fmax}")
        if self.clip_seconds < 0:
            raise ValueError(f"clip_seconds must be >= 0, got {self.clip_seconds}")

    def frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop_length      # librosa's centred STFT


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Decodes any soundfile-readable file to float32 mono at ``sample_rate``."""
    import librosa
    import soundfile as sf

    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != sample_rate:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(audio, dtype=np.float32)


def fix_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Trims, or repeats the clip itself until it is ``n_samples`` long (the paper's choice)."""
    if audio.size == 0:
        raise ValueError("empty audio")
    reps = -(-n_samples // audio.size)
    return np.tile(audio, reps)[:n_samples]


def log_mel(audio: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``[frames, n_mels]`` float32 log-Mel power spectrogram in dB."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=audio, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels,
        fmin=cfg.fmin, fmax=cfg.fmax or cfg.sample_rate / 2, power=2.0)
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T.astype(np.float32)


def clip_features(path: str, n_samples: int, cfg: FeatureConfig) -> tuple[np.ndarray | None, str]:
    """One file's ``[frames, n_mels]`` log-Mel features as the feature cache holds them (before the
    per-bin normalisation), or ``(None, reason)`` when the file cannot be used. The one extraction of
    the cache and of ``sersynth predict``."""
    try:
        audio = load_audio(path, cfg.sample_rate)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file reason
        return None, f"does not decode: {str(e).splitlines()[0][:120]}"
    if audio.size == 0:
        return None, "zero-length audio"
    if audio.size < cfg.n_fft:
        return None, f"too short: {audio.size / cfg.sample_rate * 1000:.0f} ms, under one {cfg.n_fft}-sample window"
    if float(np.max(np.abs(audio))) < 1e-5:
        return None, "silent audio"
    return log_mel(fix_length(audio, n_samples), cfg), ""
