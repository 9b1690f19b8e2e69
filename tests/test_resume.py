"""Runs that survive: a real runner process killed with SIGKILL in each stage, then the same command
again, ends with the same distilled set and report as a run never interrupted; corrupt, stale and
concurrent run directories are caught."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sersynth.io import load_npz
from tests.test_runner import ROOT, RUN, TINY_FLAGS, run_cli

# TINY_FLAGS run long enough in each stage (20 iterations, a checkpoint every 5) for a kill to land
# inside it; the session's finished run with the same flags is the uninterrupted reference.
RESUME_FLAGS = TINY_FLAGS


def _start_with(args: list[str]) -> subprocess.Popen:
    """The runner command with ``args``, as its own process (to be killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([*RUN, *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _start(workdir: Path) -> subprocess.Popen:
    return _start_with([f"--workdir={workdir}", *RESUME_FLAGS])


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _results(workdir: Path) -> dict:
    report = json.loads((workdir / "report.json").read_text())
    return {k: (r["uar"], r["wa"]) for k, r in report["results"].items()}


def test_killed_in_every_stage_then_rerun_equals_an_uninterrupted_run(finished_run, tmp_path):
    ref = finished_run[0]
    w = tmp_path / "killed"
    # 1. during expert training: the first expert is saved, the others are not
    _kill_when(_start(w), lambda: any((w / "experts").glob("chunk_*.npz")))
    assert not (w / "experts" / "trajectories.npz").exists()
    # 2. during distillation: a checkpoint exists, the distilled set does not
    _kill_when(_start(w), lambda: (w / "distill" / "checkpoint.npz").is_file())
    assert not (w / "distill" / "distilled.npz").exists()
    # 3. during evaluation
    _kill_when(_start(w), lambda: (w / "distill" / "meta.json").is_file())
    assert not (w / "report.json").exists()
    run_cli(f"--workdir={w}", *RESUME_FLAGS)
    a, b = load_npz(ref / "distill" / "distilled.npz"), load_npz(w / "distill" / "distilled.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(load_npz(ref / "experts" / "trajectories.npz")["params"],
                                  load_npz(w / "experts" / "trajectories.npz")["params"])
    assert _results(ref) == _results(w)
    rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((w / "report.json").read_text())
    assert report["stage_seconds"]["distill"] > 0 and report["stage_seconds"]["experts"] > 0
    assert len([r for r in rows if "loss" in r]) >= 20      # rows logged twice around a kill are kept in the log


def test_moved_run_directory_continues(finished_run, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(finished_run[0], moved)
    (moved / "report.json").unlink()
    proc = run_cli(f"--workdir={moved}/.", *TINY_FLAGS, "--stage=evaluate")
    assert (moved / "report.json").is_file() and "error" not in proc.stderr.lower()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def done_run(finished_run):
    return finished_run[0]


@pytest.mark.parametrize("rel,damage,stages,message", [
    ("experts/trajectories.npz", _flip_byte, "distill,evaluate", "trajectories.npz is unreadable or corrupt"),
    ("distill/distilled.npz", _truncate, "evaluate", "distilled.npz is unreadable or corrupt"),
    ("distill/checkpoint.npz", _truncate, "distill,evaluate", "checkpoint.npz is unreadable or corrupt"),
    ("config.json", lambda p: p.write_text("[]"), "evaluate", "config.json is not a sersynth run configuration"),
    ("config.json", lambda p: p.write_text("{garbage"), "evaluate", "config.json is not valid JSON"),
])
def test_corrupt_artifacts_give_one_line_naming_the_file(done_run, tmp_path, rel, damage, stages, message):
    import shutil

    w = tmp_path / "w"
    shutil.copytree(done_run, w)
    damage(w / rel)
    proc = run_cli(f"--workdir={w}", *TINY_FLAGS, f"--stage={stages}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and message in last, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_corrupt_feature_cache_is_rebuilt(done_run, tmp_path):
    import shutil

    w = tmp_path / "w"
    shutil.copytree(done_run, w)
    before = load_npz(w / "cache" / "features.npz")["x"]
    _truncate(w / "cache" / "features.npz")
    run_cli(f"--workdir={w}", *TINY_FLAGS, "--stage=prepare")
    np.testing.assert_array_equal(load_npz(w / "cache" / "features.npz")["x"], before)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    w = tmp_path / "w"
    first = _start(w)
    try:
        deadline = time.time() + 120
        while not (w / ".lock").is_file() or not (w / ".lock").read_text().strip():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        proc = run_cli(f"--workdir={w}", *RESUME_FLAGS, check=False)
        assert proc.returncode == 2 and f"in use by another sersynth process (pid {first.pid})" in proc.stderr
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    # the kernel released the dead process's lock: the same command now runs (here: just prepare)
    run_cli(f"--workdir={w}", *RESUME_FLAGS, "--stage=prepare")


def test_diverged_experts_are_refused_naming_the_flag(tmp_path):
    proc = run_cli(f"--workdir={tmp_path / 'w'}", *TINY_FLAGS, "--expert_lr=1e4", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "diverged" in last and "--expert_lr" in last, proc.stderr[-1500:]
    assert not (tmp_path / "w" / "experts" / "trajectories.npz").exists()


def test_changed_corpus_recached_then_the_same_command_rebuilds_everything_downstream(done_run, tmp_path):
    """The corpus loses clips and its feature cache is re-prepared in place; the same runner command
    for the later stages must not reuse the experts, the distillation checkpoint or the distilled set
    made from the old cache: each is rebuilt, and the report speaks of the new cache."""
    import shutil

    w = tmp_path / "w"
    shutil.copytree(done_run, w)
    old_hash = json.loads((w / "cache" / "manifest.json").read_text())["hash"]
    smaller = tmp_path / "corpus"
    shutil.copytree(w / "corpus", smaller)
    for wav in sorted(smaller.rglob("*.wav"))[::5]:
        wav.unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prep = subprocess.run([sys.executable, "-m", "sersynth.data.prepare", "--corpus=embedded", f"--root={smaller}",
                           f"--out={w / 'cache'}", "--emotions=anger,sadness,happiness", "--n_fft=512",
                           "--hop_length=256", "--n_mels=16", "--clip_seconds=0.5", "--workers=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    new_hash = json.loads((w / "cache" / "manifest.json").read_text())["hash"]
    assert new_hash != old_hash
    proc = run_cli(f"--workdir={w}", *TINY_FLAGS, "--stage=experts,distill,evaluate")
    assert "starting afresh" in proc.stderr                        # the old checkpoint was not resumed
    assert json.loads((w / "experts" / "meta.json").read_text())["cache_hash"] == new_hash
    assert json.loads((w / "distill" / "meta.json").read_text())["cache_hash"] == new_hash
    report = json.loads((w / "report.json").read_text())
    assert report["cache_hash"] == new_hash
    n_train = report["results"]["full_data"]["n_train"]
    assert n_train < json.loads((done_run / "report.json").read_text())["results"]["full_data"]["n_train"]
