"""benchmarks.standings: the verdict rule, a finished run's report as a row, and the stored standings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import standings
from tests.test_runner import ROOT


@pytest.mark.parametrize("ours, theirs, expected", [
    ((50.0, 1.0), (45.0, 2.0), "beats +5.0"),     # the margin is larger than both spreads
    ((50.0, 6.0), (45.0, 2.0), "ties +5.0"),      # not larger than our own spread
    ((50.0, 1.0), (45.0, 5.0), "ties +5.0"),      # nor than theirs
    ((40.0, 1.0), (45.0, 2.0), "loses -5.0"),
    ((45.0, 0.0), (45.0, 0.0), "ties +0.0"),
])
def test_a_lead_counts_only_beyond_both_seed_spreads(ours, theirs, expected):
    assert standings.verdict(ours, theirs) == expected      # sersynth.report's, as report.md says it


def test_a_finished_runs_report_is_a_standings_row(finished_run, tmp_path):
    workdir, _ = finished_run
    report = json.loads((workdir / "report.json").read_text())
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.standings", f"--report={workdir / 'report.json'}",
                           f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    test = report["results"]["distilled_random_init"]["uar"]["test"]
    mean = 100 * sum(test) / len(test)
    assert r["distilled_random_init"]["mean"] == pytest.approx(mean)
    assert r["ipc"] == report["summary"]["ipc"]
    assert r["share_pct"] == pytest.approx(100 * report["summary"]["fraction_of_train"])
    assert f"{mean:.1f} ± " in proc.stdout and r["vs_herding"] in proc.stdout


def test_a_report_without_the_coresets_is_a_one_line_error(finished_run, tmp_path):
    workdir, _ = finished_run
    report = json.loads((workdir / "report.json").read_text())
    del report["results"]["herding_subset_fixed_init"]
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps(report))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.standings", f"--report={bad}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"{bad}: cannot read a standings row: the report has no "
                                   "herding_subset_fixed_init (a run evaluated without them?)")


def test_every_stored_standing_reads():
    rows = [standings.row(json.loads((standings.RESULTS / name).read_text()), c, s)
            for c, s, name in standings.STANDINGS]
    assert len(rows) == len(standings.STANDINGS)
    assert all(0 < r["ratio_random_init"] < 1.5 for r in rows)
