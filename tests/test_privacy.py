"""Privacy audit: distances to the closest training clip and the membership-inference AUC."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from sersynth import privacy, report, train
from sersynth.models import ModelSpec, flat_model


def test_auc_by_hand():
    assert privacy.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert privacy.auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert privacy.auc(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert privacy.auc(np.array([2.0]), np.array([2.0])) == 0.5                # a tie counts half
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 400), rng.normal(0, 1, 300)
    brute = np.mean(a[:, None] > b[None]) + 0.5 * np.mean(a[:, None] == b[None])
    assert privacy.auc(a, b) == pytest.approx(brute)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(37, 5, 4)), rng.normal(size=(300, 5, 4))
    d, i = privacy.nearest(a, b, chunk=8)
    full = np.sqrt(((a.reshape(37, 1, -1) - b.reshape(1, 300, -1)) ** 2).mean(-1))
    np.testing.assert_array_equal(i, full.argmin(1))
    np.testing.assert_allclose(d, full.min(1), rtol=1e-6)


def test_dcr_flags_near_copies():
    rng = np.random.default_rng(2)
    train_x, hold = rng.normal(size=(200, 6, 4)), rng.normal(size=(100, 6, 4))
    copies = train_x[:10] + 0.01 * rng.normal(size=(10, 6, 4))
    fresh = rng.normal(size=(10, 6, 4))
    near = privacy.dcr(copies, train_x, hold)
    far = privacy.dcr(fresh, train_x, hold)
    assert near["frac_synthetic_below_holdout_p1"] == 1.0 and near["nearest_train_index"] == list(range(10))
    assert far["frac_synthetic_below_holdout_p1"] <= 0.2
    assert near["median_synthetic"] < 0.05 < far["median_synthetic"]


def test_membership_auc_detects_a_memorising_model():
    """A model that fit random labels on its members assigns them low loss: AUC near 1; before
    training, members and non-members look alike: AUC near 0.5."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(160, 8, 6)).astype(np.float32)
    y = rng.integers(0, 4, 160).astype(np.int32)
    fm = flat_model(ModelSpec(name="convnet", n_classes=4, input_shape=(8, 6), width=32, depth=1, norm="none"))
    init = fm.init_many(jax.random.split(jax.random.key(0), 2))
    cfg = train.TrainConfig(optimizer="adam", lr=3e-3, epochs=150, batch_size=80, augment=False)
    trained, _, _ = train.fit(fm, cfg, x[:80], train.one_hot(y[:80], 4), init, jax.random.key(1))
    before = privacy.membership_auc(fm, init, (x[:80], y[:80]), (x[80:], y[80:]), n=80)
    after = privacy.membership_auc(fm, trained, (x[:80], y[:80]), (x[80:], y[80:]), n=80)
    assert abs(before["auc_mean"] - 0.5) < 0.15
    assert after["auc_mean"] > 0.9 and after["loss_gap"] > 0


