"""``sersynth table``: a slice of table_cpu.flags through the installed command, killed in its
second cell and run again: the first cell is reused, the experts are trained once per guide, and
table.csv / table.md / the plots hold every (guide, trained model, ipc, method)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERSYNTH = Path(sys.executable).parent / "sersynth"
SLICE = ["--flagfile=experiments/flags/table_cpu.flags", "--guide_models=cnn6,vgg15", "--eval_models=cnn6,vgg15",
         "--ipcs=1,2", "--embedded_speakers=6", "--embedded_utterances=3", "--clip_seconds=0.5", "--n_mels=16",
         "--expert_train_epochs=3", "--expert_min_steps_per_epoch=0", "--max_start_epoch=1", "--expert_epochs=1",
         "--syn_steps=3", "--iterations=4", "--width_mult=0.0625", "--lr_init=0.003", "--eval_every=2",
         "--checkpoint_every=2", "--eval_epochs=4", "--eval_select_every=2", "--reference_epochs=3",
         "--dm_iterations=3", "--noprivacy_audit", "--noprogress"]
# (the slice's 3-epoch experts barely learn, VGG-15's not at all: no lr can be measured from them)


def _table(*args, log=None):
    """The installed command; its output to the open file ``log`` (a pipe nobody reads would block
    it), else piped."""
    return subprocess.Popen([str(SERSYNTH), "table", *SLICE, *args], cwd=ROOT,
                            stdout=subprocess.PIPE if log is None else log,
                            stderr=subprocess.PIPE if log is None else subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_table_slice_resumes_and_writes_every_row(tmp_path):
    w = tmp_path / "table"
    with open(tmp_path / "first.log", "w") as log:
        proc = _table(f"--workdir={w}", log=log)
        t0 = time.time()
        while not (w / "cnn6_ipc2" / "config.json").is_file():        # killed once the second cell has started
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() - t0 < 900
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = (w / "cnn6_ipc1" / "report.json").read_bytes()
    assert not (w / "table.csv").exists()
    proc = _table(f"--workdir={w}")
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-3000:]
    assert "cell cnn6 ipc 1: finished already" in err
    assert (w / "cnn6_ipc1" / "report.json").read_bytes() == first          # reused, not redone
    assert sorted(p.name for p in w.iterdir() if p.name.startswith("experts_")) == ["experts_cnn6", "experts_vgg15"]
    assert not (w / "cnn6_ipc1" / "experts").exists()                       # one set of experts per guide
    # one full-data reference per (guide, trained model), trained in the first cell and reused by the second
    for guide, other in (("cnn6", "vgg15"), ("vgg15", "cnn6")):
        assert len(list((w / f"experts_{guide}").glob("reference_*.json"))) == 2
        a, b = (json.loads((w / f"{guide}_ipc{k}" / "report.json").read_text()) for k in (1, 2))
        for ra, rb in ((a["results"], b["results"]), (a["other_models"][other]["results"],
                                                      b["other_models"][other]["results"])):
            ra, rb = ra["full_data_reference"], rb["full_data_reference"]
            assert "reused_from" not in ra["extra"] and rb["extra"].pop("reused_from").startswith("reference_")
            assert ra == rb
    with open(w / "table.csv") as f:
        rows = list(csv.DictReader(f))
    # per guide and ipc: 7 methods on the guide (distilled from fixed and random inits), 6 on the other model
    assert len(rows) == 2 * 2 * (7 + 6)
    keys = {(r["guide_model"], r["eval_model"], r["ipc"], r["method"]) for r in rows}
    assert ("vgg15", "cnn6", "2", "dm") in keys and ("cnn6", "cnn6", "1", "distilled_fixed_init") in keys
    assert ("cnn6", "vgg15", "1", "distilled_fixed_init") not in keys
    for r in rows:
        assert 0 <= float(r["test_uar_mean"]) <= 1 and r["seeds"] == "2" and Path(r["run_dir"]).is_dir()
        assert float(r["fraction_of_train"]) > 0
    report = json.loads((w / "vgg15_ipc2" / "report.json").read_text())
    assert set(report["other_models"]) == {"cnn6"}
    # the preset's --eval_lr_choice=shared: per trained model the random subset chose among the lr candidates
    # on validation, and every other setting trained at its choice alone
    for res, rs in ((report["results"], "random_subset_fixed_init"),
                    (report["other_models"]["cnn6"]["results"], "random_subset_random_init")):
        assert len(res[rs]["extra"]["lr_val_uar"]) == len(report["lr_candidates"]) == 2
        for name, result in res.items():
            if name.endswith("_init") and name != rs:
                assert (result["extra"]["lr"], result["extra"]["lr_chosen_by"], len(result["extra"]["lr_val_uar"])) \
                    == (res[rs]["extra"]["lr"], "random_subset", 1), name
    r = next(r for r in rows if (r["guide_model"], r["eval_model"], r["ipc"], r["method"]) == ("vgg15", "cnn6", "2", "herding"))
    assert float(r["test_uar_mean"]) == pytest.approx(
        report["other_models"]["cnn6"]["results"]["herding_subset_random_init"]["test_uar_mean"], abs=1e-6)
    md = (w / "table.md").read_text()
    assert "## Cross-architecture, ipc 2" in md and "| guide \\ trained | cnn6 | vgg15 |" in md
    assert "88.8 / 88.3" in md                                                   # the paper's full data
    assert md.strip() in out
    assert "* trained by an earlier run sharing the experts folder" in out      # the reused reference, flagged
    for name in ("uar_vs_ipc.png", "cross_arch.png"):
        assert (w / "plots" / name).stat().st_size > 0


def test_table_refuses_bad_spans(tmp_path):
    proc = _table(f"--workdir={tmp_path / 'w'}", "--ipcs=0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith("error: --guide_models and --ipcs")
    proc = _table(f"--workdir={tmp_path / 'w'}", "--eval_models=cnn7")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "error: --eval_models: unknown cnn7" in err.strip().splitlines()[-1]
    proc = _table(f"--workdir={tmp_path / 'w'}", "--guide_settings=resnet8:lr_img=100")     # no such model
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith(
        "error: --guide_settings: cannot read 'resnet8:lr_img=100'")
    assert not (tmp_path / "w").exists()


def test_a_failed_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    """A cell whose distillation diverges is reported and skipped; the cells after it still run."""
    from sersynth import pipeline, table
    from sersynth.distill import DistillDiverged

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    base = pipeline.RunConfig(workdir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    cells = table.cell_configs(base, ["cnn6", "resnet9"], [1, 5], ["cnn6"])
    ran = []

    def fake_run(cfg):
        ran.append(Path(cfg.workdir).name)
        if cfg.model["name"] == "resnet9" and cfg.distill.ipc == 1:
            raise DistillDiverged("distillation loss became NaN/Inf by iteration 10")
        return {"cell": Path(cfg.workdir).name}

    monkeypatch.setattr(pipeline, "run", fake_run)
    reports, failed = table.run_cells(cells, ("prepare", "experts", "distill", "evaluate"))
    assert ran == ["cnn6_ipc1", "cnn6_ipc5", "resnet9_ipc1", "resnet9_ipc5"]
    assert set(reports) == {("cnn6", 1), ("cnn6", 5), ("resnet9", 5)}
    assert failed == {("resnet9", 1): "distillation loss became NaN/Inf by iteration 10"}


def test_a_table_whose_every_cell_failed_leaves_nothing_from_an_earlier_one(tmp_path):
    """The command itself (pipeline.run made to diverge): table.csv keeps only its header, table.md
    lists the failures, and the earlier sweep's plots are gone; the exit status is 1."""
    w = tmp_path / "w"
    (w / "plots").mkdir(parents=True)
    for name in ("table.csv", "table.md", "plots/uar_vs_ipc.png", "plots/cross_arch.png"):
        (w / name).write_text("from an earlier sweep")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    code = f"""
import sys
from sersynth import pipeline, table
from sersynth.distill import DistillDiverged
def diverge(cfg):
    raise DistillDiverged("distillation loss became NaN/Inf by iteration 3")
pipeline.run = diverge
table.cli(["table", "--workdir={w}", "--cache_dir={tmp_path / 'cache'}", "--guide_models=cnn6",
           "--eval_models=cnn6", "--ipcs=1,2", "--noprogress"])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: cell cnn6 ipc 2: distillation loss became NaN/Inf by iteration 3"
    lines = (w / "table.csv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guide_model,eval_model,ipc,method")
    md = (w / "table.md").read_text()
    assert "- cnn6, ipc 1: distillation loss became NaN/Inf" in md and "from an earlier sweep" not in md
    assert not list((w / "plots").iterdir())


def test_guide_settings_apply_to_that_guides_cells_only(tmp_path):
    from sersynth import pipeline, table

    settings = table.parse_guide_settings("resnet9:lr_img=100; resnet9:lr_lr=1e-5;cnn6:syn_augment=false")
    assert settings == {"resnet9": {"lr_img": 100.0, "lr_lr": 1e-5}, "cnn6": {"augment": False}}
    base = pipeline.RunConfig(workdir=str(tmp_path), distill=pipeline.distill_lib.DistillConfig(lr_img=300.0, augment=True))
    cells = table.cell_configs(base, ["cnn6", "resnet9", "vgg15"], [1, 5], ["cnn6"], settings)
    got = {(g, ipc): (c.distill.lr_img, c.distill.lr_lr, c.distill.augment, c.distill.ipc) for g, ipc, c in cells}
    assert got[("resnet9", 1)] == (100.0, 1e-5, True, 1) and got[("resnet9", 5)] == (100.0, 1e-5, True, 5)
    assert got[("cnn6", 5)] == (300.0, 1e-3, False, 5) and got[("vgg15", 1)] == (300.0, 1e-3, True, 1)
    for bad, match in [("resnet9=lr_img=1", "cannot read"), ("resnet9:ipc=2", "cannot read"), ("cnn7:lr_img=1", "cannot read"),
                       ("resnet9:lr_img=fast", "bad value")]:
        with pytest.raises(ValueError, match=match):
            table.parse_guide_settings(bad)
