"""The benchmarks' useful FLOPs (benchmarks.distill_step): the outer step's own work, however it is compiled."""
import jax
import numpy as np

from benchmarks.common import useful_flops
from sersynth import distill
from sersynth.models import ModelSpec, flat_model


def test_useful_flops_count_every_inner_step_whether_rolled_or_rematerialised():
    fm = flat_model(ModelSpec(name="convnet", width=4, depth=1, n_classes=3, input_shape=(12, 8)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 12, 8)).astype(np.float32)
    y = np.repeat(np.arange(3), 2)
    traj = jax.numpy.asarray(rng.normal(scale=0.05, size=(2, 4, fm.n_params)), jax.numpy.float32)

    def flops(steps, remat, unroll):
        cfg = distill.DistillConfig(ipc=2, syn_steps=steps, expert_epochs=2, max_start_epoch=2, remat=remat,
                                    unroll=unroll)
        return useful_flops(fm, cfg, 3, distill.init_state(cfg, x, y, 3, jax.random.key(0)), traj)

    one, rolled, unrolled, remat = flops(1, "none", 1), flops(8, "none", 1), flops(8, "none", 8), flops(8, "nested", 1)
    assert rolled == unrolled == remat                          # how the step is compiled does not change its work
    assert 6 * one < rolled < 10 * one                          # eight inner steps (plus the step's fixed part)
