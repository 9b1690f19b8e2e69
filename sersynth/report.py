"""What a run shows people: plots (PNG, with a PDF copy beside each for papers), audio renders of the
distilled set, a console table."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from absl import logging

from sersynth import artifact
from sersynth.io import atomic_write_bytes


def _save(fig, path: Path) -> Path:
    """Writes ``path`` (PNG) and the same figure as vector PDF beside it; returns the PNG's path."""
    import io

    for fmt, target in (("png", path), ("pdf", path.with_suffix(".pdf"))):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
        atomic_write_bytes(target, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], path: Path) -> Path:
    """Matching loss and learned lr per iteration, validation UAR at evaluation points."""
    plt = _plt()
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_uar" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    it = [r["iteration"] for r in steps]
    axes[0].plot(it, [r["loss"] for r in steps], lw=0.8)
    axes[0].set(title="trajectory-matching loss", xlabel="iteration", ylabel="normalised parameter distance")
    axes[1].plot(it, [r["lr"] for r in steps], lw=0.8, color="tab:orange")
    axes[1].set(title="learned inner lr", xlabel="iteration", ylabel="lr")
    axes[2].plot([r["iteration"] for r in evals], [100 * r["val_uar"] for r in evals], "o-", color="tab:green")
    axes[2].set(title="validation UAR (distilled, fixed init)", xlabel="iteration", ylabel="UAR (%)")
    fig.tight_layout()
    return _save(fig, path)


