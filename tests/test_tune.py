"""--tune: the grid, the resumable search, and the runner distilling with the settings validation chose."""
from __future__ import annotations

import json

import pytest

from sersynth import tune
from tests.test_runner import ROOT, TINY_FLAGS, run_cli


def test_grid_parsing_and_trials():
    grid = tune.parse_grid("lr_img=100,300; syn_init=mix,real ;syn_augment=false")
    assert grid == (("lr_img", (100.0, 300.0)), ("init", ("mix", "real")), ("augment", (False,)))
    cfg = tune.TuneConfig(grid=grid)
    cfg.validate()
    assert cfg.trials(0) == [{"lr_img": 100.0, "init": "mix", "augment": False},
                             {"lr_img": 100.0, "init": "real", "augment": False},
                             {"lr_img": 300.0, "init": "mix", "augment": False},
                             {"lr_img": 300.0, "init": "real", "augment": False}]
    sample = tune.TuneConfig(grid=grid, max_trials=3).trials(5)
    assert len(sample) == 3 and sample == tune.TuneConfig(grid=grid, max_trials=3).trials(5)
    assert all(t in cfg.trials(0) for t in sample)
    for bad, match in [("lr_img", "cannot read"), ("ipc=5", "cannot read"), ("syn_steps=ten", "bad value")]:
        with pytest.raises(ValueError, match=match):
            tune.parse_grid(bad)
    with pytest.raises(ValueError, match="needs --tune_grid"):
        tune.TuneConfig().validate()


def test_search_resumes_finished_trials_and_keeps_the_best(tmp_path):
    cfg = tune.TuneConfig(grid=(("lr_img", (1.0, 2.0, 3.0)),))
    scores = {1.0: 0.3, 2.0: 0.6, 3.0: 0.6}                       # tie: the earlier trial
    calls = []

    def run_trial(i, values):
        calls.append(i)
        if i == 2 and len(calls) == 3:
            raise KeyboardInterrupt                               # the process is stopped during trial 2
        return {"val_uar": scores[values["lr_img"]]}

    with pytest.raises(KeyboardInterrupt):
        tune.search(cfg, 0, tmp_path, run_trial)
    assert sorted(p.name for p in tmp_path.glob("trial_*.json")) == ["trial_000.json", "trial_001.json"]
    result = tune.search(cfg, 0, tmp_path, run_trial)
    assert calls == [0, 1, 2, 2]                                  # finished trials are not run again
    assert result["chosen"] == {"lr_img": 2.0} and result["chosen_trial"] == 1
    assert json.loads((tmp_path / "tune.json").read_text())["chosen_val_uar"] == 0.6
    # a trial file written for other values is not trusted
    (tmp_path / "trial_000.json").write_text(json.dumps({"values": {"lr_img": 9.0}, "val_uar": 1.0}))
    tune.search(cfg, 0, tmp_path, run_trial)
    assert calls[-1] == 0


def test_runner_tunes_on_validation_and_distils_with_the_choice(tmp_path):
    workdir = tmp_path / "run"
    args = [*TINY_FLAGS, f"--workdir={workdir}", "--tune", "--tune_grid=lr_img=3,30;syn_steps=2,3",
            "--tune_iterations=4", "--tune_trials=3"]
    proc = run_cli(*args)
    report = json.loads((workdir / "report.json").read_text())
    t = report["tune"]
    assert len(t["trials"]) == 3 and t["iterations"] == 4
    assert all(len(r["evaluations"]) >= 2 and r["evaluations"][-1]["step"] == 4 for r in t["trials"])
    best = max(t["trials"], key=lambda r: r["val_uar"])
    assert t["chosen_val_uar"] == best["val_uar"]
    assert report["distill"]["lr_img"] == t["chosen"]["lr_img"]
    assert report["distill"]["syn_steps"] == t["chosen"]["syn_steps"]
    assert report["distill"]["iterations"] == 20                  # the final distillation runs in full
    # ... continuing the chosen trial: it logs no iteration the trial ran, and its validation history starts
    # with the trial's (iterations 0 and 4) before the run's own checks (10, 20)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["iteration"] for r in rows if r.get("stage") == "distill" and "loss" in r]
    assert steps and min(steps) > 4 and max(steps) == 20
    meta = json.loads((workdir / "distill" / "meta.json").read_text())
    assert [e["step"] for e in meta["evaluations"]] == [0, 4, 10, 20]
    assert len(list((workdir / "distill" / "tune").glob("trial_*.json"))) == 3
    assert "tune: 3 trials on validation chose" in proc.stdout
    assert "chosen on validation (`--tune`, 3 trials" in (workdir / "report.md").read_text()
    # the search's cost is in the run's: every trial but the one the distillation continued (counted in it)
    others = sum(r["seconds"] for i, r in enumerate(t["trials"]) if i != t["chosen_trial"])
    assert report["stage_seconds"]["tune"] == pytest.approx(others, abs=2e-3) and others > 0
    assert report["stage_seconds"]["total"] == pytest.approx(sum(
        v for k, v in report["stage_seconds"].items() if k != "total" and v is not None), abs=2e-3)
    # the finished search is reused when the later stages are run again
    before = {p.name: p.stat().st_mtime_ns for p in (workdir / "distill" / "tune").glob("trial_*.json")}
    run_cli(*args, "--stage=distill,evaluate")
    assert before == {p.name: p.stat().st_mtime_ns for p in (workdir / "distill" / "tune").glob("trial_*.json")}
    # a trial longer than the run is not continued: the final distillation runs its own 20 iterations
    longer = tmp_path / "longer"
    # (with --lr_init=0, measured from the experts, for the trial and for the run alike)
    proc = run_cli(*args, f"--workdir={longer}", "--tune_iterations=30", "--tune_trials=1", "--lr_init=0",
                   "--stage=prepare,experts,distill")
    meta = json.loads((longer / "distill" / "meta.json").read_text())
    assert [e["step"] for e in meta["evaluations"]] == [0, 10, 20]
    assert meta["distill"]["lr_init"] > 0 and meta["tune"]["trials"][0]["evaluations"]
    assert meta["tune_seconds"] == pytest.approx(meta["tune"]["trials"][0]["seconds"], abs=2e-3)   # not continued
    assert f"starting the learned lr at {meta['distill']['lr_init']:.4g}, measured from the experts" in proc.stderr
    bad = run_cli(*args, "--tune_grid=expert_epochs=9", "--workdir=" + str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "--tune_grid trial {'expert_epochs': 9}" in bad.stderr


def test_every_grid_the_readme_shows_parses():
    import re

    readme = (ROOT / "README.md").read_text()
    grids = re.findall(r'--tune_grid="([^"]+)"', readme)
    assert len(grids) >= 2
    for text in grids:
        cfg = tune.TuneConfig(grid=tune.parse_grid(text))
        cfg.validate()
        assert len(cfg.trials(0)) >= 2, text
