"""Audio renders of distilled spectrograms: a bounded-cost Mel inversion that stays close to the Mel
spectrogram it inverts, on real and on extreme values."""
import numpy as np
import pytest

librosa = pytest.importorskip("librosa")
sf = pytest.importorskip("soundfile")

from sersynth import report  # noqa: E402

SR, N_FFT, HOP, N_MELS = 16000, 1024, 512, 32


def _mel_of_sound():
    rng = np.random.default_rng(0)
    y = librosa.chirp(fmin=200, fmax=4000, sr=SR, duration=1.0) + 0.05 * rng.standard_normal(SR)
    return librosa.feature.melspectrogram(y=y, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS,
                                          power=2.0).astype(np.float64)


def test_mel_inversion_is_non_negative_and_reproduces_the_mel_spectrogram():
    mel = _mel_of_sound()
    basis = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS).astype(np.float64)
    err = {}
    for it in (0, 200):
        s = report.mel_to_power_spectrum(mel, basis, iterations=it)
        assert s.shape == (N_FFT // 2 + 1, mel.shape[1]) and (s >= 0).all()
        err[it] = np.linalg.norm(basis @ s - mel) / np.linalg.norm(mel)
    assert err[200] < 0.03 and err[200] < err[0] / 4        # the non-negative refinement does the work


def test_render_audio_writes_finite_wavs_for_extreme_spectrograms(tmp_path):
    """Distilled spectrograms leave the range of real ones (one such set kept librosa's iterative
    inversion busy for minutes); every render still comes back, finite and scaled."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 8, (4, 32, N_MELS)).astype(np.float32)        # in units of the corpus's Mel std
    x[1] = 40.0                                                     # 760 dB
    x[3, :16] = 200.0                                               # 3,960 dB: past float64's range as power
    mel_mean, mel_std = np.full(N_MELS, -40.0, np.float32), np.full(N_MELS, 20.0, np.float32)
    feats = {"sample_rate": SR, "n_fft": N_FFT, "hop_length": HOP, "fmin": 0.0, "fmax": 0}
    paths = report.render_audio(x, np.array([0, 1, 2, 3]), ["a", "b", "c", "d"], mel_mean, mel_std, feats,
                                tmp_path, per_class=1)
    assert [p.name for p in paths] == ["a_0.wav", "b_0.wav", "c_0.wav", "d_0.wav"]
    for p in paths:
        audio, sr = sf.read(p)
        assert sr == SR and audio.size > 0 and np.isfinite(audio).all() and 0.5 < np.abs(audio).max() <= 0.91
