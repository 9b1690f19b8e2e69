"""The experiment runner end to end, its reproducibility and its refusals."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sersynth import artifact, pipeline, protocol
from sersynth import report as report_lib
from sersynth.io import load_npz

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = [
    "--corpus=embedded", "--embedded_speakers=6", "--embedded_utterances=3", "--emotions=anger,sadness,happiness",
    "--n_fft=512", "--hop_length=256", "--n_mels=16", "--clip_seconds=0.5", "--workers=1",
    "--model=convnet", "--width=4", "--depth=1", "--n_experts=2", "--expert_train_epochs=4", "--expert_lr=0.05",
    "--expert_batch_size=16", "--ipc=2", "--syn_steps=3", "--expert_epochs=1", "--max_start_epoch=2",
    "--iterations=20", "--eval_every=10", "--checkpoint_every=5", "--log_every=2", "--lr_img=10", "--lr_init=0.01",
    "--eval_seeds=2", "--eval_epochs=5", "--render_per_class=1", "--noprogress", "--baselines=kcenter,dm",
    "--dm_iterations=5",
]


# the installed command, as users run it (`pip install -e .` made it); PYTHONPATH keeps a copy of the
# tree importable in its place (e.g. a tree with one line broken, to see a test fail). The multi-host test
# (test_sharding) runs `python -m experiments.run`, as on a machine without the package installed.
RUN = [str(Path(sys.executable).parent / "sersynth"), "run"]


def run_cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert Path(RUN[0]).is_file(), "sersynth is not installed: pip install -e ."
    proc = subprocess.run([*RUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_end_to_end_run_writes_every_artifact(finished_run):
    workdir, proc = finished_run
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["results"]) == {"full_data", "full_data_reference", "distilled_fixed_init",
                                      "distilled_random_init", "random_subset_fixed_init",
                                      "herding_subset_fixed_init", "kcenter_subset_fixed_init", "dm_fixed_init"}
    assert report["results"]["dm_fixed_init"]["extra"]["dm"]["iterations"] == 5
    ref = report["results"]["full_data_reference"]
    assert len(ref["uar"]["test"]) == 2 and ref["extra"]["epochs"] == 4
    assert all(1 <= e <= 4 for e in ref["extra"]["selected_epoch"])
    assert s_ratio_uses_reference(report)
    # the experts' training curves are in metrics.jsonl: loss and validation UAR per expert and epoch
    meta = json.loads((workdir / "experts" / "meta.json").read_text())
    losses = load_npz(workdir / "experts" / "trajectories.npz")["losses"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "experts"]
    assert [(r["expert"], r["epoch"]) for r in rows] == [(e, k) for e in range(2) for k in range(5)]
    assert [r["val_uar"] for r in rows] == [v for curve in meta["val_uar_curve"] for v in curve]
    np.testing.assert_allclose([r["loss"] for r in rows if r["epoch"]], losses.ravel(), rtol=1e-5)
    for r in report["results"].values():
        assert 0.0 <= r["test_uar_mean"] <= 1.0 and 0.0 <= r["val_wa_mean"] <= 1.0
    s = report["summary"]
    # the fixed-init settings train from every expert's initialisation (--n_experts=2); the seconds per model
    # count every seed at every lr candidate
    fixed = report["results"]["distilled_fixed_init"]
    assert len(fixed["uar"]["test"]) == 2 and len(report["results"]["herding_subset_fixed_init"]["uar"]["test"]) == 2
    assert s["train_seconds_distilled_per_model"] == pytest.approx(fixed["train_seconds"] / (2 * 4))
    assert s["train_seconds_full_per_model"] == pytest.approx(ref["train_seconds"] / 2)
    assert s["ipc"] == 2 and s["fraction_of_train"] == pytest.approx(6 / report["results"]["full_data"]["n_train"])
    assert 0 < s["storage_ratio_features"] < 1 and 0 < s["storage_ratio_audio"] < 1
    assert s["learned_lr"] > 0
    # every small set chose its lr on validation from the same candidates: the learned lr, expert lr x grid
    small = [report["results"][k]["extra"] for k in ("distilled_fixed_init", "distilled_random_init",
                                                     "random_subset_fixed_init", "herding_subset_fixed_init",
                                                     "kcenter_subset_fixed_init", "dm_fixed_init")]
    tried = [sorted(float(v) for v in e["lr_val_uar"]) for e in small]
    assert all(t == tried[0] for t in tried)
    assert tried[0] == pytest.approx(sorted([s["learned_lr"], 0.015, 0.05, 0.15]), rel=1e-5)
    for e in small:
        assert e["lr_val_uar"][f"{e['lr']:.6g}"] == max(e["lr_val_uar"].values())
    priv = report["privacy"]
    assert len(priv["dcr"]["synthetic"]) == 6 and priv["dcr"]["median_holdout"] > 0
    assert set(priv["membership_inference"]) == {"full_data", "distilled_fixed_init", "distilled_random_init"}
    assert all(0 <= m["auc_mean"] <= 1 for m in priv["membership_inference"].values())
    assert s["mia_auc_full_data"] == priv["membership_inference"]["full_data"]["auc_mean"]
    assert "privacy: median distance" in proc.stdout
    assert set(priv["dcr"]["robust"]["edits"]) == {"max_shift", "stretches", "remove_gain"}
    assert len(priv["dcr"]["robust"]["synthetic"]) == len(priv["dcr"]["mixture"]["synthetic"]) == 6
    assert priv["source_recovery"]["n_samples"] == 6 and 0 <= s["source_recovery_auc"] <= 1
    assert set(priv["meaning"]) >= {"dcr", "robust", "mixture", "source_recovery", "membership_inference"}
    assert all(m["n_members"] == m["n_nonmembers"] for m in priv["membership_inference"].values())
    md = (workdir / "report.md").read_text()
    assert "| distilled, fixed init | 6 |" in md and "Membership-inference AUC" in md and "arXiv 2406.15119" in md
    assert "| k-center coreset (expert features) | 6 |" in md and "minus DM:" in md
    rs = report["results"]                                     # the random-init verdicts, beyond the seed spreads
    ours, herding = report_lib.test_uar(rs["distilled_random_init"]), report_lib.test_uar(rs["herding_subset_fixed_init"])
    assert f"{report_lib.verdict(ours, herding)} against herding;" in md and " against DM." in md
    assert "no-leak reference" in md and "after undoing gain, shifts and stretches" in md
    si = report["privacy"]["speaker_identity"]                   # real init: each sample's source speaker
    assert si["n_samples"] == 6 and 0 <= si["source_speaker_hit_rate"] <= 1
    assert report["summary"]["speaker_id_source_hit_rate"] == si["source_speaker_hit_rate"]
    assert "names one of a sample's initialisation speakers" in md
    near = si["nearness"]                                      # source-free: against the val/test speakers
    assert near["n_unseen"] == len(priv["dcr"]["holdout"])      # every val/test clip (all of them: a tiny corpus)
    assert report["summary"]["speaker_id_nearness_auc"] == near["auc_synthetic_vs_unseen"]
    assert "nearer the training voices than voices it never heard" in md
    for link in [p for p in report["artifacts"]["plots"] + report["artifacts"]["audio"]]:
        assert f"({link})" in md
    for rel in report["artifacts"]["plots"] + report["artifacts"]["audio"]:
        assert (workdir / rel).stat().st_size > 0
    for rel in report["artifacts"]["plots"]:                       # a vector copy of every figure, for papers
        assert (workdir / rel).with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert len(report["artifacts"]["audio"]) == 3
    assert "plots/experts_val_uar.png" in report["artifacts"]["plots"]
    curve = np.asarray(report["experts_val_uar_curve"])              # [experts, epochs + 1]
    meta = json.loads((workdir / "experts" / "meta.json").read_text())
    assert curve.shape == (2, 5) and ((curve >= 0) & (curve <= 1)).all()
    assert meta["final_val_uar"] == pytest.approx(curve[:, -1].tolist(), abs=1e-4)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    distill_rows = [r for r in rows if r["stage"] == "distill"]
    assert [r["iteration"] for r in distill_rows if "loss" in r] == list(range(1, 21))
    assert [r["iteration"] for r in distill_rows if "val_uar" in r] == [0, 10, 20]
    distilled = load_npz(workdir / "distill" / "distilled.npz")
    assert distilled["x"].shape == (6, 32, 16) and np.all(np.isfinite(distilled["x"]))
    assert "distilled / full-data test UAR: random init" in proc.stdout
    assert set(report["stage_seconds"]) == {"prepare", "experts", "distill", "evaluate", "total"}
    assert all(v > 0 for v in report["stage_seconds"].values())
    config = json.loads((workdir / "config.json").read_text())
    assert config["distill"]["ipc"] == 2 and config["model"]["width"] == 4


def s_ratio_uses_reference(report: dict) -> bool:
    r, s = report["results"], report["summary"]
    return abs(s["uar_ratio_random"] - r["distilled_random_init"]["test_uar_mean"]
               / r["full_data_reference"]["test_uar_mean"]) < 1e-9


def test_same_flags_same_result(finished_run, tmp_path):
    """The run's command.flags re-runs it: the same distilled set."""
    workdir, _ = finished_run
    command = (workdir / "command.flags").read_text()
    assert "--ipc=2\n" in command and "--noprogress\n" in command and "--overwrite" not in command
    # every program the re-run compiles was stored by the first run (the session's --compile_cache, set in
    # conftest): it is loaded from there, not compiled and stored again
    xla = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    stored = {p.name: p.stat().st_mtime_ns for p in xla.iterdir()}
    assert any(name.startswith("jit_outer_step") for name in stored)
    run_cli(f"--flagfile={workdir / 'command.flags'}", f"--workdir={tmp_path}", f"--cache_dir={workdir / 'cache'}",
            "--stage=experts,distill", "--tensorboard")
    after = {p.name: p.stat().st_mtime_ns for p in xla.iterdir()}
    assert {name: after.get(name) for name in stored} == stored                    # none rewritten or lost
    # and no named program stored again under another key (jit_outer_step-<key>-cache); a small helper
    # (jit__shuffle, a jit__lambda) the first run compiled just under the cache's 0.3 s threshold, so did
    # not store, may cross it here on a loaded machine and be stored now
    assert all(name.startswith("jit__") for name in after.keys() - stored.keys()), after.keys() - stored.keys()
    a = load_npz(workdir / "distill" / "distilled.npz")
    b = load_npz(tmp_path / "distill" / "distilled.npz")
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["lr"], b["lr"])
    # --tensorboard changes no result and writes the rows of metrics.jsonl as scalar events
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(scalars["experts/val_uar/expert_1"]) == [(r["epoch"], pytest.approx(r["val_uar"])) for r in metrics
                                                           if r["stage"] == "experts" and r["expert"] == 1]
    assert [s for s, _ in sorted(scalars["distill/loss"])] == [r["iteration"] for r in metrics
                                                               if r["stage"] == "distill" and "loss" in r]
    assert "distill/val_uar" in scalars and "experts/loss/expert_0" in scalars


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``: tag -> [(step, value)] (records read by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_membership_holdout_keeps_clips_of_training_speakers_out_of_every_stage(finished_run, tmp_path):
    """--mia_holdout: part of each training speaker's clips leaves training (experts, distillation,
    every model) and serves as same-speaker non-members; the run says which clips."""
    workdir, _ = finished_run
    assert "mia_holdout" not in json.loads((workdir / "config.json").read_text())   # off: runs stay as they were
    run_cli(f"--workdir={tmp_path}", *TINY_FLAGS, f"--cache_dir={workdir / 'cache'}", "--baselines=",
            "--mia_holdout=0.25")
    report = json.loads((tmp_path / "report.json").read_text())
    manifest = json.loads((workdir / "cache" / "manifest.json").read_text())
    held = report["membership_holdout"]
    train_files = [f for f in manifest["files"] if f["split"] == "train"]
    speakers = {f["speaker"] for f in train_files}
    assert held["fraction"] == 0.25 and held["n_clips"] == len(held["files"]) >= len(speakers)
    by_path = {f["path"]: f for f in train_files}
    assert all(p in by_path for p in held["files"])                               # training clips...
    assert {by_path[p]["speaker"] for p in held["files"]} == speakers              # ...of every training speaker
    assert report["results"]["full_data"]["n_train"] == len(train_files) - held["n_clips"]
    assert json.loads((tmp_path / "experts" / "meta.json").read_text())["cache_hash"].endswith("-mia0.25-renorm")
    same = report["privacy"]["membership_same_speaker"]
    assert set(same) == {"full_data", "distilled_fixed_init", "distilled_random_init"}
    assert same["full_data"]["n_nonmembers"] == held["n_clips"]
    assert "full_data" in report["privacy"]["membership_init_sources"]
    s = report["summary"]
    assert 0 <= s["mia_same_speaker_auc_distilled"] <= 1 and 0 <= s["mia_init_sources_auc_full_data"] <= 1
    md = (tmp_path / "report.md").read_text()
    assert "Against held-out clips of the training speakers themselves" in md and "Aimed at the clips" in md
    assert s["mia_init_sources_n"] >= 1 and f"{s['mia_init_sources_n']} clips a side" in md


def test_finished_or_different_runs_are_not_overwritten(finished_run):
    workdir, _ = finished_run
    before = (workdir / "report.json").read_bytes()
    proc = run_cli(f"--workdir={workdir}", *TINY_FLAGS, check=False)
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr
    proc = run_cli(f"--workdir={workdir}", *TINY_FLAGS, "--ipc=3", check=False)
    assert proc.returncode == 2 and "other settings (differ: distill)" in proc.stderr
    assert (workdir / "report.json").read_bytes() == before


def test_settings_added_later_at_their_older_values_are_the_same_run(finished_run, tmp_path):
    """config.json leaves out the settings added after runs were recorded while they hold the value of the
    older behaviour, so a run recorded before they existed is the same run. One recorded with them
    spelled out at those values (as a version in between wrote them) is still the run the same command
    makes today: the command finds its finished run, not a run with other settings."""
    import shutil

    workdir = tmp_path / "spelled_out"
    shutil.copytree(finished_run[0], workdir)
    config = json.loads((workdir / "config.json").read_text())
    assert not {"mia_holdout", "select_lr", "eval_fixed_inits"} & set(config)
    assert not {"label_init", "init_noise", "min_start_epoch"} & set(config["distill"])
    config.update(mia_holdout=0.0, select_lr="learned", eval_fixed_inits=0)
    config["distill"].update(label_init="onehot", init_noise=0.0, min_start_epoch=0)
    (workdir / "config.json").write_text(json.dumps(config))
    proc = run_cli(f"--workdir={workdir}", *TINY_FLAGS, check=False)
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr, proc.stderr[-2000:]


def test_a_distilled_set_is_re_evaluated_under_other_evaluation_settings(finished_run, tmp_path):
    """`sersynth run --stage=evaluate` with other evaluation settings re-evaluates the run's distilled set
    (no distillation again) and keeps the earlier evaluation; any other changed setting is still refused."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    before = {name: (workdir / name).read_bytes() for name in ("report.json", "report.md", "config.json")}
    distilled = artifact.load_set(workdir / "distill" / "distilled.npz")

    def run(*extra):
        return run_cli(f"--workdir={workdir}", *TINY_FLAGS, *extra, check=False)

    proc = run("--stage=distill,evaluate", "--eval_seeds=3")
    assert proc.returncode == 2 and "(or --stage=evaluate alone to re-evaluate its distilled set)" in proc.stderr
    proc = run("--stage=evaluate", "--eval_seeds=3", "--ipc=3")
    assert proc.returncode == 2 and "differ: distill, eval_seeds" in proc.stderr and "alone" not in proc.stderr
    assert not (workdir / pipeline.EARLIER_EVALUATIONS).exists()
    proc = run("--stage=evaluate", "--eval_seeds=3", "--eval_optimizer=mtt", "--baselines=", "--eval_lr_choice=shared",
               "--eval_fixed_inits=1", "--progress", "--eval_lr_extend=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the evaluation shows a bar for every model family it trains (progress is not part of the run's identity)
    assert "full_data_reference:" in proc.stderr and "distilled_random_init lr " in proc.stderr
    kept = workdir / pipeline.EARLIER_EVALUATIONS / "1"
    assert {name: (kept / name).read_bytes() for name in before} == before
    assert (kept / "plots").is_dir() and (kept / "audio").is_dir()
    report = json.loads((workdir / "report.json").read_text())
    assert len(report["results"]["distilled_random_init"]["uar"]["test"]) == 3
    # --eval_fixed_inits=1: the fixed-init settings trained from the first expert's initialisation alone
    assert [len(report["results"][k]["uar"]["test"]) for k in ("distilled_fixed_init", "herding_subset_fixed_init",
                                                              "random_subset_fixed_init")] == [1, 1, 3]
    assert "kcenter_subset_fixed_init" not in report["results"]
    # --eval_lr_choice=shared: the random subset chose among every candidate (--eval_lr_extend=1: and 3x the largest
    # where that one won), the other settings trained at its lr
    chosen = report["results"]["random_subset_fixed_init"]["extra"]
    assert len(chosen["lr_val_uar"]) - chosen["lr_extended"] == len(report["lr_candidates"]) == 4
    assert (f"{3 * max(report['lr_candidates']):.6g}" in chosen["lr_val_uar"]) == (chosen["lr_extended"] == 1)
    for name in ("distilled_fixed_init", "distilled_random_init", "herding_subset_fixed_init"):
        extra = report["results"][name]["extra"]
        assert (extra["lr"], extra["lr_chosen_by"], len(extra["lr_val_uar"])) == (chosen["lr"], "random_subset", 1)
    # the same set, now describing the evaluation in the report (what `sersynth train` reads)
    now = artifact.load_set(workdir / "distill" / "distilled.npz")
    assert all(np.array_equal(getattr(now, k), getattr(distilled, k)) for k in ("x", "labels", "targets", "mel_std"))
    assert (now.lr, now.meta["distill"]) == (distilled.lr, distilled.meta["distill"])
    assert (now.meta["eval_optimizer"], now.meta["train"]["optimizer"]) == ("mtt", "sgd")
    assert now.meta["train"]["weight_decay"] == 5e-4 and distilled.meta["train"]["weight_decay"] == 0
    assert now.meta["lr_for_training"] == report["results"]["distilled_random_init"]["extra"]["lr"]
    config = json.loads((workdir / "config.json").read_text())
    assert (config["eval_seeds"], config["eval_optimizer"], config["eval_fixed_inits"]) == (3, "mtt", 1)
    assert ("the distilled set's iteration was chosen on validation under other evaluation settings "
            "(eval_optimizer=learned_sgd, eval_seeds=2) than it is evaluated with here") in report["warnings"]
    assert "chosen on validation under other evaluation settings" in (workdir / "report.md").read_text()
    # once more with the first settings: a second earlier evaluation, and the run is the first one again
    assert run("--stage=evaluate").returncode == 0
    assert json.loads((workdir / pipeline.EARLIER_EVALUATIONS / "2" / "config.json").read_text()) == config
    assert (workdir / "config.json").read_bytes() == before["config.json"]
    assert not any("other evaluation settings" in w for w in json.loads((workdir / "report.json").read_text())
                   .get("warnings", []))
    # an evaluation that never finished (no report) leaves nothing to keep: no folder holding a config alone
    (workdir / "report.json").unlink()
    assert run("--stage=evaluate", "--eval_seeds=3").returncode == 0
    assert sorted(d.name for d in (workdir / pipeline.EARLIER_EVALUATIONS).iterdir()) == ["1", "2"]
    assert json.loads((workdir / "config.json").read_text())["eval_seeds"] == 3


def test_membership_holdout_normalises_without_the_held_out_clips(finished_run):
    """The held-out clips reach no stage, not even through the per-Mel-bin normalisation: the view's
    training clips are standardised with their own statistics, and its features are the cache's
    clips (the same audio) under them."""
    fs = pipeline.cache_lib.load(finished_run[0] / "cache")
    view = pipeline.membership_holdout(pipeline.RunConfig(workdir="w", mia_holdout=0.25), fs)
    train = view.split == pipeline.cache_lib.SPLIT_CODES["train"]
    assert (view.split == pipeline.HELD_OUT).sum() > 0 and train.sum() < (fs.split == pipeline.cache_lib.SPLIT_CODES["train"]).sum()
    np.testing.assert_allclose(view.x[train].mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(view.x[train].std(axis=(0, 1)), 1, atol=1e-3)
    np.testing.assert_allclose(view.x * view.mel_std + view.mel_mean, fs.x * fs.mel_std + fs.mel_mean, atol=1e-4)


def test_validation_can_judge_every_iteration_at_the_evaluations_lr_candidates(finished_run, tmp_path):
    """--select_lr=candidates: each validation during distillation trains the set at every lr candidate of
    the final evaluation and scores it by the best, so the starting set is judged at its best lr too."""
    workdir, _ = finished_run
    rows_of = lambda w: [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows_of(workdir) if r["stage"] == "distill_validation"]     # default: the learned lr
    run_cli(f"--workdir={tmp_path}", *TINY_FLAGS, f"--cache_dir={workdir / 'cache'}",
            f"--experts_dir={workdir / 'experts'}", "--stage=distill", "--select_lr=candidates")
    meta = json.loads((tmp_path / "distill" / "meta.json").read_text())
    rows = {r["iteration"]: r for r in rows_of(tmp_path) if r["stage"] == "distill_validation"}
    assert sorted(rows) == [e["step"] for e in meta["evaluations"]] == [0, 10, 20]
    for e in meta["evaluations"]:
        by_lr = {float(k[len(pipeline.VAL_AT_LR):]): v for k, v in rows[e["step"]].items()
                 if k.startswith(pipeline.VAL_AT_LR)}
        learned = 0.01 if e["step"] == 0 else next(lr for lr in by_lr if lr not in (0.015, 0.05, 0.15))
        assert sorted(by_lr) == pytest.approx(sorted([learned, 0.05 * 0.3, 0.05, 0.05 * 3]))   # --expert_lr=0.05
        assert e["score"] == pytest.approx(max(by_lr.values()))
    assert len({round(v, 6) for r in rows.values() for k, v in r.items() if k.startswith(pipeline.VAL_AT_LR)}) > 1
    assert meta["selected_under"]["eval_lr_grid"] == [0.3, 1.0, 3.0]


def test_experts_from_another_cache_are_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    cfg_json = json.loads((workdir / "config.json").read_text())
    fs = pipeline.cache_lib.load(workdir / "cache")
    ex = pipeline.experts_lib.load(workdir / "experts")
    other = dataclasses.replace(fs, manifest={**fs.manifest, "hash": "0123456789abcdef"})
    cfg = pipeline.RunConfig(workdir=str(tmp_path), model=cfg_json["model"],
                             distill=pipeline.distill_lib.DistillConfig(**cfg_json["distill"]))
    with pytest.raises(pipeline.RunError, match="experts were trained on feature cache"):
        pipeline.stage_distill(cfg, other, ex)


def test_compile_cache_folder():
    from sersynth.compile_cache import folder as compile_cache_dir

    assert compile_cache_dir("none", {"JAX_COMPILATION_CACHE_DIR": "/j"}) is None
    assert compile_cache_dir("/x", {"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/x"
    assert compile_cache_dir("auto", {"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/c"}) == "/j"
    assert compile_cache_dir("auto", {"XDG_CACHE_HOME": "/c"}) == os.path.join("/c", "sersynth", "xla")
    assert compile_cache_dir("auto", {}).endswith(os.path.join(".cache", "sersynth", "xla"))


def test_compile_cache_prune_deletes_the_least_recently_used(tmp_path):
    """--compile_cache_max_mb: the oldest files by last use (the later of access and modification)
    go first, until the folder fits."""
    from sersynth.compile_cache import prune

    now = time.time()
    for i, (used, written) in enumerate([(5, 5), (1, 9), (4, 4), (3, 3), (2, 2)]):      # days ago
        f = tmp_path / f"p{i}"
        f.write_bytes(b"\0" * 1000)
        os.utime(f, (now - used * 86_400, now - written * 86_400))
    assert prune(str(tmp_path), 2500) == (3, 3000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1", "p4"]    # p1: written long ago, used yesterday
    assert prune(str(tmp_path), 2500) == (0, 0)
    assert prune(str(tmp_path / "missing"), 0) == (0, 0)


@pytest.mark.parametrize("flag,message", [
    ("--ipc=0", "error: --ipc must be >= 1"),
    ("--syn_steps=0", "error: --syn_steps must be >= 1"),
    ("--max_start_epoch=40", "error: --max_start_epoch=40 + --expert_epochs=1 needs 40 trained epochs"),
    ("--stage=distil", "error: --stage: unknown stage(s) ['distil']"),
    ("--split=0.5,0.5", "error: --split needs three fractions"),
    ("--corpus=ravdes", "error: unknown corpus 'ravdes'"),
    ("--corpus=ravdess", "error: --corpus=ravdess needs --corpus_dir"),
    ("--n_mels=4000", "error: n_mels must be in"),
    ("--eval_lr_grid=0,1", "error: --eval_lr_grid needs positive multipliers"),
    ("--eval_lr_extend=-1", "error: --eval_lr_extend must be >= 0, got -1"),
    ("--eval_fixed_inits=3", "error: --eval_fixed_inits=3 needs as many experts (--n_experts=2)"),
])
def test_bad_flags_fail_fast_with_one_line(tmp_path, flag, message):
    proc = run_cli(f"--workdir={tmp_path / 'w'}", *TINY_FLAGS, flag, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "w").exists()


def test_unknown_flag_and_missing_corpus(tmp_path):
    proc = run_cli(f"--workdir={tmp_path / 'w'}", "--ipcc=3", check=False)
    assert proc.returncode != 0 and "ipcc" in proc.stderr
    proc = run_cli(f"--workdir={tmp_path / 'w'}", *TINY_FLAGS, "--corpus=demos",
                   f"--corpus_dir={tmp_path / 'missing'}", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli(f"--workdir={tmp_path / 'w2'}", *TINY_FLAGS, "--stage=distill", check=False)
    assert proc.returncode == 2 and "no feature cache" in proc.stderr.strip().splitlines()[-1]


def test_every_flag_file_parses_and_validates():
    code = """
import dataclasses, glob, sys
from absl import flags
import sersynth.runner as run
import sersynth.table  # noqa: F401 - its flags too: table_*.flags are runner flag files plus the table's span
for path in sorted(glob.glob('experiments/flags/*.flags')):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['run', '--flagfile=' + path])
    cfg = run.config_from_flags()
    # the corpus folders the flag files name are not on this machine: an existing folder stands in
    cfg = dataclasses.replace(cfg, corpus_dir=",".join(["tests"] * len(cfg.corpus_dir.split(","))) if cfg.corpus_dir else "")
    cfg.validate()
    print(path, cfg.corpus, cfg.model['name'], cfg.distill.ipc)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(list((ROOT / "experiments" / "flags").glob("*.flags"))) >= 8
    assert "experiments/flags/paper_demos.flags embedded cnn6 150" in lines


