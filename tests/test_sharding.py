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
    np.testing.assert_allclose(float(sharded.params["log_lr"]), float(single.params["log_lr"]), rtol=1e-4)
try:
    distill.shard_state(distill.init_state(distill.DistillConfig(ipc=1), x, y, 3, jax.random.key(0)),
                        distill.data_mesh(4))
except ValueError as e:
    assert "must divide evenly over --mesh_devices=4" in str(e)
else:
    raise AssertionError("3 samples over 4 devices was accepted")
print("sharded == single")
"""


def test_sharded_distillation_matches_single_device():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded == single" in proc.stdout