def plot_expert_curves(curve: list[list[float]], path: Path, max_start_epoch: int | None = None,
                       min_start_epoch: int = 0) -> Path:
    """Validation UAR of each expert per epoch (``experts/meta.json["val_uar_curve"]``), with the
    range of start epochs distillation draws from shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for e, row in enumerate(curve):
        ax.plot(range(len(row)), np.asarray(row) * 100, lw=1, label=f"expert {e}")
    if max_start_epoch:
        ax.axvspan(min_start_epoch, max_start_epoch - 1, color="tab:gray", alpha=0.15, label="start epochs matched")
    ax.set(title="experts: validation UAR", xlabel="epoch", ylabel="UAR (%)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_spectrograms(x: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, per_class: int = 10,
                      seconds_per_frame: float | None = None) -> Path:
    """Grid of distilled log-Mel spectrograms, one row per class (at most ``per_class`` of each, the
    title says how many of how many), axes in seconds (or frames) and Mel bins, one colour bar."""
    plt = _plt()
    counts = np.bincount(labels, minlength=len(classes))
    shown = max(1, min(per_class, int(counts.max())))
    fig, axes = plt.subplots(len(classes), shown, figsize=(2.0 * shown + 1.0, 1.4 * len(classes) + 0.6),
                             squeeze=False, sharex=True, sharey=True)
    lim = float(np.percentile(np.abs(x), 99)) or 1.0
    frames, n_mels = x.shape[1:]
    extent = [0, frames * seconds_per_frame if seconds_per_frame else frames, 0, n_mels]
    image = None
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:shown]
        for j in range(shown):
            ax = axes[c, j]
            if j < idx.size:
                image = ax.imshow(x[idx[j]].T, origin="lower", aspect="auto", cmap="magma", vmin=-lim, vmax=lim,
                                  extent=extent)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(f"{name}\nMel bin", fontsize=8)
            if c == len(classes) - 1:
                ax.set_xlabel("time (s)" if seconds_per_frame else "frame", fontsize=8)
            ax.tick_params(labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="normalised log-Mel (per-bin z-score)")
    n_shown = int(np.minimum(counts, shown).sum())
    fig.suptitle(f"distilled log-Mel spectrograms: {n_shown} of {labels.size} samples, up to {shown} per class")
    return _save(fig, path)


def plot_confusions(matrices: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrices side by side (e.g. full data vs distilled vs the coresets),
    in % of each true class, full class names, one colour bar."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.0 * len(matrices) + 1.0, 4.4), squeeze=False)
    image = None
    for k, (ax, (name, cm)) in enumerate(zip(axes[0], matrices.items())):
        cm = np.asarray(cm, float)
        norm = 100 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
        image = ax.imshow(norm, vmin=0, vmax=100, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 50 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes if k == 0 else [], fontsize=7)
        ax.set(title=name, xlabel="predicted")
        if k == 0:
            ax.set_ylabel("true")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="% of the true class")
    return _save(fig, path)


def mel_to_power_spectrum(mel: np.ndarray, basis: np.ndarray, iterations: int = 200) -> np.ndarray:
    """``[bins, frames]`` non-negative power spectrum whose Mel projection ``basis @ S`` approximates
    ``mel [n_mels, frames]``: least squares, clipped at zero, refined by a fixed number of
    multiplicative non-negative least-squares updates (Lee & Seung). Its cost is bounded, unlike an
    iterative solver run to convergence (librosa's ``mel_to_stft`` ran for minutes on one distilled
    spectrogram)."""
    scale = max(float(mel.max()), 1e-30)                   # the updates are scale-free; keep numbers near 1
    m = mel / scale
    s = np.maximum(np.linalg.pinv(basis) @ m, 0.0) + 1e-12
    gram, target = basis.T @ basis, basis.T @ m
    for _ in range(iterations):
        s *= target / (gram @ s + 1e-12)
    return s * scale


def render_audio(x: np.ndarray, labels: np.ndarray, classes: list[str], mel_mean: np.ndarray, mel_std: np.ndarray,
                 features: dict, out_dir: Path, per_class: int = 2) -> list[Path]:
    """Griffin-Lim WAV renders of distilled spectrograms (needs librosa and soundfile; skipped without)."""
    try:
        import librosa
        import soundfile as sf
    except ImportError:
        logging.warning("librosa/soundfile not installed: no audio renders (pip install librosa soundfile to get them)")
        return []
    out = []
    sr = features["sample_rate"]
    basis = librosa.filters.mel(sr=sr, n_fft=features["n_fft"], n_mels=x.shape[-1], fmin=features["fmin"],
                                fmax=features["fmax"] or sr / 2).astype(np.float64)
    for c, name in enumerate(classes):
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            db = (x[i] * mel_std + mel_mean).astype(np.float64)            # [frames, n_mels] in dB
            # relative to its loudest bin (the render is scaled at the end anyway): a distilled spectrogram
            # thousands of dB high would overflow to an infinite power and a NaN WAV
            power = mel_to_power_spectrum(librosa.db_to_power(db.T - db.max()), basis)
            audio = librosa.griffinlim(np.sqrt(power), n_iter=32, hop_length=features["hop_length"],
                                       n_fft=features["n_fft"])
            audio = 0.9 * audio / (np.max(np.abs(audio)) + 1e-9)
            path = out_dir / f"{name}_{k}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.wav")
            sf.write(tmp, audio.astype(np.float32), sr, subtype="PCM_16")
            os.replace(tmp, path)
            out.append(path)
    return out


def plot_folds(report: dict, path: Path) -> Path:
    """Test UAR of each training setting in each cross-validation fold (grouped bars)."""
    plt = _plt()
    folds = report["folds"]
    names = list(report["results"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(folds) + 2), 3.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar(np.arange(len(folds)) + j * width, [f["test_uar"][name] * 100 for f in folds], width, label=name)
    ax.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [str(f.get("test", f["fold"])) for f in folds], rotation=30)
    ax.set(ylabel="test UAR (%)", title=f"{report.get('protocol')} folds: test UAR per setting")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _distance_panel(ax, d: dict, what: str) -> None:
    bins = np.linspace(0, max(max(d["synthetic"]), max(d["holdout"])) * 1.02, 40)
    ax.hist(d["holdout"], bins, alpha=0.6, density=True, label="real clips never trained on")
    ax.hist(d["synthetic"], bins, alpha=0.6, density=True, label="distilled samples")
    ax.axvline(d["holdout_p1"], color="k", ls="--", lw=0.8, label="their 1st percentile: left of it = near-copy")
    ax.set_title(f"distance to the closest training clip:\n{what}", fontsize=9)
    ax.set(xlabel="RMS distance", ylabel="density")
    ax.legend(fontsize=7)


def _membership_panel(ax, audit: dict) -> None:
    """Grouped bars: each attack (all members vs unseen speakers; vs held-out clips of the same
    speakers; aimed at the initialisation clips) x each model stack, with each attack's no-leak
    reference as a black tick."""
    attacks = [(k, label) for k, label in (("membership_inference", "training clips vs\nunseen speakers"),
                                           ("membership_same_speaker", "vs held-out clips\nof the same speakers"),
                                           ("membership_init_sources", "init clips vs\nother training clips"))
               if audit.get(k)]
    names = list(audit["membership_inference"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [audit[k][name]["auc_mean"] for k, _ in attacks]
        errs = [audit[k][name]["auc_std"] for k, _ in attacks]
        ax.bar(np.arange(len(attacks)) + (j - (len(names) - 1) / 2) * width, vals, width, yerr=errs,
               color=["tab:red", "tab:blue", "tab:cyan"][j % 3], label=name.replace("_", " "))
    for i, (k, _) in enumerate(attacks):
        if k == "membership_inference":   # models that never saw a real clip: speaker shift alone
            ref = float(np.mean([audit[k][n]["auc_mean"] for n in names if n.startswith("distilled")] or [0.5]))
        elif k == "membership_init_sources":   # both groups trained the full-data models
            ref = audit[k]["full_data"]["auc_mean"] if "full_data" in audit[k] else 0.5
        else:
            ref = 0.5
        ax.plot([i - 0.45, i + 0.45], [ref, ref], color="k", lw=1.5)
    ax.set_xticks(range(len(attacks)), [label for _, label in attacks], fontsize=7)
    ax.set_title("membership inference (loss threshold)\nblack: each attack's no-leak reference", fontsize=9)
    ax.set(ylabel="attack AUC", ylim=(0.3, 1.0))
    ax.legend(fontsize=7)


def _source_panel(ax, sr: dict) -> None:
    ax.hist(sr["auc_per_sample"], np.linspace(0, 1, 21), color="tab:purple", alpha=0.8)
    ax.axvline(0.5, color="k", ls="--", lw=0.8, label="chance: sources cannot be told")
    ax.set_title(f"recovering each sample's {sr['sources_per_sample']} initialisation clip(s)\nmean AUC "
                 f"{sr['auc_mean']:.2f}; top-k right {sr['topk_hit_rate'] * 100:.0f}% "
                 f"(chance {sr['topk_chance'] * 100:.0f}%)", fontsize=9)
    ax.set(xlabel="AUC of the sources among the clips of the class", ylabel="distilled samples")
    ax.legend(fontsize=7)


def _speaker_panel(ax, si: dict) -> None:
    title = (f"speaker classifier on the training clips\n(held-back clips: {si['check_accuracy'] * 100:.0f}% right, "
             f"chance {si['check_chance'] * 100:.0f}%)")
    if "source_speaker_hit_rate" in si:
        title += (f"; names a source speaker for {si['source_speaker_hit_rate'] * 100:.0f}% "
                  f"(chance {si['source_speaker_chance'] * 100:.0f}%)")
    near = si.get("nearness")
    if near:
        every = np.concatenate([near["unseen"], near["check"], near["synthetic"]])
        bins = np.linspace(every.min(), every.max(), 26)
        ax.hist(near["unseen"], bins, alpha=0.5, density=True, label="voices it never heard")
        ax.hist(near["check"], bins, alpha=0.5, density=True,
                label=f"held-back clips of known voices (AUC {near['auc_check_vs_unseen']:.2f})")
        ax.hist(near["synthetic"], bins, alpha=0.6, density=True,
                label=f"distilled samples (AUC {near['auc_synthetic_vs_unseen']:.2f}; 0.5 = like strangers)")
        ax.set(xlabel="nearness to the training voices (discriminant space)", ylabel="density")
    else:      # no clips of unseen speakers (utterance protocol): its accuracies beside chance
        bars = [("held-back clips", si["check_accuracy"], si["check_chance"])]
        if "source_speaker_hit_rate" in si:
            bars.append(("distilled: a source\nspeaker named", si["source_speaker_hit_rate"],
                         si["source_speaker_chance"]))
        ax.bar(range(len(bars)), [b[1] * 100 for b in bars], 0.6, color="tab:olive", label="measured")
        for i, b in enumerate(bars):
            ax.plot([i - 0.3, i + 0.3], [b[2] * 100] * 2, color="k", lw=1.5, label="chance" if i == 0 else None)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
        ax.set(ylabel="%", ylim=(0, 100))
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


def plot_privacy(audit: dict, path: Path) -> Path:
    """The privacy audit in panels, each beside its no-leak reference: distances to the closest
    training clip (plain, after undoing simple edits, to mixtures of two clips), membership
    inference (every attack the audit ran), recovery of the initialisation clips and the speaker
    classifier's view of the distilled samples (where the audit has them)."""
    plt = _plt()
    d = audit["dcr"]
    panels = [lambda ax: _distance_panel(ax, d, "plain (normalised log-Mel)")]
    if "robust" in d:
        panels.append(lambda ax: _distance_panel(ax, d["robust"],
                                                 f"after undoing gain, shift, stretch ({d['robust']['units']})"))
    if "mixture" in d:
        panels.append(lambda ax: _distance_panel(ax, d["mixture"], "closest mixture of two training clips"))
    panels.append(lambda ax: _membership_panel(ax, audit))
    if audit.get("source_recovery", {}).get("n_samples"):
        panels.append(lambda ax: _source_panel(ax, audit["source_recovery"]))
    if audit.get("speaker_identity"):
        panels.append(lambda ax: _speaker_panel(ax, audit["speaker_identity"]))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.8 * rows), squeeze=False)
    for ax, draw in zip(axes.ravel(), panels):
        draw(ax)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