def test_attack_aimed_at_initialisation_clips():
    """A model fit on the source clips alone (as a set that carries them would make it) gives them low
    loss against the other training clips: AUC near 1; a model fit on every clip alike: near 0.5."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 8, 6)).astype(np.float32)
    y = rng.integers(0, 4, 120).astype(np.int32)
    sources = rng.choice(120, (20, 2), replace=False)
    src = np.unique(sources)
    fm = flat_model(ModelSpec(name="convnet", n_classes=4, input_shape=(8, 6), width=32, depth=1, norm="none"))
    init = fm.init_many(jax.random.split(jax.random.key(0), 2))
    cfg = train.TrainConfig(optimizer="adam", lr=3e-3, epochs=150, batch_size=40, augment=False)
    on_sources, _, _ = train.fit(fm, cfg, x[src], train.one_hot(y[src], 4), init, jax.random.key(1))
    on_all, _, _ = train.fit(fm, dataclasses.replace(cfg, epochs=40), x, train.one_hot(y, 4), init, jax.random.key(1))
    out = privacy.init_source_membership(fm, {"leaky": on_sources, "clean": on_all}, sources, x, y)
    assert out["leaky"]["auc_mean"] > 0.9 and out["leaky"]["n_members"] == src.size
    assert abs(out["clean"]["auc_mean"] - 0.5) < 0.15


def test_mix_initialisation_starts_from_no_single_recording():
    from sersynth import distill

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 40).astype(np.int32)
    x = (rng.normal(size=(120, 10, 6)) + y[:, None, None]).astype(np.float32)   # class-dependent offset
    real = distill.init_state(distill.DistillConfig(ipc=5, init="real"), x, y, 3, jax.random.key(0))
    mix = distill.init_state(distill.DistillConfig(ipc=5, init="mix", init_mix=8), x, y, 3, jax.random.key(0))
    d_real = privacy.dcr(np.asarray(real.params["x"]), x, x[:10])
    d_mix = privacy.dcr(np.asarray(mix.params["x"]), x, x[:10])
    assert d_real["median_synthetic"] == pytest.approx(0, abs=1e-3)                   # copies of clips
    assert d_mix["min_synthetic"] > 0.5                                              # no clip is near
    xm, lab = np.asarray(mix.params["x"]), np.asarray(mix.labels)
    for c in range(3):                                   # still class-typical: nearest class mean is its own
        means = np.stack([x[y == k].mean(0) for k in range(3)])
        d = ((xm[lab == c][:, None] - means[None]) ** 2).mean(axis=(2, 3))
        assert np.all(d.argmin(1) == c)
    np.testing.assert_allclose(xm.std(axis=(1, 2)), x.std(axis=(1, 2)).mean(), rtol=0.35)
    with pytest.raises(ValueError, match="--syn_init_mix must be >= 1"):
        distill.DistillConfig(init="mix", init_mix=0).validate()


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory):
    """The feature cache of an embedded corpus of 10 speakers (speaker-independent split)."""
    from sersynth.data import prepare, synth_corpus
    from tests.conftest import TINY_FEATURES

    corpus = synth_corpus.CorpusConfig(n_speakers=10, utterances=6, emotions=("anger", "sadness", "happiness"),
                                       min_syllables=2, max_syllables=3)
    root = synth_corpus.generate(tmp_path_factory.mktemp("speech"), corpus, progress=False, workers=1)
    cfg = prepare.PrepareConfig(corpus="embedded", emotions=corpus.emotions, features=TINY_FEATURES, workers=1)
    return prepare.prepare(root, tmp_path_factory.mktemp("speech_cache"), cfg, progress=False)


@pytest.fixture(scope="module")
def speech(speech_cache):
    """Training clips, and clips of other speakers in two halves (the reference of 'never trained
    on', and unrelated clips to audit)."""
    fs = speech_cache
    x_tr, y_tr = fs.subset("train")
    x_out = np.concatenate([fs.subset("val")[0], fs.subset("test")[0]])
    rng = np.random.default_rng(0)
    order = rng.permutation(x_out.shape[0])
    half = order.size // 2
    return x_tr, y_tr, x_out[order[:half]], x_out[order[half:]], fs.mel_std


def _edited_copies(x: np.ndarray, y: np.ndarray, mel_std: np.ndarray) -> dict[str, np.ndarray]:
    """Near-copies of training clips under simple edits, made independently of the detector's code."""
    rng = np.random.default_rng(5)
    pick = rng.choice(x.shape[0], 12, replace=False)
    base = x[pick]
    t = base.shape[1]
    src = np.clip(np.arange(t) * 1.05, 0, t - 1)                      # 5% faster, last frame held
    stretched = np.stack([np.stack([np.interp(src, np.arange(t), clip[:, m]) for m in range(clip.shape[1])], 1)
                          for clip in base])
    partner = np.array([rng.choice(np.flatnonzero((y == y[i]) & (np.arange(y.size) != i))) for i in pick])
    return {"shift 2 frames": np.roll(base, 2, axis=1),
            "+6 dB": base + 6.0 / mel_std,
            "shift 2 + 6 dB": np.roll(base, -2, axis=1) + 6.0 / mel_std,
            "noise": base + 0.1 * rng.normal(size=base.shape),
            "stretch 5%": stretched,
            "mixture of two": 0.5 * (base + x[partner])}


def test_edited_copies_are_flagged_and_unrelated_speech_is_not(speech):
    x_tr, y_tr, ref, unrelated, mel_std = speech
    copies = _edited_copies(x_tr, y_tr, mel_std)
    for name, planted in copies.items():
        d = privacy.dcr(planted, x_tr, ref, edits=privacy.EditSearch(), mel_std=mel_std, mixtures=True)
        flagged = max(d["robust"]["frac_synthetic_below_holdout_p1"], d["mixture"]["frac_synthetic_below_holdout_p1"])
        assert flagged == 1.0, (name, d["robust"]["median_synthetic"], d["robust"]["holdout_p1"])
    plain = privacy.dcr(copies["shift 2 + 6 dB"], x_tr, ref)
    assert plain["frac_synthetic_below_holdout_p1"] < 0.5          # the plain distance misses them
    no_shift = privacy.dcr(copies["shift 2 frames"], x_tr, ref, edits=privacy.EditSearch(max_shift=0, stretches=()),
                           mel_std=mel_std)
    assert no_shift["robust"]["frac_synthetic_below_holdout_p1"] < 0.5   # flagged by the shift search, not by luck
    clean = privacy.dcr(unrelated, x_tr, ref, edits=privacy.EditSearch(), mel_std=mel_std, mixtures=True)
    assert clean["robust"]["frac_synthetic_below_holdout_p1"] <= 0.1
    assert clean["mixture"]["frac_synthetic_below_holdout_p1"] <= 0.1


def test_mixture_distance_by_hand():
    rng = np.random.default_rng(6)
    b = rng.normal(size=(30, 4, 3))
    a = (0.3 * b[4] + 0.7 * b[9])[None]
    d, pair = privacy.mixture_distance(a, b, k=30, remove_gain=False)
    assert d[0] == pytest.approx(0, abs=1e-6) and set(pair[0]) == {4, 9}
    far = rng.normal(size=(1, 4, 3)) * 3
    brute = min(np.sqrt(np.mean((far[0] - (w * b[i] + (1 - w) * b[j])) ** 2))
                for i in range(30) for j in range(30) for w in np.linspace(0, 1, 201))
    assert privacy.mixture_distance(far, b, k=30, remove_gain=False)[0][0] == pytest.approx(brute, abs=2e-2)


def test_mix_initialisation_sources_are_recoverable_and_shuffled_ones_are_not(speech):
    from sersynth import distill

    x_tr, y_tr, *_ = speech
    cfg = distill.DistillConfig(ipc=4, init="mix", init_mix=4)
    key = distill.init_key(0)
    state = distill.init_state(cfg, x_tr, y_tr, 3, key)
    sources = distill.init_sources(cfg, x_tr, y_tr, 3, key)
    x0, labels = np.asarray(state.params["x"]), np.asarray(state.labels)
    assert sources.shape == (12, 4) and all((y_tr[sources[i]] == labels[i]).all() for i in range(12))
    leak = privacy.source_recovery(x0, labels, sources, x_tr, y_tr)
    assert leak["auc_mean"] > 0.8 and leak["topk_hit_rate"] > 2 * leak["topk_chance"]
    # the same samples against clips they were not made from: chance
    rng = np.random.default_rng(7)
    wrong = np.stack([rng.choice(np.flatnonzero(y_tr == labels[i]), 4, replace=False) for i in range(12)])
    wrong_leak = privacy.source_recovery(x0, labels, wrong, x_tr, y_tr)
    assert abs(wrong_leak["auc_mean"] - 0.5) < 0.2
    real = distill.DistillConfig(ipc=4, init="real")
    assert distill.init_sources(real, x_tr, y_tr, 3, key).shape == (12, 1)
    assert distill.init_sources(distill.DistillConfig(ipc=4, init="noise"), x_tr, y_tr, 3, key) is None


def test_membership_uses_equal_numbers():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 8, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50).astype(np.int32)
    fm = flat_model(ModelSpec(name="convnet", n_classes=3, input_shape=(8, 6), width=4, depth=1, norm="none"))
    r = privacy.membership_auc(fm, fm.init_many(jax.random.split(jax.random.key(0), 1)), (x[:20], y[:20]),
                               (x[20:], y[20:]), n=100)
    assert r["n_members"] == r["n_nonmembers"] == 20