def test_the_runs_compute_dtype_follows_the_backend_unless_given():
    """paper_demos.flags leaves --compute_dtype at auto: float32 on CPU, bfloat16 on a GPU; a given dtype stays."""
    code = """
import jax
from absl import flags
import sersynth.runner as run
out = []
for backend, extra in (('cpu', []), ('gpu', []), ('gpu', ['--compute_dtype=float32'])):
    jax.default_backend = lambda b=backend: b
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['run', '--flagfile=experiments/flags/paper_demos.flags'] + extra)
    out.append(run.config_from_flags().model['compute_dtype'])
print(out)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert eval(proc.stdout.strip().splitlines()[-1]) == ["float32", "bfloat16", "float32"]


def _flag_names(path: Path) -> set[str]:
    """The flags a flag file sets, through the flag files it includes."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("--flagfile="):
            names |= _flag_names(ROOT / line.split("=", 1)[1])
        elif line.startswith("--"):
            names.add(line[2:].split("=", 1)[0])
    return names


@pytest.mark.parametrize("name", ["small.flags", "small_herding.flags"])
def test_the_cpu_recipes_set_nothing_about_the_corpus(name):
    names = _flag_names(ROOT / "experiments" / "flags" / name)
    assert "model" in names and "ipc" in names
    about_the_corpus = {"corpus", "corpus_dir", "emotions", "protocol", "split", "fold", "val_speakers", "test_corpus",
                        "label_map", "sample_rate", "clip_seconds", "workdir", "cache_dir", "experts_dir"}
    assert not names & about_the_corpus