MIA_FEW = 20    # fewer clips a side than this, one clip moved from last to first changes an AUC by over 0.05


def privacy_text(s: dict) -> str:
    """The privacy audit's summary in words, each figure beside its reference."""
    out = (f"median distance of a distilled sample to its closest training clip {s['dcr_median_synthetic']:.3f} "
           f"(clips never trained on: {s['dcr_median_holdout']:.3f}; a random or herding subset: 0); nearer than 99% "
           f"of clips never trained on: {s['dcr_frac_below_holdout_p1'] * 100:.1f}% of distilled samples, "
           f"{s.get('dcr_robust_frac_below_holdout_p1', float('nan')) * 100:.1f}% after undoing gain, shifts and "
           f"stretches, {s.get('dcr_mixture_frac_below_holdout_p1', float('nan')) * 100:.1f}% as a mixture of two "
           f"clips (about 1% expected of unrelated speech).")
    if "source_recovery_auc" in s:
        out += (f" Initialisation sources recovered with AUC {s['source_recovery_auc']:.3f} (0.5 = chance), "
                f"{s['source_recovery_topk_hit_rate'] * 100:.0f}% of top-k guesses right (chance "
                f"{s['source_recovery_topk_chance'] * 100:.0f}%).")
    if "speaker_id_check_accuracy" in s:
        out += (f" A speaker classifier trained on the training clips (right on "
                f"{s['speaker_id_check_accuracy'] * 100:.0f}% of held-back clips of those speakers, chance "
                f"{s['speaker_id_check_chance'] * 100:.0f}%)")
        said = []
        if "speaker_id_source_hit_rate" in s:
            said.append(f"names one of a sample's initialisation speakers for {s['speaker_id_source_hit_rate'] * 100:.0f}% "
                        f"of distilled samples (chance {s['speaker_id_source_chance'] * 100:.0f}%)")
        if "speaker_id_nearness_auc" in s:
            said.append(f"places distilled samples nearer the training voices than voices it never heard with AUC "
                        f"{s['speaker_id_nearness_auc']:.3f} (0.5 = no nearer than a stranger's; held-back clips of "
                        f"the known voices, what this test can see: {s['speaker_id_check_nearness_auc']:.3f}"
                        + ("; well below 0.5 the samples are unlike real speech there and the test says nothing "
                           "about them" if s["speaker_id_nearness_auc"] < 0.4 else "") + ")")
        out += " " + " and ".join(said) + "." if said else "."
    out += (f" Membership-inference AUC: full-data models {s['mia_auc_full_data']:.3f}, models trained on the "
            f"distilled set only {s['mia_auc_distilled']:.3f} (these never saw a real clip: their AUC is the "
            "no-leak reference, not 0.5, since members and non-members also differ in speakers).")
    if "mia_same_speaker_auc_full_data" in s:
        out += (f" Against held-out clips of the training speakers themselves (0.5 = no leak): full-data models "
                f"{s['mia_same_speaker_auc_full_data']:.3f}, distilled-trained {s['mia_same_speaker_auc_distilled']:.3f}.")
    if "mia_init_sources_auc_full_data" in s:
        n = s.get("mia_init_sources_n")
        size = "" if n is None else f", {n} clips a side" + (
            ": too few to tell much (the start clips are nearly all the training clips)" if n < MIA_FEW else "")
        out += (f" Aimed at the clips that initialised the set, against the other training clips{size}: full-data "
                f"models {s['mia_init_sources_auc_full_data']:.3f} (the reference: both trained them), "
                f"distilled-trained {s['mia_init_sources_auc_distilled']:.3f}.")
    return out