def test_speaker_identity_names_the_voices_behind_copies_and_not_others(speech_cache):
    from sersynth.pipeline import _training_speakers

    fs = speech_cache
    x_tr, y_tr = fs.subset("train")
    spk_tr = _training_speakers(fs)
    assert spk_tr.size == x_tr.shape[0] and np.unique(spk_tr).size >= 2
    rng = np.random.default_rng(3)
    # planted leak: training clips (with noise) whose sources are themselves
    pick = rng.choice(x_tr.shape[0], 24, replace=False)
    copies = x_tr[pick] + 0.1 * rng.normal(size=x_tr[pick].shape)
    leak = privacy.speaker_identity(copies, y_tr[pick], x_tr, y_tr, spk_tr, sources=pick[:, None])
    assert leak["n_speakers"] == np.unique(spk_tr).size
    assert leak["check_accuracy"] > 2 * leak["check_chance"]        # the classifier knows the training voices
    assert leak["source_speaker_chance"] == 1 / leak["n_speakers"]
    assert leak["source_speaker_hit_rate"] >= 2 * leak["source_speaker_chance"]
    # clean: the same samples against sources of other speakers are missed; no sources, no attribution
    wrong = np.array([rng.choice(np.flatnonzero(spk_tr != spk_tr[i])) for i in pick])[:, None]
    missed = privacy.speaker_identity(copies, y_tr[pick], x_tr, y_tr, spk_tr, sources=wrong)
    assert missed["source_speaker_hit_rate"] <= 0.25
    assert "source_speaker_hit_rate" not in privacy.speaker_identity(copies, y_tr[pick], x_tr, y_tr, spk_tr)


