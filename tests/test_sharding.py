"""Sharding the synthetic set over 4 forced CPU devices gives the single-device result."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import jax, numpy as np
assert jax.device_count() == 4, jax.devices()
from sersynth import distill, train
from sersynth.models import ModelSpec, flat_model
from tests.test_train import _toy
fm = flat_model(ModelSpec(name="convnet", width=4, depth=1, n_classes=3, input_shape=(12, 8)))
x, y = _toy(n=48, shape=(12, 8))
init = fm.init_many(jax.random.split(jax.random.key(0), 2))
_, _, traj = train.fit(fm, train.TrainConfig(lr=0.05, epochs=4, batch_size=16), x, train.one_hot(y, 3), init,
                       jax.random.key(1), record=True)
for batch_syn in (0, 4):
    cfg = distill.DistillConfig(ipc=4, syn_steps=3, expert_epochs=1, max_start_epoch=3, iterations=4, lr_img=10.0,
                                batch_syn=batch_syn, remat="nested", unroll=1)
    single, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False)
    sharded, _, _ = distill.distill(fm, cfg, traj, x, y, 3, 0, progress=False, mesh=distill.data_mesh(4))
    assert len(sharded.params["x"].sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(sharded.params["x"]), np.asarray(single.params["x"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(sharded.params["lr"]), float(single.params["lr"]), rtol=1e-4)
try:
    distill.shard_state(distill.init_state(distill.DistillConfig(ipc=1), x, y, 3, jax.random.key(0)),
                        distill.data_mesh(4))
except ValueError as e:
    assert "must divide evenly over --mesh_devices=4" in str(e)
else:
    raise AssertionError("3 samples over 4 devices was accepted")
print("sharded == single")
"""


def _run_on_4_cpu_devices(script: str, done: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done in proc.stdout


def test_sharded_distillation_matches_single_device():
    _run_on_4_cpu_devices(SCRIPT, "sharded == single")


MODELS_SCRIPT = """
import jax, numpy as np
from sersynth import distill, evaluate, train
from sersynth.models import ModelSpec, flat_model
from tests.test_train import _toy
fm = flat_model(ModelSpec(name="convnet", width=4, depth=1, n_classes=3, input_shape=(12, 8)))
x, y = _toy(n=48, shape=(12, 8))
cfg = train.TrainConfig(lr=0.05, epochs=3, batch_size=16)
for n_models in (4, 5):                                   # 5: padded to 8 over 4 devices, then cut
    init = fm.init_many(jax.random.split(jax.random.key(0), n_models))
    for parallel in ("vmap", "loop"):
        ref = train.fit(fm, cfg, x, train.one_hot(y, 3), init, jax.random.key(1), record=True, parallel=parallel)
        got = train.fit(fm, cfg, x, train.one_hot(y, 3), init, jax.random.key(1), record=True, parallel=parallel,
                        mesh=distill.data_mesh(4))
        assert got[0].shape == ref[0].shape and got[2].shape == ref[2].shape, (got[0].shape, ref[0].shape)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    r = evaluate.train_and_score("s", fm, cfg, x, train.one_hot(y, 3), init, jax.random.key(2), {"v": (x, y)}, 3,
                                 mesh=distill.data_mesh(4))
    r0 = evaluate.train_and_score("s", fm, cfg, x, train.one_hot(y, 3), init, jax.random.key(2), {"v": (x, y)}, 3)
    np.testing.assert_allclose(r.uar["v"], r0.uar["v"])
import tempfile
from sersynth import experts
with tempfile.TemporaryDirectory() as d:
    runs = [experts.train_experts(fm, cfg, x, y, 3, 5, 0, f"{d}/{i}", cache_hash="h", parallel=p, mesh=m,
                                  progress=False)
            for i, (p, m) in enumerate([("vmap", None), ("loop", None), ("loop", distill.data_mesh(4)),
                                        ("vmap", distill.data_mesh(4))])]
for other in runs[1:]:
    np.testing.assert_allclose(other.params, runs[0].params, rtol=1e-4, atol=1e-5)
print("models sharded == single")
"""


def test_experts_and_seeds_sharded_over_devices_match_single_device():
    _run_on_4_cpu_devices(MODELS_SCRIPT, "models sharded == single")


def test_two_process_run_matches_one_process_with_the_same_devices(tmp_path):
    """A real multi-host run: 2 processes x 2 CPU devices (gloo collectives), one 4-device mesh,
    against one process with 4 devices. Only process 0 writes; the results agree."""
    import json
    import socket

    import numpy as np

    from tests.test_runner import TINY_FLAGS

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    flags = [*TINY_FLAGS, "--ipc=4", "--mesh_devices=4", "--privacy_audit=false"]
    base = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / 'multi'}", *flags,
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    env2 = {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, env=env2, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "distilled / full-data test UAR" in outs[0][0] and "full-data" not in outs[1][0]   # one writer
    single = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / 'single'}", *flags],
                            cwd=ROOT, env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (np.load(tmp_path / w / "distill" / "distilled.npz") for w in ("multi", "single"))
    np.testing.assert_allclose(a["x"], b["x"], rtol=1e-4, atol=1e-5)
    ra, rb = (json.loads((tmp_path / w / "report.json").read_text())["results"] for w in ("multi", "single"))
    for name in rb:
        np.testing.assert_allclose(ra[name]["uar"]["test"], rb[name]["uar"]["test"], atol=1e-6)
    assert not list((tmp_path / "multi").rglob("*.tmp"))