def _chosen(tune: dict) -> str:
    """``--tune``'s chosen values as ``name=value, ...``."""
    return ", ".join(f"{k}={v}" for k, v in tune["chosen"].items())


def summary_table(report: dict) -> str:
    """Console table of validation/test UAR and WA (mean +- std over seeds) per training setting."""
    lines = [f"{'training set':<26}{'n':>7}{'val UAR':>16}{'test UAR':>16}{'test WA':>16}{'train s':>9}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<26}{r['n_train']:>7}"
                     f"{r['val_uar_mean'] * 100:>10.1f} ± {r['val_uar_std'] * 100:<3.1f}"
                     f"{r['test_uar_mean'] * 100:>10.1f} ± {r['test_uar_std'] * 100:<3.1f}"
                     f"{r['test_wa_mean'] * 100:>10.1f} ± {r['test_wa_std'] * 100:<3.1f}{r['train_seconds']:>9.1f}"
                     + ("*" if r.get("extra", {}).get("reused_from") else ""))
    if any(r.get("extra", {}).get("reused_from") for r in report["results"].values()):
        lines.append("* trained by an earlier run sharing the experts folder and reused: its seconds were not spent here")
    s = report["summary"]
    if "n_folds" in report:
        lines.append(f"{report['protocol']}: {report['n_folds']} folds, seeds of every fold pooled")
    lines.append(f"distilled / full-data test UAR: random init {s['uar_ratio_random']:.3f} (a new model), fixed init "
                 f"{s['uar_ratio_fixed']:.3f} (the distillation's)   distilled set = {s['fraction_of_train'] * 100:.2f}% "
                 f"of the training clips, {s['storage_ratio_features'] * 100:.2f}% of their feature bytes, "
                 f"{s['storage_ratio_audio'] * 100:.3f}% of their audio bytes")
    if "dcr_median_synthetic" in s:
        lines.append("privacy: " + privacy_text(s))
    if report.get("stage_seconds"):
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items()
                                             if v is not None))
    if report.get("tune"):
        t = report["tune"]
        lines.append(f"tune: {len(t['trials'])} trials on validation chose {_chosen(t)} "
                     f"(val UAR {t['chosen_val_uar']:.3f})")
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


