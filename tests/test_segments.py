"""benchmarks.segments on a finished run: the segment's length and its cosine with the training split's
gradient, recomputed here from the stored trajectories and the cache."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sersynth import experts as experts_lib
from sersynth import train
from sersynth.data import cache as cache_lib
from sersynth.distill import loss_grad
from sersynth.models import ModelSpec, flat_model
from tests.test_runner import ROOT


def test_segments_benchmark_reports_the_segments_geometry(finished_run, tmp_path):
    workdir, _ = finished_run
    out = tmp_path / "segments.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.segments", f"--experts={workdir / 'experts'}",
                           f"--cache={workdir / 'cache'}", "--expert_epochs=2", "--starts=0:0,1:2", "--steps=3",
                           "--lrs=0.01,0.1", f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["segment"] for r in rows] == ["expert 0, epoch 0->2", "expert 1, epoch 2->4"]
    fs, ex = cache_lib.load(workdir / "cache"), experts_lib.load(workdir / "experts")
    fm = flat_model(ModelSpec.from_json(ex.meta["model"]))
    x, y = fs.subset("train")
    for row, (e, s) in zip(rows, [(0, 0), (1, 2)]):
        d = jnp.asarray(ex.params[e, s + 2] - ex.params[e, s], jnp.float32)
        g = jax.jit(loss_grad(fm))(jnp.asarray(ex.params[e, s], jnp.float32), x, train.one_hot(y, fs.n_classes))
        assert row["|d|"] == pytest.approx(float(jnp.linalg.norm(d)), rel=1e-5)
        assert abs(row["cos g"] - float(jnp.vdot(-g, d) / (jnp.linalg.norm(g) * jnp.linalg.norm(d)))) < 1e-4
        assert row["GD best"] > 0 and row["at lr"] in ("0.01", "0.1") and "(cos " in row["largest shares"]
    # the stored trajectories of a finished run have moved: the segments are not empty
    assert all(r["|d|"] > 0 for r in rows)