def test_source_free_speaker_test_finds_known_voices_and_not_strangers():
    # voices as long-term spectra: each clip is its speaker's profile + its emotion's + frame noise
    rng = np.random.default_rng(11)
    n_mels, frames = 16, 12
    voice = rng.normal(size=(40, n_mels))
    emotion = rng.normal(size=(3, n_mels))

    def clips(speakers, per_speaker):
        spk = np.repeat(speakers, per_speaker)
        y = rng.integers(0, 3, spk.size)
        x = voice[spk][:, None] + emotion[y][:, None] + 2.0 * rng.normal(size=(spk.size, frames, n_mels))
        return x.astype(np.float32), y, spk

    x_tr, y_tr, spk_tr = clips(np.arange(10), 12)                  # the training voices
    x_un, y_un, _ = clips(np.arange(10, 25), 6)                      # the reference: voices never heard
    known, y_known, _ = clips(np.arange(10), 3)                      # new clips of training voices: not copies
    strangers, y_str, _ = clips(np.arange(25, 40), 2)                # other voices never heard
    noise = rng.normal(size=(30, frames, n_mels)).astype(np.float32)
    assert privacy.dcr(known, x_tr, x_un)["frac_synthetic_below_holdout_p1"] < 0.2   # no copy to find

    def auc(x, y, **kw):
        r = privacy.speaker_identity(x, y, x_tr, y_tr, spk_tr, x_unseen=x_un, y_unseen=y_un, **kw)
        assert "source_speaker_hit_rate" not in r and r["nearness"]["n_unseen"] == len(x_un)
        return r["nearness"]["auc_synthetic_vs_unseen"], r["nearness"]["auc_check_vs_unseen"]

    leak, check = auc(known, y_known)
    assert check > 0.8 and leak > 0.8                                 # a known voice is found without sources
    assert abs(auc(strangers, y_str)[0] - 0.5) < 0.15                 # strangers are not
    assert auc(noise, rng.integers(0, 3, 30))[0] < 0.6                 # noise carries no voice