_SETTINGS = {"full_data": "full training split (the experts)",
             "full_data_reference": "full training split (reference, best epoch on validation)", "distilled_fixed_init": "distilled, fixed init",
             "distilled_random_init": "distilled, random init", "random_subset_fixed_init": "random real subset",
             "herding_subset_fixed_init": "herding coreset",
             "kcenter_subset_fixed_init": "k-center coreset (expert features)",
             "dm_fixed_init": "distribution matching (DM), same size",
             "random_subset_random_init": "random real subset", "herding_subset_random_init": "herding coreset",
             "kcenter_subset_random_init": "k-center coreset (guide's expert features)",
             "dm_random_init": "distribution matching (DM), same size"}


def test_uar(result: dict) -> tuple[float, float]:
    """(mean, std over seeds) of a training setting's test UAR in ``report.json["results"]``, in points."""
    return 100 * result["test_uar_mean"], 100 * result["test_uar_std"]


def verdict(ours: tuple[float, float], theirs: tuple[float, float]) -> str:
    """``(mean, std)`` of one training setting's test UAR against another's, in points: 'beats +m' or
    'loses -m' when the difference of the means m is larger than both seed spreads, else 'ties +m'."""
    margin = ours[0] - theirs[0]
    word = "ties" if abs(margin) <= max(ours[1], theirs[1]) else ("beats" if margin > 0 else "loses")
    return f"{word} {margin:+.1f}"