def test_small_flags_start_from_kmeans_and_small_herding_flags_only_change_the_start():
    code = """
from absl import flags
import sersynth.runner as run
out = []
for files in (['ravdess', 'small'], ['ravdess', 'small_herding']):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['run'] + ['--flagfile=experiments/flags/%s.flags' % f for f in files])
    cfg = run.config_from_flags()
    d = cfg.distill
    out.append((cfg.corpus, cfg.model['name'], cfg.model['width'], d.ipc, d.init, d.lr_img, d.iterations,
                d.min_start_epoch, d.max_start_epoch))
print(out)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    small, herding = eval(proc.stdout.strip().splitlines()[-1])
    assert small == ("ravdess", "convnet", 16, 5, "kmeans", 100.0, 300, 5, 15)
    assert herding == ("ravdess", "convnet", 16, 5, "herding", 100.0, 300, 5, 15)


def test_eval_optimizer_choices():
    expert = pipeline.train.TrainConfig(optimizer="adam", lr=1e-3, momentum=0.0, lr_decay=0.7, lr_decay_every=5,
                                        epochs=50, batch_size=32, min_steps_per_epoch=20)
    base = dict(workdir="w", expert_train=expert, eval_epochs=30,
                distill=pipeline.distill_lib.DistillConfig(batch_syn=256, augment=True))
    paper = protocol.eval_config(pipeline.RunConfig(eval_optimizer="expert", **base))
    assert (paper.optimizer, paper.lr, paper.lr_decay_every, paper.epochs, paper.batch_size) == ("adam", 1e-3, 5, 30, 32)
    plain = protocol.eval_config(pipeline.RunConfig(**base))
    assert (plain.optimizer, plain.momentum, plain.lr_decay_every, plain.augment, plain.batch_size) == \
        ("sgd", 0.0, 0, True, 32)
    mtt = protocol.eval_config(pipeline.RunConfig(eval_optimizer="mtt", eval_batch_size=16, **base))
    assert (mtt.optimizer, mtt.momentum, mtt.weight_decay, mtt.lr_decay, mtt.lr_decay_every, mtt.batch_size) == \
        ("sgd", 0.9, 5e-4, 0.1, 15, 16)
    # the experts' floor on steps per epoch is for the full training split: a small set's epoch is one pass
    assert paper.min_steps_per_epoch == plain.min_steps_per_epoch == mtt.min_steps_per_epoch == 0
    assert protocol.syn_lr(pipeline.RunConfig(eval_optimizer="mtt", **base), 0.02) == 0.02
    assert protocol.syn_lr(pipeline.RunConfig(eval_optimizer="expert", **base), 0.02) is None
    assert protocol.lr_candidates(pipeline.RunConfig(**base), 0.02) == pytest.approx([0.02, 3e-4, 1e-3, 3e-3])
    assert protocol.lr_candidates(pipeline.RunConfig(eval_optimizer="expert", **base), 0.02) == \
        pytest.approx([3e-4, 1e-3, 3e-3])
    # no grid: the learned lr alone (the experts' own with their optimiser)
    assert protocol.lr_candidates(pipeline.RunConfig(eval_lr_grid=(), **base), 0.02) == pytest.approx([0.02])
    assert protocol.lr_candidates(pipeline.RunConfig(eval_lr_grid=(), eval_optimizer="expert", **base), 0.02) == \
        pytest.approx([1e-3])
    pipeline.RunConfig(eval_lr_grid=(), **base).validate()
    with pytest.raises(pipeline.RunError, match="--eval_patience needs --eval_select_every"):
        pipeline.RunConfig(eval_patience=2, **base).validate()
    with pytest.raises(pipeline.RunError, match="--eval_optimizer must be"):
        pipeline.RunConfig(eval_optimizer="lbfgs", **base).validate()


def test_per_seed_sets_train_one_model_each_whatever_their_number():
    """A random subset is drawn anew per seed: seed s trains on subset s from init s, also with one
    seed; a shared set (distilled, herding) trains every init on it."""
    import jax

    from sersynth.models import ModelSpec, flat_model

    rng = np.random.default_rng(0)
    fm = flat_model(ModelSpec(name="convnet", n_classes=3, input_shape=(8, 6), width=4, depth=1, norm="none"))
    cfg = pipeline.RunConfig(workdir="w", eval_epochs=2, eval_lr_grid=(1.0,),
                             expert_train=pipeline.train.TrainConfig(lr=0.01, batch_size=8))
    x, y = rng.normal(size=(9, 8, 6)).astype(np.float32), np.arange(9) % 3
    pair = (x, pipeline.train.one_hot(y, 3))
    sets = {"val": (x, y), "test": (x, y)}
    inits = fm.init_many(jax.random.split(jax.random.key(0), 3))
    for per_seed, pairs, seeds in ((True, [pair], 1), (True, [pair, pair], 2), (False, [pair], 3)):
        r = protocol._train_set(cfg, fm, "s", pairs, inits, jax.random.key(1), sets, 3, [0.01], per_seed, 0)
        assert len(r.uar["test"]) == seeds, (per_seed, len(pairs))


def test_folds_pool_every_trained_model():
    """The aggregate of cross-validation folds pools each fold's seeds, for the guiding model and for
    every other trained model (--eval_models) alike; summary figures missing from a fold are left out."""
    from sersynth.evaluate import Result

    def result(name, uars):
        return Result(name, {"val": uars, "test": uars}, {"val": uars, "test": uars},
                      {"val": [[1, 0], [0, 1]], "test": [[1, 0], [0, 1]]}, 1.0, 10).to_json()

    names = ("full_data", "full_data_reference", "distilled_fixed_init", "distilled_random_init")
    reports = {k: {"corpus": "c", "classes": ["a", "b"], "model": {}, "n_params": 1, "backend": "cpu", "devices": [],
                   "jax_version": "0", "results": {n: result(n, [0.5 + k / 10, 0.6]) for n in names},
                   "summary": {"ipc": 2, **({"source_recovery_auc": 0.7} if k == 0 else {})},
                   "other_models": {"cnn6": {"n_params": 5, "results": {n: result(n, [0.2 + k / 10]) for n in names}}}}
               for k in range(2)}
    manifest = {"hash": "h", "protocol": "loso", "fold_info": [{"test": "s0"}, {"test": "s1"}]}
    agg = pipeline.aggregate_folds(reports, manifest)
    assert agg["results"]["distilled_fixed_init"]["uar"]["test"] == [0.5, 0.6, 0.6, 0.6]
    pooled = agg["other_models"]["cnn6"]
    assert pooled["n_params"] == 5 and pooled["results"]["distilled_random_init"]["uar"]["test"] == pytest.approx([0.2, 0.3])
    assert pooled["results"]["distilled_random_init"]["test_uar_mean"] == pytest.approx(0.25)
    assert agg["summary"] == {"ipc": 2.0, **{k: agg["summary"][k] for k in ("uar_ratio_fixed", "uar_ratio_random")}}


def test_runs_sharing_a_cache_and_experts_compute_them_once(tmp_path):
    """Two runs started together on one --cache_dir and --experts_dir: the second waits while the first
    trains the experts, then reuses them instead of training them a second time."""
    import time

    shared = [f"--cache_dir={tmp_path / 'cache'}", f"--experts_dir={tmp_path / 'experts'}", "--stage=prepare,experts",
              "--expert_train_epochs=400"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(name):
        return subprocess.Popen([*RUN, f"--workdir={tmp_path / name}", *TINY_FLAGS, *shared], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first")
    lock = tmp_path / "experts" / ".lock"
    t0 = time.time()
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):     # the first is training them
        assert first.poll() is None and time.time() - t0 < 300, first.stderr.read()[-2000:]
        time.sleep(0.02)
    second = start("second")
    first.communicate(timeout=600)
    written = (tmp_path / "experts" / "trajectories.npz").stat().st_mtime_ns
    out_second = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, out_second[1][-2000:]
    assert f"experts: waiting for sersynth process {first.pid}" in out_second[1]
    assert (tmp_path / "experts" / "trajectories.npz").stat().st_mtime_ns == written      # not written again


def test_a_run_waits_for_the_embedded_corpus_another_process_is_writing(tmp_path):
    """Runs sharing a --corpus_dir of the embedded corpus take turns writing it: while another process
    holds the folder, the run waits (and says for whom) instead of writing the same clips beside it."""
    import time

    from sersynth import io

    corpus = tmp_path / "corpus"
    log = tmp_path / "run.log"
    with io.hold_dir(corpus, "the test"), open(log, "w") as err:
        run = subprocess.Popen([*RUN, f"--workdir={tmp_path / 'w'}", *TINY_FLAGS, f"--corpus_dir={corpus}",
                                "--stage=prepare"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=err, text=True)
        t0 = time.time()
        while f"embedded corpus: waiting for sersynth process {os.getpid()}" not in log.read_text():
            assert run.poll() is None and time.time() - t0 < 120, log.read_text()[-2000:]
            time.sleep(0.05)
        assert not (corpus / "DEMOS").exists()           # nothing written while the folder is held
    assert run.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert (corpus / "embedded_corpus.json").is_file() and any((corpus / "DEMOS").rglob("*.wav"))