def test_privacy_plot_has_a_panel_for_every_test_the_audit_ran(tmp_path, monkeypatch):
    from sersynth import report

    rng = np.random.default_rng(12)
    dist = lambda: privacy._distances(rng.random(6) + 0.5, rng.random(40) + 0.4)      # noqa: E731
    mia = {n: {"auc_mean": 0.5, "auc_std": 0.01} for n in ("full_data", "distilled_fixed_init")}
    audit = {"dcr": {**dist(), "robust": {**dist(), "units": "dB"}, "mixture": dist()},
             "membership_inference": mia, "membership_init_sources": mia,
             "source_recovery": {"n_samples": 6, "auc_per_sample": rng.random(6).tolist(), "auc_mean": 0.6,
                                 "topk_hit_rate": 0.2, "topk_chance": 0.1, "sources_per_sample": 8},
             "speaker_identity": {"check_accuracy": 0.4, "check_chance": 0.1, "source_speaker_hit_rate": 0.5,
                                  "source_speaker_chance": 0.3}}
    drawn = []
    real_save = report._save
    monkeypatch.setattr(report, "_save",
                        lambda fig, path: drawn.append(sum(ax.axison for ax in fig.axes)) or real_save(fig, path))
    report.plot_privacy(audit, tmp_path / "a.png")                  # no unseen speakers: accuracies as bars
    near = {"auc_synthetic_vs_unseen": 0.5, "auc_check_vs_unseen": 0.6, "synthetic": [0.1, 0.2],
            "unseen": [0.0, 0.3], "check": [0.2, 0.4]}
    audit["speaker_identity"]["nearness"] = near
    del audit["source_recovery"], audit["dcr"]["mixture"]
    report.plot_privacy(audit, tmp_path / "b.png")
    assert drawn == [6, 4]                                         # the panels drawn; spare ones are off
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_noise_added_to_the_start_hides_its_sources(speech):
    from sersynth import distill

    x_tr, y_tr, *_ = speech
    key = distill.init_key(0)
    found = {}
    for init, noise in (("real", 0.0), ("real", 1.0), ("mix", 0.0), ("mix", 2.0), ("mix", 8.0)):
        cfg = distill.DistillConfig(ipc=4, init=init, init_mix=4, init_noise=noise)
        x0 = np.asarray(distill.init_state(cfg, x_tr, y_tr, 3, key).params["x"])
        x_clean = np.asarray(distill.init_state(dataclasses.replace(cfg, init_noise=0.0), x_tr, y_tr, 3, key).params["x"])
        added = x0 - x_clean                                           # the same sources, noise on top
        assert np.std(added, axis=(1, 2)) == pytest.approx(noise * x_clean.std(axis=(1, 2)), rel=0.1, abs=1e-6)
        sources = distill.init_sources(cfg, x_tr, y_tr, 3, key)
        found[init, noise] = privacy.source_recovery(x0, np.repeat(np.arange(3), 4), sources, x_tr, y_tr)["auc_mean"]
    # a real clip stays recognisable under noise as strong as itself; a mixture's sources fade towards chance
    assert found["real", 0.0] == found["real", 1.0] == 1.0
    assert found["mix", 0.0] > found["mix", 2.0] > found["mix", 8.0] and found["mix", 8.0] < 0.75
    with pytest.raises(ValueError, match="--syn_init_noise must be >= 0 and applies to --syn_init=real, herding, mix"):
        distill.DistillConfig(init="noise", init_noise=0.5).validate()


def test_report_gives_the_start_clip_attack_its_group_size_and_warns_when_small():
    """The attack on the start clips compares equal groups; when the start clips are nearly all the training
    clips (8 averaged clips x 40 samples from 180 clips) few are left a side, and the report says so."""
    def audit(n):
        group = {"auc_mean": 0.8, "n_members": n, "n_nonmembers": n}
        dcr = {"median_synthetic": 0.7, "median_holdout": 0.8, "frac_synthetic_below_holdout_p1": 0.0,
               "robust": {"frac_synthetic_below_holdout_p1": 0.0}, "mixture": {"frac_synthetic_below_holdout_p1": 0.0}}
        mia = {k: {"auc_mean": 0.6} for k in ("full_data", "distilled_fixed_init")}
        return {"dcr": dcr, "membership_inference": mia,
                "membership_init_sources": {"full_data": group, "distilled_fixed_init": group}}
    few, many = privacy.headline(audit(4)), privacy.headline(audit(60))
    assert few["mia_init_sources_n"] == 4 and many["mia_init_sources_n"] == 60
    assert "4 clips a side: too few" in report.privacy_text(few)
    text = report.privacy_text(many)
    assert "60 clips a side" in text and "too few" not in text