def random_init_verdicts(results: dict) -> str | None:
    """The distilled set trained from random initialisations against each coreset of its size, a lead
    counted only beyond both seed spreads (None when the report lacks them)."""
    pairs = [(w, k) for w, k in (("the random subset", "random_subset_fixed_init"),
                                 ("herding", "herding_subset_fixed_init"),
                                 ("k-center", "kcenter_subset_fixed_init"),
                                 ("DM", "dm_fixed_init")) if k in results]
    if "distilled_random_init" not in results or not pairs:
        return None
    ours = test_uar(results["distilled_random_init"])
    return "; ".join(f"{verdict(ours, test_uar(results[k]))} against {w}" for w, k in pairs)


def markdown(report: dict, config: dict) -> str:
    """``report.md``: what was run and what it gave, in a form to read, share and cite."""
    import datetime

    s = report["summary"]
    d = report.get("distill") or config.get("distill", {})       # as distilled (tuned values, lr_init resolved)
    lines = [f"# sersynth run: {report['corpus']}, {report['model']['name']}, {int(s['ipc'])} per class", "",
             f"{datetime.date.today().isoformat()} · {report['backend']} ({len(report['devices'])} device(s)) · "
             f"jax {report['jax_version']} · feature cache `{report['cache_hash']}` · protocol `{report['protocol']}`"
             + (f", {report['n_folds']} folds pooled" if "n_folds" in report else
                (f", fold {report['fold']}" if report.get("fold") else "")), "",
             f"Classes: {', '.join(report['classes'])}. Model: `{report['model']['name']}` "
             f"({report['n_params']:,} parameters). Distillation: matching trajectories (MTT) with "
             f"{d.get('syn_steps')} inner steps against {d.get('expert_epochs')} expert epoch(s), "
             f"{d.get('iterations')} outer steps, initialised from `{d.get('init')}`.", "",
             "| training set | clips | val UAR % | test UAR % | test WA % |", "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {_SETTINGS.get(name, name)} | {r['n_train']} | {r['val_uar_mean'] * 100:.1f} ± "
                     f"{r['val_uar_std'] * 100:.1f} | {r['test_uar_mean'] * 100:.1f} ± {r['test_uar_std'] * 100:.1f}"
                     f" | {r['test_wa_mean'] * 100:.1f} ± {r['test_wa_std'] * 100:.1f} |")
    for name, other in report.get("other_models", {}).items():
        lines += ["", f"Trained on the same sets: `{name}` ({other['n_params']:,} parameters, from random "
                  "initialisations)", "", "| training set | n | val UAR (%) | test UAR (%) |", "|---|---:|---:|---:|"]
        lines += [f"| {_SETTINGS.get(k, k)} | {r['n_train']} | {r['val_uar_mean'] * 100:.1f} ± "
                  f"{r['val_uar_std'] * 100:.1f} | {r['test_uar_mean'] * 100:.1f} ± {r['test_uar_std'] * 100:.1f} |"
                  for k, r in other["results"].items()]
    lines += ["", "Mean ± std over seeds (and folds). Model selection used the validation split only.", "",
              f"- Distilled / full-data test UAR: **{s['uar_ratio_random']:.3f}** training a new model from random "
              f"initialisations, {s['uar_ratio_fixed']:.3f} from the distillation's fixed initialisations.",
              f"- Distilled set: {s['fraction_of_train'] * 100:.2f}% of the training clips, "
              f"{s['storage_ratio_features'] * 100:.2f}% of their feature bytes, "
              f"{s['storage_ratio_audio'] * 100:.3f}% of their audio bytes.",
              f"- Distilled minus random subset: {s['distilled_minus_subset_test_uar'] * 100:+.1f} test UAR points; "
              f"minus herding: {s['distilled_minus_herding_test_uar'] * 100:+.1f}"
              + "".join(f"; minus {w}: {s[k] * 100:+.1f}" for k, w in (("distilled_minus_kcenter_test_uar", "k-center"),
                                                                      ("distilled_minus_dm_test_uar", "DM")) if k in s)
              + " (distilled from the fixed initialisations)."]
    verdicts = random_init_verdicts(report["results"])
    if verdicts:
        lines.append(f"- Distilled from random initialisations, test UAR (a lead counts only when it is larger than "
                     f"both seed spreads): {verdicts}.")
    if "dcr_median_synthetic" in s:
        lines += ["- Privacy: " + privacy_text(s) + " A large distance is not proof that nothing leaks: these "
                  "figures find copies, edited copies, mixtures and recoverable sources."]
    if report.get("tune"):
        t = report["tune"]
        lines.append(f"- Settings chosen on validation (`--tune`, {len(t['trials'])} trials of "
                     f"{t['iterations'] or d.get('iterations')} iterations): "
                     + _chosen(t) + f" (validation UAR {t['chosen_val_uar'] * 100:.1f}; trials in `distill/tune/tune.json`).")
    lines += [f"- **Warning:** {w}" for w in report.get("warnings", [])]
    if report.get("stage_seconds"):
        lines.append("- Seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items()
                                                         if v is not None) + ".")
    arts = report.get("artifacts", {})
    if arts.get("plots"):
        lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({p})" for p in arts["plots"]]
    if arts.get("audio"):
        lines += ["", "## Listen", ""] + [f"- [{Path(a).stem}]({a})" for a in arts["audio"]]
    lines += ["", "## Reproduce", "", "`command.flags` in this folder holds every flag of the run (`config.json` "
              "every resolved setting): `sersynth run --flagfile=command.flags --workdir=NEW`, from the folder the "
              "run was started in (its paths are as typed), re-runs it in NEW. Here, the same command resumes an "
              "interrupted run; a finished one is refused unless `--overwrite`.", "", "## Cite", "",
              "Method: Cazenavette et al., *Dataset Distillation by Matching Training Trajectories*, CVPR 2022; "
              "for speech emotion: Chang et al., *Breaking Resource Barriers in Speech Emotion Recognition via "
              "Data Distillation*, Interspeech 2025 (arXiv 2406.15119). Software: sersynth "
              f"{artifact.version()}.", ""]
    return "\n".join(lines)
